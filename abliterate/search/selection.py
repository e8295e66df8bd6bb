"""After the search: the Pareto front, its table and plot, and the choice of one trial.

The front is computed on what a user cares about: *effective refusals*
(refusals plus fragments beyond the unedited model's, see ``objectives``) and
the raw multi-token KL. Selection works without a terminal (``--select``) so
the stage runs in CI and pipelines; on a TTY without ``--select`` the user
picks from the table.
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


def select_trial(rule: str, candidates: list[Candidate], n_harmful: int) -> tuple[Candidate, str]:
    """The chosen candidate and a sentence saying why."""
    kind, number = parse_rule(rule, n_harmful)
    if not candidates:
        raise UserError("study", "no completed trial to choose from", "run more trials (--n_trials)")
    if kind == "trial":
        for candidate in candidates:
            if candidate.number == int(number):
                return candidate, f"trial {int(number)} as asked"
        raise UserError("--select", f"trial {int(number)} is not a completed trial of this study",
                        f"choose one of {sorted(c.number for c in candidates)}")
    allowed = [c for c in candidates if c.effective_refusals <= number]
    if allowed:
        best = min(allowed, key=lambda c: (c.metrics.kl, c.effective_refusals, c.number))
        return best, f"lowest KL among trials with at most {number:g} effective refusals"
    best = min(candidates, key=lambda c: (c.effective_refusals, c.metrics.kl, c.number))
    return best, f"no trial has at most {number:g} effective refusals; took the fewest ({best.effective_refusals})"


def front_table(front: list[Candidate], title: str = "Pareto front") -> Table:
    table = Table(title=title)
    for column in ("trial", "refusals", "fragments", "compliance", "KL (multi-token)", "KL (1st token)", "direction"):
        table.add_column(column, justify="right")
    for candidate in front:
        metrics = candidate.metrics
        n = metrics.n_harmful
        broken = broken_answers(metrics)
        direction = f"{candidate.direction_index:.2f}" if candidate.direction_index is not None else "per layer"
        table.add_row(
            str(candidate.number),
            f"{metrics.refusals}/{n}",
            "-" if broken is None else str(broken),
            "-" if metrics.compliance is None else f"{metrics.compliance}/{n}",
            f"{metrics.kl:.4f}",
            f"{metrics.kl_first_token:.2e}",
            direction,
        )
    return table


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
