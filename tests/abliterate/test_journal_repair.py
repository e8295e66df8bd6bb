"""S13: a full disk mid-search must not leave the study stuck (half-written journal record), and says so plainly."""

from __future__ import annotations

import errno
import json

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from abliterate.search.journal import no_space_left, repaired_content
from abliterate.search.space import suggest_parameters
from abliterate.search.study import completed_trials, open_study, run_trials
from foundation.errors import UserError
from tests.abliterate.test_search import BASE, _history, _run, fake_evaluate

NAME = "resume-test"  # the study name test_search's _run uses


def _run_with_notes(journal, n_trials):
    notes = []
    study = open_study(journal, NAME, on_repair=notes.append)
    run_trials(study, suggest=lambda trial: suggest_parameters(trial, 6, ["attn", "mlp"]), evaluate=fake_evaluate,
               base=BASE, n_trials=n_trials, n_startup_trials=3, seed=7, kl_target=0.01)
    return study, notes


def _cut_last_record(journal, keep_fraction=0.5) -> bytes:
    """What a write stopped by ENOSPC leaves: the last record only partly on disk, without its newline."""
    data = journal.read_bytes()
    last_start = data.rstrip(b"\n").rfind(b"\n") + 1
    cut = last_start + int((len(data) - last_start) * keep_fraction)
    journal.write_bytes(data[:cut])
    return data[:last_start]


def test_a_half_written_last_record_is_cut_and_the_study_resumes(tmp_path):
    uninterrupted = _history(_run(tmp_path / "a.log", 5))
    journal = tmp_path / "b.log"
    _run(journal, 3)
    whole = _cut_last_record(journal)

    study, notes = _run_with_notes(journal, 5)
    assert len(notes) == 1 and "half-written last record" in notes[0] and str(journal) in notes[0]
    assert journal.read_bytes().startswith(whole)
    assert [json.loads(line) for line in journal.read_bytes().splitlines()]  # every line is a record again
    assert _history(study) == uninterrupted  # resumed as if nothing happened
    assert list(tmp_path.glob("b.log.dropped-*")), "the cut bytes are kept for inspection"
    _, notes = _run_with_notes(journal, 5)  # and the next run finds nothing to repair
    assert notes == []


def test_a_journal_already_stuck_by_an_older_version_is_split_back(tmp_path):
    """Optuna appended after the half record (what every re-run did before): the fused line fails to parse."""
    journal, elsewhere = tmp_path / "stuck.log", tmp_path / "whole.log"
    _run(journal, 2)
    whole = _cut_last_record(journal)  # journal: whole records + a partial one
    elsewhere.write_bytes(whole)
    _run(elsewhere, 4)  # what the next run appended (it read only the whole records)
    intact = elsewhere.read_bytes()
    journal.write_bytes(journal.read_bytes() + intact[len(whole):])  # ... right after the partial
    with pytest.raises(json.JSONDecodeError):  # the bug as users hit it
        optuna.load_study(study_name=NAME, storage=JournalStorage(JournalFileBackend(str(journal)))).get_trials()

    notes = []
    study = open_study(journal, NAME, on_repair=notes.append)
    assert notes and "split 1 half-written record" in notes[0]
    assert _history(study) == _history(_run(elsewhere, 4))
    assert journal.read_bytes().startswith(intact)  # (opening a study appends a create-study record)


def test_a_journal_damaged_otherwise_is_refused_not_guessed(tmp_path):
    with pytest.raises(UserError, match=r"j.log:2: is not an Optuna journal record"):
        repaired_content(b'{"op_code":0}\ngarbage\n{"op_code":1}\n', "j.log")
    assert repaired_content(b'{"op_code":0}\n{"op_co', "j.log") == (b'{"op_code":0}\n', b'{"op_co', 0)


def test_no_space_left_is_a_plain_message_and_the_rerun_recovers(tmp_path, monkeypatch):
    journal = tmp_path / "full.log"
    _run(journal, 2)
    real_append = JournalFileBackend.append_logs

    def disk_full(self, logs):
        text = "\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n"
        with open(self._file_path, "ab") as file:
            file.write(text.encode()[: len(text) // 2])  # what fit before the disk was full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(JournalFileBackend, "append_logs", disk_full)
    with pytest.raises(UserError) as caught:
        with no_space_left(journal):
            _run(journal, 4)
    assert f"no space left on device at {journal}" in str(caught.value)
    assert "re-run the same command" in str(caught.value)

    monkeypatch.setattr(JournalFileBackend, "append_logs", real_append)  # space freed
    study, notes = _run_with_notes(journal, 4)
    assert notes and len(completed_trials(study)) == 4
