"""A shared study as the abliterate run uses it: opened from ``--storage``, its directions, its trial loop."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import optuna
import torch
from rich.console import Console
from rich.markup import escape

from abliterate.search.journal import no_space_left
from abliterate.search.shared_study import (
    Claim,
    check_shared_model,
    open_shared_study,
    reachable,
    run_shared_trials,
    shared_directions,
    worker_name,
)
from abliterate.search.storage import (
    StorageSpec,
    claim_lock,
    open_storage,
    parse_storage,
)
from abliterate.settings import AbliterateSettings
from foundation.model_fingerprint import model_fingerprint


@dataclass
class SharedSearch:
    settings: AbliterateSettings
    spec: StorageSpec
    claim: Claim
    study: optuna.Study
    console: Console

    @classmethod
    def open(cls, settings: AbliterateSettings, name: str, console: Console,
             on_repair: Callable[[str], None] | None = None) -> SharedSearch:
        spec = parse_storage(settings.storage)
        with cls._guarded(spec):
            claim = claim_lock(spec, name)
            storage = open_storage(spec, settings.heartbeat_seconds, on_repair=on_repair, claim=claim())
            study = open_shared_study(storage, spec, name, claim)
            check_shared_model(study, model_fingerprint(settings.model), settings.model, spec, claim)
            prefix = name.rsplit("-", 1)[0] + "-"
            others = [other for other in optuna.get_all_study_names(storage) if other.startswith(prefix) and other != name]
            trials = study.get_trials(deepcopy=False)
        if others:  # a worker started with other settings, or the model at another path, is in another study
            console.print(f"[yellow]note:[/] {escape(spec.describe())} also holds {escape(', '.join(others))}: studies of "
                          "the same model name with other settings or another model path; workers of one search must "
                          "be started with the same settings and the model at the same path")
        states = [t.state.name for t in trials]
        console.print(f"shared study {escape(name)} in {escape(spec.describe())}: {states.count('COMPLETE')}/"
                      f"{settings.n_trials} complete, {states.count('RUNNING')} running; this worker is {worker_name()}",
                      highlight=False)
        return cls(settings, spec, claim, study, console)

    @staticmethod
    @contextlib.contextmanager
    def _guarded(spec: StorageSpec):
        with contextlib.ExitStack() as stack:
            if spec.local_file() is not None:
                stack.enter_context(no_space_left(spec.local_file()))
            stack.enter_context(reachable(spec))
            yield

    def directions(self, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        with self._guarded(self.spec):
            directions, computed = shared_directions(self.study, self.claim, compute)
        self.console.print("directions: stored in the shared study by this worker" if computed
                           else "directions: reusing the shared study's (computed by its first worker)")
        return directions

    def run(self, search: dict, console: Console) -> int:
        with self._guarded(self.spec):
            ran = run_shared_trials(self.study, self.claim, wait_for_all=not self.settings.search_only,
                                    on_note=lambda note: console.print(f"[yellow]note:[/] {note}"), **search)
        console.print(f"this worker completed {ran} trial(s) of the shared study")
        return ran
