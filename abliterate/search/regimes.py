"""A gentle second regime for a share of the trials (``--gentle_share``): its own study, sampler and objective.

Why: on the hard testbed (bench/RESULTS.md, issue 17) the product search (full depth, a rank-k subspace)
finds the strong end of the front, but its damage objective ``max(KL, kl_target)`` is flat below
``kl_target``, so TPE never refines edits of KL ~1e-5..1e-4; heretic's front lives there (late-depth
edits with the refusal direction projected against the harmless mean). One search cannot serve
both: a gentle edit and a strong one differ in their directions and in which KL differences matter.

So a gentle trial is another search, not another region of the same one:

* **its own Optuna study** (``<name>-gentle``) in the same journal as the product's, with its own
  seeded TPE sampler that models only gentle trials (a TPE fitted on both would treat the regimes' very
  different parameter-to-KL maps as one);
* **its own space and directions**: ``--gentle_depth`` (default ``full``) and the single mean-difference
  direction projected against the harmless mean (heretic's default direction), which edits at a tenth of
  the plain direction's KL; on testbed/hard it removes refusals only where it reaches the early layers
  (30 gentle trials at ``late`` depth removed none, at ``full`` depth 20 of 30 did, at KL < 9e-5);
* **its own damage objective**: ``max(KL, --gentle_kl_target)``, default 0, i.e. the raw KL, so TPE sees
  every KL difference inside the gentle region (a flat 1e-4 let it chase refusals up to KL 2.8e-4 and lose
  the near-no-edit end of the front).

The product study is the product search unchanged: the same space, directions, objective and startup
trials, so its trials are number for number the first ``n_product`` trials of a search without
``--gentle_share``. Trials alternate between the studies by a fixed schedule (``next_regime``), and each
records ``search_trial``, its number in the whole search, and ``regime``; the front and the selection run
over the completed trials of both studies, numbered by ``search_trial``. A run killed mid-trial resumes it
in the study it belongs to under the same numbers (the schedule depends only on completed counts).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from abliterate.search.study import TrialOutcome, completed_trials, run_trials

PRODUCT = "product"
GENTLE = "gentle"
REGIME_ATTR = "regime"
SEARCH_TRIAL_ATTR = "search_trial"


@dataclass(frozen=True)
class TrialSplit:
    """How many trials (and random startup trials) each regime gets of the search's ``n_trials``."""

    n_product: int
    n_gentle: int
    product_startup: int
    gentle_startup: int

    @property
    def n_trials(self) -> int:
        return self.n_product + self.n_gentle


def split_trials(n_trials: int, n_startup_trials: int, share: float) -> TrialSplit:
    """``round(share * n_trials)`` gentle trials; the product keeps its startup count, the gentle study the same ratio."""
    n_gentle = min(n_trials, max(0, round(share * n_trials)))
    n_product = n_trials - n_gentle
    gentle_startup = min(n_gentle, round(n_startup_trials * n_gentle / n_trials)) if n_trials else 0
    return TrialSplit(n_product, n_gentle, min(n_startup_trials, n_product), gentle_startup)


def next_regime(product_done: int, gentle_done: int, split: TrialSplit) -> str:
    """The regime of the next trial: gentle trials spread evenly over the search (trial t is gentle when
    ``floor((t + 1) g / n)`` grows), a regime whose quota is full gives way to the other."""
    if gentle_done >= split.n_gentle:
        return PRODUCT
    if product_done >= split.n_product:
        return GENTLE
    slot = product_done + gentle_done
    due = math.floor((slot + 1) * split.n_gentle / split.n_trials)
    return GENTLE if gentle_done < due else PRODUCT


def gentle_study_name(name: str) -> str:
    return f"{name}-gentle"


def search_number(trial: FrozenTrial) -> int:
    """The trial's number in the whole search: ``search_trial`` in a mixed search, else its study's own number."""
    return int(trial.user_attrs.get(SEARCH_TRIAL_ATTR, trial.number))


def trial_regime(trial: FrozenTrial) -> str:
    return str(trial.user_attrs.get(REGIME_ATTR, PRODUCT))


def regime_record(trial: FrozenTrial, study_name: str, settings) -> dict[str, Any]:
    """What ``chosen_trial.json`` says of a mixed search's trial: its regime, study, and how it was searched."""
    gentle = trial_regime(trial) == GENTLE
    subspace = not gentle and settings.directions == "subspace"
    return {"regime": trial_regime(trial), "study_name": study_name, "study_trial_number": trial.number,
            "directions": "subspace" if subspace else "mean_difference",
            "direction_rank": settings.direction_rank if subspace else 1,
            "direction_projected": True if gentle else settings.direction_projected,
            "search_depth": settings.gentle_depth if gentle else settings.search_depth,
            "kl_target": settings.gentle_kl_target if gentle else settings.kl_target}


def _marking(suggest: Callable[[optuna.Trial], Any], regime: str, number: int) -> Callable[[optuna.Trial], Any]:
    """``suggest`` that first records the trial's regime and search number (a resumed trial keeps the ones it has)."""

    def marked(trial: optuna.Trial) -> Any:
        if SEARCH_TRIAL_ATTR not in trial.user_attrs:
            trial.set_user_attr(SEARCH_TRIAL_ATTR, number)
            trial.set_user_attr(REGIME_ATTR, regime)
        return suggest(trial)

    return marked


def run_mixed_trials(studies: dict[str, optuna.Study], searches: dict[str, dict[str, Any]], split: TrialSplit,
                     report: Callable[[TrialOutcome, int, int, float | None], None] | None = None) -> None:
    """Run (or resume) both studies until each has its quota of completed trials, one trial at a time.

    ``searches[regime]`` holds ``run_trials``' keyword arguments for that regime, except ``n_trials`` and
    ``n_startup_trials`` (from ``split``) and ``report`` (``report`` here gets the search's numbers: the
    trial's ``search_trial``, the completed count over both studies and an ETA from this process's trials).
    """
    quota = {PRODUCT: (split.n_product, split.product_startup), GENTLE: (split.n_gentle, split.gentle_startup)}
    durations: list[float] = []

    def done() -> dict[str, int]:
        return {regime: len(completed_trials(study)) for regime, study in studies.items()}

    while True:
        counts = done()
        if counts[PRODUCT] >= split.n_product and counts[GENTLE] >= split.n_gentle:
            return
        regime = next_regime(counts[PRODUCT], counts[GENTLE], split)
        number = counts[PRODUCT] + counts[GENTLE]

        def told(outcome: TrialOutcome, _done: int, _total: int, _eta: float | None, regime=regime, number=number) -> None:
            durations.append(outcome.seconds)
            finished = sum(done().values())
            eta = sum(durations) / len(durations) * max(split.n_trials - finished, 0)
            if report:
                report(dataclasses.replace(outcome, number=number, regime=regime), finished, split.n_trials, eta)

        search = searches[regime]
        run_trials(studies[regime], **{**search, "suggest": _marking(search["suggest"], regime, number)},
                   n_trials=counts[regime] + 1, n_startup_trials=quota[regime][1], report=told)
