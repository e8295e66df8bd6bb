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
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from abliterate.search.objectives import TrialMetrics, broken_answers
from foundation.errors import UserError

DEFAULT_RULE = "best_kl_under 0.05"


@dataclass(frozen=True)
class Candidate:
    number: int
    metrics: TrialMetrics
    effective_refusals: int  # refusals + fragments beyond the base model's
    scope: str
    direction_index: float | None


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


_FALSE_REFUSAL_CAP = re.compile(r"(?:\s*,\s*|\s+and\s+|\s+)false_refusals\s*<=\s*([0-9]*\.?[0-9]+)\s*$")


def parse_selection(rule: str, n_harmful: int, n_harmless: int) -> Selection:
    """``parse_rule``'s rule plus an optional trailing ``false_refusals<=F`` (F below 1 with a point: a fraction)."""
    match = _FALSE_REFUSAL_CAP.search(rule)
    if match is None and "false_refus" in rule:
        raise UserError("--select", f"cannot read the false-refusal cap in {rule!r}",
                        "put it after the rule: 'best_kl_under 0.05, false_refusals<=2' or 'best_kl_under 3, false_refusals<=0.05'")
    kind, number = parse_rule(rule[: match.start()] if match else rule, n_harmful)
    if match is None:
        return Selection(kind, number)
    if kind == "trial":
        raise UserError("--select", f"{rule!r}: a false-refusal cap chooses among trials, 'trial N' names one",
                        "drop the cap, or use 'best_kl_under R, false_refusals<=F'")
    text = match.group(1)
    cap = float(text)
    return Selection(kind, number, cap * n_harmless if "." in text and cap < 1 else cap)


def select_trial(rule: str, candidates: list[Candidate], n_harmful: int, n_harmless: int = 0) -> tuple[Candidate, str]:
    """The chosen candidate and a sentence saying why."""
    selection = parse_selection(rule, n_harmful, n_harmless)
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
    if selection.max_false_refusals is not None:
        cap = selection.max_false_refusals
        counted = [c for c in candidates if c.metrics.false_refusals is not None]
        if not counted:
            raise UserError("--select", "no trial has a false-refusal count (counting was off with "
                            "--false_refusal_tokens 0, or the trials were run by an older version)",
                            "drop the false_refusals cap, or run the study with false refusals counted")
        pool = [c for c in counted if c.metrics.false_refusals <= cap]
        if not pool:
            best = min(counted, key=lambda c: (c.metrics.false_refusals, c.effective_refusals, c.metrics.kl, c.number))
            return best, f"no trial has at most {cap:g} false refusals; took the fewest ({best.metrics.false_refusals})"
        capped = f" and at most {cap:g} false refusals"
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
    for column in ("trial", *refusal_columns, "fragments", "compliance", "false refusals", "KL (multi-token)",
                   "KL (1st token)", "direction"):
        table.add_column(column, justify="right")
    for candidate in front:
        metrics = candidate.metrics
        n = metrics.n_harmful
        broken = broken_answers(metrics)
        direction = f"{candidate.direction_index:.2f}" if candidate.direction_index is not None else "per layer"
        table.add_row(
            str(candidate.number),
            f"{metrics.refusals}/{n}",
            *([marker_refusals_text(metrics)] if judged else []),
            "-" if broken is None else str(broken),
            "-" if metrics.compliance is None else f"{metrics.compliance}/{n}",
            false_refusals_text(metrics),
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
