"""The Optuna study on disk, and the loop that runs its trials.

The study lives in a journal file (``JournalStorage``), written as each
trial starts and ends, so a killed run loses at most the trial in flight.
Re-running the same command loads the study and:

* finishes a trial that was left RUNNING under its own number, with the
  parameters it was given (Optuna hands back stored parameters on re-suggest);
* keeps asking until ``n_trials`` trials are complete.

Each trial's sampler is seeded from the settings' seed and the trial number,
and TPE is deterministic given the history, so a resumed run proposes the
same parameters as one that was never interrupted.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from abliterate.edits.plan import AbliterationParameters
from abliterate.search.journal import no_space_left, open_journal
from abliterate.search.objectives import TrialMetrics, objective_values
from foundation.errors import UserError

METRICS_ATTR = "metrics"
PARAMETERS_ATTR = "abliteration_parameters"
MAX_CONSECUTIVE_FAILURES = 5

optuna.logging.set_verbosity(optuna.logging.WARNING)


def open_study(journal_path: Path, study_name: str, on_repair: Callable[[str], None] | None = None) -> optuna.Study:
    """Load (or create) the study; a journal cut short by a full disk is repaired first (``on_repair`` is told)."""
    storage, note = open_journal(journal_path)
    if note and on_repair:
        on_repair(note)
    with no_space_left(journal_path):
        return optuna.create_study(
            study_name=study_name,
            storage=storage,
            directions=["minimize", "minimize"],
            load_if_exists=True,
        )


def seeded_sampler(seed: int, trial_number: int, n_startup_trials: int) -> optuna.samplers.TPESampler:
    return optuna.samplers.TPESampler(
        multivariate=True,
        n_startup_trials=n_startup_trials,
        seed=seed * 100_003 + trial_number,
    )


def completed_trials(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


@dataclass(frozen=True)
class TrialOutcome:
    number: int
    parameters: AbliterationParameters
    metrics: TrialMetrics
    values: tuple[float, float]
    seconds: float
    regime: str | None = None  # a mixed search's (``--gentle_share``) regime of the trial; None otherwise


Suggest = Callable[[optuna.Trial], AbliterationParameters]
Evaluate = Callable[[AbliterationParameters], TrialMetrics]
Report = Callable[[TrialOutcome, int, int, float | None], None]  # outcome, done, total, eta seconds


def run_trials(
    study: optuna.Study,
    *,
    suggest: Suggest,
    evaluate: Evaluate,
    base: TrialMetrics,
    n_trials: int,
    n_startup_trials: int,
    seed: int,
    kl_target: float,
    report: Report | None = None,
    on_failure: Callable[[int, BaseException], None] | None = None,
) -> None:
    """Run (or resume) the study until ``n_trials`` trials are complete."""
    durations: list[float] = []
    failures = 0

    def run_one(trial: optuna.Trial) -> None:
        nonlocal failures
        started = time.perf_counter()
        parameters = suggest(trial)
        trial.set_user_attr(PARAMETERS_ATTR, parameters.to_dict())
        try:
            metrics = evaluate(parameters)
        except (KeyboardInterrupt, SystemExit):
            raise  # leave it RUNNING: the next run finishes it under the same number
        except Exception as error:  # a broken trial (NaN logits, ...) must not end the study
            study.tell(trial, state=TrialState.FAIL)
            failures += 1
            if on_failure:
                on_failure(trial.number, error)
            if failures >= MAX_CONSECUTIVE_FAILURES:
                raise
            return
        failures = 0
        values = objective_values(metrics, base, kl_target)
        trial.set_user_attr(METRICS_ATTR, metrics.to_dict())
        study.tell(trial, list(values))
        durations.append(time.perf_counter() - started)
        report_completed(study, report, TrialOutcome(trial.number, parameters, metrics, values, durations[-1]),
                         durations, n_trials)

    try:
        for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if len(completed_trials(study)) >= n_trials:
                break
            run_one(optuna.trial.Trial(study, stale._trial_id))
        while len(completed_trials(study)) < n_trials:
            study.sampler = seeded_sampler(seed, len(study.trials), n_startup_trials)
            run_one(study.ask())
    except UpdateFinishedTrialError as error:
        raise concurrent_writer_error(study, error) from None


def report_completed(study: optuna.Study, report: Report | None, outcome: TrialOutcome, durations: list[float],
                     n_trials: int) -> None:
    """Hand a finished trial to ``report`` with the study's completed count and an ETA from this process's trials."""
    if report is None:
        return
    done = len(completed_trials(study))
    eta = (sum(durations) / len(durations)) * max(n_trials - done, 0) if durations else None
    report(outcome, done, n_trials, eta)


def concurrent_writer_error(study: optuna.Study, error: UpdateFinishedTrialError) -> UserError:
    """Another process finished a trial this one was running: two searches of one study at once."""
    return UserError(
        f"study {study.study_name!r}",
        f"another process is running the same search and finished a trial this one was evaluating ({error}); "
        "two searches must not write one study at the same time",
        "let the other run finish (its results are in the same study), or stop it; then re-run this command, "
        "which continues the study where it stands (or pass another --study_dir / --out for a separate search)",
    )


def trial_parameters(trial: FrozenTrial) -> AbliterationParameters:
    return AbliterationParameters.from_dict(trial.user_attrs[PARAMETERS_ATTR])


def trial_metrics(trial: FrozenTrial) -> TrialMetrics:
    return TrialMetrics.from_dict(trial.user_attrs[METRICS_ATTR])
