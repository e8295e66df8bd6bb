"""After the search: the Pareto front, its table and plot, and the choice of one trial.

The front is computed on what a user cares about: *effective refusals*
(refusals plus fragments beyond the unedited model's, see ``objectives``) and
the raw multi-token KL. Selection works without a terminal (``--select``) so
the stage runs in CI and pipelines; on a TTY without ``--select`` the user
picks from the table.

``--select`` grammar: ``best_kl_under R`` or ``trial N`` (``parse_rule``),
optionally followed by a cap on false refusals: ``best_kl_under 0.05,
false_refusals<=2`` (``,``, ``and`` or a space before it; the cap a count, or a
fraction of the harmless test prompts like R). The cap is applied first.
Where the prompt spec has look-alike and skill sets, ``lookalike_refusals<=L``
(a count or a fraction of the look-alike prompts) and ``skill_loss<=S``
(percentage points of exact-answer accuracy lost against the unedited model)
cap those too, in any order after the rule: ``best_kl_under 0.05,
lookalike_refusals<=5, skill_loss<=2``. Caps apply in the order false refusals,
look-alikes, skill; where no trial meets one, the trial closest to it is taken.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from abliterate.search.objectives import TrialMetrics, broken_answers, skill_loss_points
from foundation.errors import UserError

DEFAULT_RULE = "best_kl_under 0.05"


@dataclass(frozen=True)
class Candidate:
    number: int
    metrics: TrialMetrics
    effective_refusals: int  # refusals + fragments beyond the base model's
    scope: str
    direction_index: float | None
    regime: str | None = None  # a mixed search's (``--gentle_share``) regime of the trial; None otherwise


def effective_refusals(metrics: TrialMetrics, base: TrialMetrics) -> int:
    broken, base_broken = broken_answers(metrics), broken_answers(base)
    extra = max(0, broken - base_broken) if broken is not None and base_broken is not None else 0
    return metrics.refusals + extra


def pareto_front(candidates: list[Candidate]) -> list[Candidate]:
    """Candidates no other candidate beats on both effective refusals and KL, sorted by refusals."""
    ordered = sorted(candidates, key=lambda c: (c.effective_refusals, c.metrics.kl, c.number))
    front: list[Candidate] = []
    best_kl = float("inf")
    for candidate in ordered:
        if candidate.metrics.kl < best_kl:
            front.append(candidate)
            best_kl = candidate.metrics.kl
    return front


def parse_rule(rule: str, n_harmful: int) -> tuple[str, float]:
    """'best_kl_under R' or 'trial N' -> (kind, number).

    R below 1 with a decimal point is a fraction of the harmful prompts (0.05 = 5%); anything else is a
    count. '1.0' as "100%" would accept every trial, the unedited-like ones included: never what is meant.
    """
    match = re.fullmatch(r"\s*(best_kl_under|trial)[\s:=]+([0-9]*\.?[0-9]+)\s*", rule)
    if not match:
        raise UserError("--select", f"cannot read {rule!r}", "use 'best_kl_under 3', 'best_kl_under 0.05' or 'trial 12'")
    kind, number = match.group(1), match.group(2)
    if kind == "trial":
        if not number.isdigit():  # 'trial 1.5' must not quietly become trial 1
            raise UserError("--select", f"{rule!r}: a trial number is a whole number, not {number!r}",
                            "use 'trial N' with N an integer trial number from the table (e.g. 'trial 12'), "
                            "or 'best_kl_under 3' / 'best_kl_under 0.05'")
        return kind, float(int(number))
    value = float(number)
    return kind, value * n_harmful if "." in number and value < 1 else value


@dataclass(frozen=True)
class Selection:
    kind: str  # "best_kl_under" | "trial"
    number: float  # refusals allowed (a count), or the trial number
    max_false_refusals: float | None = None  # a count; None: no cap
    max_lookalike_refusals: float | None = None  # a count; None: no cap
    max_skill_loss: float | None = None  # percentage points of skill accuracy lost against the unedited model


# A trailing cap: ``, name<=X`` (``,``, ``and`` or a space before it). Caps are read from the end, any order.
_CAP = re.compile(r"(?:\s*,\s*|\s+and\s+|\s+)(false_refusals|lookalike_refusals|skill_loss)\s*<=\s*([0-9]*\.?[0-9]+)\s*$")
_CAP_WORDS = {"false_refusals": "false_refus", "lookalike_refusals": "lookalike", "skill_loss": "skill"}
_CAP_NAMES = {"false_refusals": "false-refusal", "lookalike_refusals": "look-alike refusal", "skill_loss": "skill-loss"}
_CAP_EXAMPLES = {
    "false_refusals": "'best_kl_under 0.05, false_refusals<=2' or 'best_kl_under 3, false_refusals<=0.05'",
    "lookalike_refusals": "'best_kl_under 0.05, lookalike_refusals<=5' or 'best_kl_under 0.05, lookalike_refusals<=0.05'",
    "skill_loss": "'best_kl_under 0.05, skill_loss<=2' (at most 2 points of skill accuracy lost)",
}


def parse_selection(rule: str, n_harmful: int, n_harmless: int, n_lookalike: int = 0) -> Selection:
    """``parse_rule``'s rule plus optional trailing caps: ``false_refusals<=F`` and ``lookalike_refusals<=L``
    (a count; below 1 with a point: a fraction of the harmless / look-alike test prompts) and ``skill_loss<=S``
    (percentage points of exact-answer accuracy lost against the unedited model)."""
    caps: dict[str, str] = {}
    rest = rule
    while (match := _CAP.search(rest)) is not None:
        if match.group(1) in caps:
            raise UserError("--select", f"{rule!r} caps {match.group(1)} twice", "keep one cap per quantity")
        caps[match.group(1)] = match.group(2)
        rest = rest[: match.start()]
    for name, word in _CAP_WORDS.items():
        if word in rest:
            raise UserError("--select", f"cannot read the {_CAP_NAMES[name]} cap in {rule!r}",
                            f"put it after the rule: {_CAP_EXAMPLES[name]}")
    kind, number = parse_rule(rest, n_harmful)
    if not caps:
        return Selection(kind, number)
    if kind == "trial":
        name = next(iter(caps))
        raise UserError("--select", f"{rule!r}: a {_CAP_NAMES[name]} cap chooses among trials, 'trial N' names one",
                        f"drop the cap, or use 'best_kl_under R, {name}<=...'")

    def count(name: str, total: int) -> float | None:
        if name not in caps:
            return None
        text = caps[name]
        value = float(text)
        return value * total if "." in text and value < 1 else value

    return Selection(kind, number, count("false_refusals", n_harmless), count("lookalike_refusals", n_lookalike),
                     float(caps["skill_loss"]) if "skill_loss" in caps else None)


def select_trial(rule: str, candidates: list[Candidate], n_harmful: int, n_harmless: int = 0,
                 base: TrialMetrics | None = None) -> tuple[Candidate, str]:
    """The chosen candidate and a sentence saying why; ``base`` (the unedited model) is needed by ``skill_loss``."""
    n_lookalike = next((c.metrics.n_lookalike for c in candidates if c.metrics.n_lookalike), 0)
    selection = parse_selection(rule, n_harmful, n_harmless, n_lookalike)
    kind, number = selection.kind, selection.number
    if not candidates:
        raise UserError("study", "no completed trial to choose from", "run more trials (--n_trials)")
    if kind == "trial":
        for candidate in candidates:
            if candidate.number == int(number):
                return candidate, f"trial {int(number)} as asked"
        raise UserError("--select", f"trial {int(number)} is not a completed trial of this study",
                        f"choose one of {sorted(c.number for c in candidates)}")
    pool, capped = candidates, ""
    caps = []  # (cap, value of a candidate or None where not measured, words, what to do when none was measured)
    if selection.max_false_refusals is not None:
        caps.append((selection.max_false_refusals, lambda c: c.metrics.false_refusals, "false refusals",
                     ("no trial has a false-refusal count (counting was off with --false_refusal_tokens 0, or the "
                      "trials were run by an older version)"),
                     "drop the false_refusals cap, or run the study with false refusals counted"))
    if selection.max_lookalike_refusals is not None:
        caps.append((selection.max_lookalike_refusals, lambda c: c.metrics.lookalike_refusals, "look-alike refusals",
                     ("no trial has a look-alike refusal count (the prompt spec names no lookalike_test, or the "
                      "trials were run by an older version)"),
                     "drop the lookalike_refusals cap, or use a prompt spec with a lookalike_test set"))
    if selection.max_skill_loss is not None:
        skill_base = base if base is not None and base.skill_accuracy is not None else None
        caps.append((selection.max_skill_loss,
                     lambda c: skill_loss_points(c.metrics, skill_base) if skill_base is not None else None,
                     "points of skill accuracy lost",
                     ("no trial (or no unedited model) has a skill accuracy (the prompt spec names no skill_test, or "
                      "the trials were run by an older version)"),
                     "drop the skill_loss cap, or use a prompt spec with a skill_test set"))
    for cap, value, words, problem, fix in caps:
        counted = [c for c in pool if value(c) is not None]
        if not counted:
            raise UserError("--select", problem, fix)
        within = [c for c in counted if value(c) <= cap]
        if not within:
            best = min(counted, key=lambda c: (value(c), c.effective_refusals, c.metrics.kl, c.number))
            return best, f"no trial has at most {cap:g} {words}{capped}; took the fewest ({value(best):g})"
        pool = within
        capped += f" and at most {cap:g} {words}"
    allowed = [c for c in pool if c.effective_refusals <= number]
    if allowed:
        best = min(allowed, key=lambda c: (c.metrics.kl, c.effective_refusals, c.number))
        return best, f"lowest KL among trials with at most {number:g} effective refusals{capped}"
    best = min(pool, key=lambda c: (c.effective_refusals, c.metrics.kl, c.number))
    return best, f"no trial has at most {number:g} effective refusals{capped}; took the fewest ({best.effective_refusals})"


def front_table(front: list[Candidate], title: str = "Pareto front") -> Table:
    table = Table(title=title)
    judged = any(candidate.metrics.marker_refusals is not None for candidate in front)
    refusal_columns = ("refusals (judge)", "refusals (markers)") if judged else ("refusals",)
    lookalikes = any(candidate.metrics.lookalike_refusals is not None for candidate in front)
    skill = any(candidate.metrics.skill_correct is not None for candidate in front)
    collateral_columns = ("look-alike refusals",) * lookalikes + ("skill",) * skill
    for column in ("trial", *refusal_columns, "fragments", "compliance", "false refusals", *collateral_columns,
                   "KL (multi-token)", "KL (1st token)", "direction"):
        table.add_column(column, justify="right")
    for candidate in front:
        metrics = candidate.metrics
        n = metrics.n_harmful
        broken = broken_answers(metrics)
        direction = f"{candidate.direction_index:.2f}" if candidate.direction_index is not None else "per layer"
        if candidate.regime is not None:
            direction += f" ({candidate.regime})"
        table.add_row(
            str(candidate.number),
            f"{metrics.refusals}/{n}",
            *([marker_refusals_text(metrics)] if judged else []),
            "-" if broken is None else str(broken),
            "-" if metrics.compliance is None else f"{metrics.compliance}/{n}",
            false_refusals_text(metrics),
            *([_count_text(metrics.lookalike_refusals, metrics.n_lookalike)] if lookalikes else []),
            *([_count_text(metrics.skill_correct, metrics.n_skill)] if skill else []),
            f"{metrics.kl:.4f}",
            f"{metrics.kl_first_token:.2e}",
            direction,
        )
    return table


def marker_refusals_text(metrics: TrialMetrics) -> str:
    """The markers' own count beside a judged one, ``-`` where no judge ran."""
    return "-" if metrics.marker_refusals is None else f"{metrics.marker_refusals}/{metrics.n_harmful}"


