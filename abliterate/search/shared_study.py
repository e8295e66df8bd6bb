"""One study searched by several workers at once (``--storage`` / ``--workers``).

Each worker holds its own copy of the model and loops:

1. under the claim lock (``storage.claim_lock``): fail the running trials whose heartbeat stopped (their worker
   was killed; Optuna's ``RetryHeartbeatStaleTrialCallback`` queues each again, WAITING, with its parameters),
   count the trials, and if COMPLETE + RUNNING < n_trials take the next one (``study.ask`` pops a queued retry
   first) and record its first heartbeat. Counting and asking under one lock is what keeps the total exact:
   Optuna's ``MaxTrialsCallback`` counts without a lock, and N workers overshoot by up to N - 1 trials;
2. evaluate it with a heartbeat thread running, and tell the result.

A worker with nothing left to take either stops (``wait_for_all=False``: the extra workers of ``--workers``)
or waits for the others' trials (the worker that then selects and writes the output), taking over any that a
killed worker left. Trial numbers are the storage's, unique across workers. The refusal directions are
computed once, by the first worker, and kept in the study itself, so that every worker (on any host) edits
with the same ones and a resumed study reuses them.
"""

from __future__ import annotations

import base64
import contextlib
import os
import socket
import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import optuna
import torch
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages._heartbeat import HeartbeatThread
from optuna.trial import TrialState
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from abliterate.search.objectives import TrialMetrics, objective_values
from abliterate.search.storage import FLAG, StorageSpec
from abliterate.search.study import (
    MAX_CONSECUTIVE_FAILURES,
    METRICS_ATTR,
    PARAMETERS_ATTR,
    Evaluate,
    Report,
    Suggest,
    TrialOutcome,
    report_completed,
    seeded_sampler,
)
from foundation.errors import UserError
from foundation.model_fingerprint import changed_files

if TYPE_CHECKING:
    from optuna.storages import BaseStorage

WORKER_ATTR = "worker"  # host:pid of the process that ran the trial
MODEL_CONTENT_ATTR = "model_content"  # the model fingerprint without modification times (they differ across hosts)
DIRECTIONS_ATTR = "refusal_directions"  # safetensors bytes, base64, in chunks (MySQL's TEXT holds 64 KiB)
DIRECTIONS_CHUNK = 48_000

Claim = Callable[[], contextlib.AbstractContextManager]


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def open_shared_study(storage: BaseStorage, spec: StorageSpec, name: str, claim: Claim) -> optuna.Study:
    with claim(), reachable(spec):
        return optuna.create_study(study_name=name, storage=storage, directions=["minimize", "minimize"],
                                   load_if_exists=True)


@contextlib.contextmanager
def reachable(spec: StorageSpec):
    """A database that goes away mid-search is a UserError naming --storage, not a SQLAlchemy traceback."""
    try:
        yield
    except Exception as error:
        if type(error).__module__.startswith("sqlalchemy") and type(error).__name__ in ("OperationalError",
                                                                                         "InterfaceError"):
            raise UserError(FLAG, f"lost the connection to {spec.describe()} ({str(error).splitlines()[0]})",
                            "check the database server, then re-run the same command: the study continues") from None
        raise


def _content(fingerprint: dict[str, str]) -> dict[str, str]:
    return {name: ", ".join(part for part in text.split(", ") if not part.startswith("mtime_ns "))
            for name, text in fingerprint.items()}


def check_shared_model(study: optuna.Study, fingerprint: dict[str, str] | None, model: str, spec: StorageSpec,
                       claim: Claim) -> None:
    """Every worker of a shared study must hold the model it began on; a mismatch stops this worker.

    (The single-process study discards itself and starts over when its model changed; a shared study may have
    other workers running, so it is never deleted by one of them.)
    """
    if fingerprint is None:  # a Hub id: its revision is the identity
        return
    current = _content(fingerprint)
    with claim():
        recorded = study.user_attrs.get(MODEL_CONTENT_ATTR)
        if recorded is None:
            study.set_user_attr(MODEL_CONTENT_ATTR, current)
            return
    if recorded != current:
        changes = "; ".join(changed_files(recorded, current))
        raise UserError(model, f"is not the model that study {study.study_name!r} in {spec.describe()} was started "
                               f"on ({changes})",
                        "give every worker the same model files; to search a changed model, start a new study "
                        f"(another {FLAG}, or delete this one: optuna delete-study --storage URL --study-name NAME)")


def stored_directions(study: optuna.Study) -> torch.Tensor | None:
    """The directions a shared search kept in ``study``, if it did."""
    attrs = study.user_attrs
    count = attrs.get(DIRECTIONS_ATTR)
    if count is None:
        return None
    data = base64.b64decode("".join(attrs[f"{DIRECTIONS_ATTR}.{i}"] for i in range(count)))
    return load_tensors(data)["refusal_directions"]


