"""A study belongs to the model content it was started on, not only to its path.

The study's name (``naming.study_name``) hashes the model's path, so that
names stay what users have on disk; the content is kept next to it, as the
study's user attribute ``model_fingerprint`` (``foundation.model_fingerprint``:
size, modification time and header hash of every weights file). A re-run
against a model replaced at the same path finds another fingerprint: its old
trials and directions were measured on another model, so they are discarded,
saying so, and the search starts over. (Studies begun before fingerprints were
recorded adopt the current one, with a note.)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from rich.console import Console
from rich.markup import escape

from abliterate.search.study import open_study
from foundation.model_fingerprint import changed_files

FINGERPRINT_ATTR = "model_fingerprint"


def open_study_of_model(journal: Path, name: str, fingerprint: dict[str, str] | None, model: str, directions: Path,
                        console: Console, on_repair: Callable[[str], None] | None = None) -> optuna.Study:
    """The study ``name`` in ``journal``; a fresh one when the model changed since the recorded one began."""
    study = open_study(journal, name, on_repair=on_repair)
    if fingerprint is None:  # a Hub id: its revision is the identity, nothing on disk to compare
        return study
    recorded = study.user_attrs.get(FINGERPRINT_ATTR)
    if recorded is None:
        if study.trials:
            console.print(f"[yellow]note:[/] study {escape(name)} predates model fingerprints; "
                          f"assuming {escape(model)} is the model it was started on")
        study.set_user_attr(FINGERPRINT_ATTR, fingerprint)
        return study
    if recorded == fingerprint:
        return study
    changes = "; ".join(changed_files(recorded, fingerprint))
    console.print(f"[bold yellow]model changed:[/] {escape(model)} is not the model study {escape(name)} was started on "
                  f"({escape(changes)}): discarding its {len(study.trials)} trial(s) and its refusal directions, "
                  "and starting the search over")
    directions.unlink(missing_ok=True)  # first: a run killed in between must not reuse stale directions
    optuna.delete_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(journal))))
    fresh = open_study(journal, name)
    fresh.set_user_attr(FINGERPRINT_ATTR, fingerprint)
    return fresh