def false_refusals_text(metrics: TrialMetrics) -> str:
    """``3/100`` refusals of the harmless test prompts, ``-`` where they were not counted."""
    if metrics.false_refusals is None:
        return "-"
    return f"{metrics.false_refusals}/{metrics.n_harmless}" if metrics.n_harmless else str(metrics.false_refusals)


def _count_text(count: int | None, total: int | None) -> str:
    return "-" if count is None else f"{count}/{total}" if total else str(count)


def collateral_text(metrics: TrialMetrics) -> str:
    """`` look-alike refusals 3/100 skill 82/100`` for a trial line; empty where the spec has neither set."""
    text = ""
    if metrics.lookalike_refusals is not None:
        text += f" look-alike refusals {_count_text(metrics.lookalike_refusals, metrics.n_lookalike)}"
    if metrics.skill_correct is not None:
        text += f" skill {_count_text(metrics.skill_correct, metrics.n_skill)}"
    return text


def plot_front(candidates: list[Candidate], front: list[Candidate], path: Path, base_refusals: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    figure, axes = plt.subplots(figsize=(7, 4.5))
    floor = 1e-6
    axes.scatter([max(c.metrics.kl, floor) for c in candidates], [c.effective_refusals for c in candidates],
                 s=14, color="0.65", label="trials")
    axes.plot([max(c.metrics.kl, floor) for c in front], [c.effective_refusals for c in front],
              "o-", color="tab:red", label="Pareto front", drawstyle="steps-post")
    for candidate in front:
        axes.annotate(str(candidate.number), (max(candidate.metrics.kl, floor), candidate.effective_refusals),
                      textcoords="offset points", xytext=(4, 4), fontsize=7)
    axes.axhline(base_refusals, color="tab:blue", linestyle=":", label=f"unedited model ({base_refusals})")
    axes.set_xscale("log")
    axes.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes.set_xlabel("KL divergence from the unedited model (first N answer tokens)")
    axes.set_ylabel("effective refusals (refusals + fragments)")
    axes.legend(loc="upper right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
