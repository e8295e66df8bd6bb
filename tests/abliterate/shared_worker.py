"""A real worker process of a shared study, with a stand-in evaluation (the model is not what these tests test).

    python shared_worker.py STORAGE STUDY N_TRIALS run   # take and run trials until none is left, print the count
    python shared_worker.py STORAGE STUDY N_TRIALS die   # take one trial, then SIGKILL itself mid-trial
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from abliterate.edits.plan import AbliterationParameters
from abliterate.search.objectives import TrialMetrics
from abliterate.search.shared_study import (
    _take_trial,
    open_shared_study,
    run_shared_trials,
)
from abliterate.search.space import suggest_parameters
from abliterate.search.storage import claim_lock, open_storage, parse_storage
from abliterate.search.study import PARAMETERS_ATTR

BASE = TrialMetrics(refusals=20, n_harmful=20, compliance=0, kl=0.0, kl_first_token=0.0, seconds=0.0)
HEARTBEAT_SECONDS = 1


def suggest(trial):
    return suggest_parameters(trial, 6, ["attn", "mlp"])


def evaluate(parameters: AbliterationParameters) -> TrialMetrics:
    time.sleep(0.05)  # long enough for the workers' trials to overlap
    index = parameters.direction_index if parameters.direction_index is not None else 3.0
    refusals = min(20, int(abs(index - 4.5) * 8))
    return TrialMetrics(refusals, 20, 20 - refusals, 0.01 * sum(k.max_weight for k in parameters.kernels.values()),
                        0.001, 0.0)


def open_shared(storage: str, name: str):
    spec = parse_storage(storage)
    claim = claim_lock(spec, name)
    backend = open_storage(spec, HEARTBEAT_SECONDS, claim=claim())
    return open_shared_study(backend, spec, name, claim), claim


def main(storage: str, name: str, n_trials: int, mode: str) -> None:
    study, claim = open_shared(storage, name)
    if mode == "die":
        with claim():
            trial, _ = _take_trial(study, n_trials, n_startup_trials=2, seed=7)
        trial.set_user_attr(PARAMETERS_ATTR, suggest(trial).to_dict())
        print(trial.number, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # killed mid-trial: no tell, no more heartbeats
    ran = run_shared_trials(study, claim, suggest=suggest, evaluate=evaluate, base=BASE, n_trials=n_trials,
                            n_startup_trials=2, seed=7, kl_target=0.01, wait_for_all=mode == "wait", poll_seconds=0.2)
    print(ran, flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