def shared_directions(study: optuna.Study, claim: Claim, compute: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """(the study's refusal directions, whether this worker computed them): the first worker computes, under the
    claim lock, while later ones wait for them."""
    with claim():
        stored = stored_directions(study)
        if stored is not None:
            return stored, False
        directions = compute()
        text = base64.b64encode(save_tensors({"refusal_directions": directions.contiguous()})).decode()
        chunks = [text[i:i + DIRECTIONS_CHUNK] for i in range(0, len(text), DIRECTIONS_CHUNK)]
        for index, chunk in enumerate(chunks):
            study.set_user_attr(f"{DIRECTIONS_ATTR}.{index}", chunk)
        study.set_user_attr(DIRECTIONS_ATTR, len(chunks))  # last: a worker killed mid-way leaves no count
        return directions, True


def _fail_stale_trials(study: optuna.Study) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    _fail_database_orphans(study)


def _fail_database_orphans(study: optuna.Study) -> None:
    """RUNNING trials of a database without any heartbeat row: their worker died between taking them and its first
    heartbeat (both happen under the claim lock, which this runs under). Optuna's staleness query joins on the
    heartbeat table and never sees them: left alone, the study would wait for them forever."""
    storage = study._storage
    database = getattr(storage, "_backend", storage)  # Optuna wraps an RDBStorage in its _CachedStorage
    if not isinstance(database, optuna.storages.RDBStorage):
        return
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if not running:
        return
    with _create_scoped_session(database.scoped_session) as session:
        orphans = [t._trial_id for t in running if models.TrialHeartbeatModel.where_trial_id(t._trial_id, session) is None]
    callback = storage.get_heartbeat_stale_trial_callback()
    for trial_id in orphans:
        with contextlib.suppress(UpdateFinishedTrialError):
            if storage.set_trial_state_values(trial_id, state=TrialState.FAIL) and callback is not None:
                callback(study, storage.get_trial(trial_id))


def _take_trial(study: optuna.Study, n_trials: int, n_startup_trials: int, seed: int) -> tuple[optuna.Trial | None, int]:
    """Under the claim lock: (the next trial or None, how many are complete)."""
    _fail_stale_trials(study)
    trials = study.get_trials(deepcopy=False)
    complete = sum(t.state == TrialState.COMPLETE for t in trials)
    running = sum(t.state == TrialState.RUNNING for t in trials)
    if complete + running >= n_trials:
        return None, complete
    study.sampler = seeded_sampler(seed, len(trials), n_startup_trials)
    with warnings.catch_warnings():  # "heartbeat is supposed to be used with optimize": we run it ourselves
        warnings.filterwarnings("ignore", message="Heartbeat of storage")
        trial = study.ask()
    study._storage.record_heartbeat(trial._trial_id)  # before the lock is released: see HeartbeatJournalStorage
    return trial, complete


def run_shared_trials(
    study: optuna.Study,
    claim: Claim,
    *,
    suggest: Suggest,
    evaluate: Evaluate,
    base: TrialMetrics,
    n_trials: int,
    n_startup_trials: int,
    seed: int,
    kl_target: float,
    wait_for_all: bool,
    poll_seconds: float = 2.0,
    report: Report | None = None,
    on_failure: Callable[[int, BaseException], None] | None = None,
    on_note: Callable[[str], None] | None = None,
) -> int:
    """Take and run trials until the study has ``n_trials`` complete (or, without ``wait_for_all``, until none is
    left to take); returns how many this worker completed."""
    durations: list[float] = []
    failures = ran = 0
    worker = worker_name()
    while True:
        with claim():
            trial, complete = _take_trial(study, n_trials, n_startup_trials, seed)
        if trial is None:
            if complete >= n_trials or not wait_for_all:
                return ran
            time.sleep(poll_seconds)  # the others' trials are running; a killed one's is retried by whoever is here
            continue
        started = time.perf_counter()
        heartbeat = HeartbeatThread(trial._trial_id, study._storage)
        heartbeat.start()
        try:
            parameters = suggest(trial)
            trial.set_user_attr(PARAMETERS_ATTR, parameters.to_dict())
            trial.set_user_attr(WORKER_ATTR, worker)
            try:
                metrics = evaluate(parameters)
            except (KeyboardInterrupt, SystemExit):
                raise  # left RUNNING: its heartbeat stops, and a worker (or the next run) retries it
            except Exception as error:  # a broken trial must not end the study
                with contextlib.suppress(UpdateFinishedTrialError):
                    study.tell(trial, state=TrialState.FAIL)
                failures += 1
                if on_failure:
                    on_failure(trial.number, error)
                if failures >= MAX_CONSECUTIVE_FAILURES:
                    raise
                continue
        except UpdateFinishedTrialError:
            continue  # failed as stale by another worker before we began: it is queued again
        finally:
            heartbeat.join()
        failures = 0
        values = objective_values(metrics, base, kl_target)
        try:
            trial.set_user_attr(METRICS_ATTR, metrics.to_dict())
            study.tell(trial, list(values))
        except UpdateFinishedTrialError:
            if on_note:
                on_note(f"trial {trial.number} missed its heartbeats and was taken as dead by another worker (it is "
                        "queued again); this worker's result for it is dropped")
            continue
        ran += 1
        durations.append(time.perf_counter() - started)
        report_completed(study, report, TrialOutcome(trial.number, parameters, metrics, values, durations[-1]),
                         durations, n_trials)
