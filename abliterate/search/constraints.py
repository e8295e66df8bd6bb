"""Caps the search itself honours (``--search_caps``): collateral damage as constraints of the sampler.

``--select``'s caps only choose among finished trials; on a model where the trials that remove the most
refusals also cost look-alike answers or skill, the search may never spend its trials where the caps hold.
``--search_caps 'lookalike_refusals<=5, skill_loss<=2'`` hands the same caps to Optuna's TPE as
constraints (``Trial.set_constraint``: a value <= 0 is feasible), so after the random startup trials it
models the trials that respect them apart from those that do not. Every trial is still run, recorded and
shown; the two objectives (refusal score, damage score) are unchanged.

Grammar, as ``--select``'s caps: ``name<=X`` joined by commas, ``name`` one of ``false_refusals``,
``lookalike_refusals`` (a count; below 1 with a point, a fraction of the harmless / look-alike test
prompts) and ``skill_loss`` (percentage points of exact-answer accuracy lost against the unedited model).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from abliterate.search.objectives import TrialMetrics, skill_loss_points
from foundation.errors import UserError

NAMES = ("false_refusals", "lookalike_refusals", "skill_loss")
_CAP = re.compile(r"\s*(\w+)\s*<=\s*([0-9]*\.?[0-9]+)\s*")
_EXAMPLE = "e.g. --search_caps 'lookalike_refusals<=5, skill_loss<=2' (or lookalike_refusals<=0.05: a fraction)"


def parse_caps(text: str) -> dict[str, str]:
    """``'lookalike_refusals<=5, skill_loss<=2'`` -> ``{name: number as written}``; a UserError names what is wrong."""
    caps: dict[str, str] = {}
    for part in text.split(","):
        match = _CAP.fullmatch(part)
        if match is None:
            raise UserError("--search_caps", f"cannot read {part.strip()!r} in {text!r}", f"write name<=X; {_EXAMPLE}")
        name, number = match.groups()
        if name not in NAMES:
            raise UserError("--search_caps", f"unknown quantity {name!r}", f"cap one of {', '.join(NAMES)}; {_EXAMPLE}")
        if name in caps:
            raise UserError("--search_caps", f"{text!r} caps {name} twice", "keep one cap per quantity")
        caps[name] = number
    return caps


def cap_limits(caps: dict[str, str], n_harmless: int, n_lookalike: int) -> dict[str, float]:
    """Counts (fractions turned into counts of their prompt set) and skill points, by name."""
    totals = {"false_refusals": n_harmless, "lookalike_refusals": n_lookalike}
    limits = {}
    for name, text in caps.items():
        value = float(text)
        limits[name] = value * totals[name] if name in totals and "." in text and value < 1 else value
    return limits


def _measured(name: str, metrics: TrialMetrics, base: TrialMetrics) -> float | None:
    if name == "skill_loss":
        return skill_loss_points(metrics, base)
    return getattr(metrics, name)


def constraint_values(metrics: TrialMetrics, base: TrialMetrics, limits: dict[str, float]) -> dict[str, float]:
    """One value per cap, ``measured - cap`` (<= 0: within the cap); 0 where the trial did not measure it."""
    values = {}
    for name, limit in limits.items():
        measured = _measured(name, metrics, base)
        values[name] = 0.0 if measured is None else float(measured) - limit
    return values


def check_measurable(limits: dict[str, float], base: TrialMetrics) -> None:
    """A cap on a quantity the run does not measure would constrain nothing: refuse it before the search."""
    for name in limits:
        if _measured(name, base, base) is None:
            what = {"false_refusals": "false refusals are not counted (--false_refusal_tokens 0)",
                    "lookalike_refusals": "the prompt spec names no lookalike_test set",
                    "skill_loss": "the prompt spec names no skill_test set"}[name]
            raise UserError("--search_caps", f"cannot cap {name}: {what}",
                            f"drop the {name} cap, or use a prompt spec / settings that measure it")


def search_constraints(text: str | None, base: TrialMetrics,
                       n_harmless: int) -> Callable[[TrialMetrics], dict[str, float]] | None:
    """A trial's cap values for ``--search_caps`` (None without caps); refused if a cap measures nothing."""
    if text is None:
        return None
    limits = cap_limits(parse_caps(text), n_harmless, base.n_lookalike or 0)
    check_measurable(limits, base)
    return lambda metrics: constraint_values(metrics, base, limits)
