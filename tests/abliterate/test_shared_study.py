"""A study shared by several worker processes (--storage / --workers), on a journal file and on real databases.

The workers here are real processes on a real storage (a journal file, SQLite, a throwaway PostgreSQL server);
``shared_worker.py`` stands a deterministic function in for the model, so that the tests time the
coordination, not the evaluation. The command itself is run end to end on the committed testbed.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import shared_worker
from optuna.trial import TrialState

from abliterate.cli import main
from abliterate.search.shared_study import (
    MODEL_CONTENT_ATTR,
    WORKER_ATTR,
    check_shared_model,
    open_shared_study,
    run_shared_trials,
)
from abliterate.search.storage import claim_lock, open_storage, parse_storage
from abliterate.search.study import PARAMETERS_ATTR
from foundation.errors import UserError
from tests.postgres_server import postgres_server

REPO = Path(__file__).resolve().parents[2]
TESTBED = REPO / "testbed" / "model"
WORKER = Path(__file__).with_name("shared_worker.py")


@pytest.fixture(scope="module")
def postgres_url():
    with postgres_server() as url:
        yield url


@pytest.fixture
def storage_of(tmp_path, request):
    def make(kind: str) -> str:
        if kind == "journal":
            return f"journal:{tmp_path / 'study' / 'journal.log'}"
        if kind == "sqlite":
            return f"sqlite:///{tmp_path / 'study.db'}"
        return request.getfixturevalue("postgres_url")
    return make


def _start(storage: str, name: str, n_trials: int, mode: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), storage, name, str(n_trials), mode], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen) -> tuple[int, str]:
    out, err = process.communicate(timeout=120)
    return process.returncode, out.strip() + err[-2000:]


def _study(storage: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(parse_storage(storage), 1))


@pytest.mark.parametrize("kind", ["journal", "sqlite", "postgres"])
def test_two_workers_run_exactly_the_requested_trials_with_unique_numbers(kind, storage_of):
    storage, name = storage_of(kind), f"exact-{kind}"
    processes = [_start(storage, name, 10, "run") for _ in range(2)]
    results = [_finish(process) for process in processes]
    assert all(code == 0 for code, _ in results), results
    ran = [int(output.splitlines()[0]) for _, output in results]
    trials = _study(storage, name).get_trials(deepcopy=False)
    # exactly 10 trials exist: none over the count (no surplus trial asked, then failed), none lost
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 10
    assert sorted(t.number for t in trials) == list(range(10))
    assert sum(ran) == 10
    workers = {t.user_attrs[WORKER_ATTR] for t in trials}
    assert len(workers) == sum(1 for count in ran if count)  # each trial names the process that ran it


@pytest.mark.parametrize("kind", ["journal", "postgres"])
def test_the_trial_of_a_killed_worker_is_run_again_with_its_parameters(kind, storage_of):
    storage, name = storage_of(kind), f"killed-{kind}"
    code, output = _finish(_start(storage, name, 3, "die"))
    assert code == -9 and output.splitlines()[0] == "0"  # it took trial 0, then was SIGKILLed mid-trial
    dead = _study(storage, name).get_trials(deepcopy=False)
    assert [t.state for t in dead] == [TrialState.RUNNING]  # nobody told the storage

    # a worker that waits for the study to complete (this process): trial 0's heartbeat stopped, it is failed
    # after the grace period (3 s) and queued again; this worker runs it and two new ones
    study, claim = shared_worker.open_shared(storage, name)
    ran = run_shared_trials(study, claim, suggest=shared_worker.suggest, evaluate=shared_worker.evaluate,
                            base=shared_worker.BASE, n_trials=3, n_startup_trials=2, seed=7, kl_target=0.01,
                            wait_for_all=True, poll_seconds=0.2)
    assert ran == 3
    trials = _study(storage, name).get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.FAIL] + [TrialState.COMPLETE] * 3
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE
    assert retried[0].params == dead[0].params and retried[0].params  # the same edit, not a new proposal
    assert retried[0].user_attrs[PARAMETERS_ATTR] == dead[0].user_attrs[PARAMETERS_ATTR]


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # this test's own bare study.ask()
@pytest.mark.parametrize("kind", ["journal", "postgres"])
def test_a_trial_whose_worker_died_before_its_first_heartbeat_is_retried(kind, storage_of):
    storage, name = storage_of(kind), f"orphan-{kind}"
    study, claim = shared_worker.open_shared(storage, name)
    orphan = study.ask()  # taken, then its worker died before recording a heartbeat
    orphan.suggest_float("x", 0, 1)
    ran = run_shared_trials(study, claim, suggest=shared_worker.suggest, evaluate=shared_worker.evaluate,
                            base=shared_worker.BASE, n_trials=2, n_startup_trials=2, seed=7, kl_target=0.01,
                            wait_for_all=True, poll_seconds=0.2)
    trials = study.get_trials(deepcopy=False)
    assert ran == 2 and [t.state for t in trials][:1] == [TrialState.FAIL]  # not waited for forever
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 2
    assert any(t.system_attrs.get("failed_trial") == orphan.number for t in trials)  # queued again


def test_storage_values_are_checked_before_the_model_loads(tmp_path, capsys):
    for value, expected in [("ftp://host/study", "unsupported database 'ftp'"),
                            ("sqlite://", "names no database file"),
                            ("sqlite:///:memory:", "names no database file"),
                            ("journal:", "names no file"),
                            ("postgresql://user@host:port/db", "is not a database URL")]:
        with pytest.raises(UserError) as error:
            main(["--model", str(TESTBED), "--storage", value, "--out", str(tmp_path / "out")])
        assert error.value.where == "--storage" and expected in error.value.problem, (value, error.value)
    with pytest.raises(UserError) as error:
        main(["--model", str(TESTBED), "--search_only", "--out", str(tmp_path / "out")])
    assert "--search_only needs --storage" in str(error.value)
    assert "model:" not in capsys.readouterr().out  # refused before loading


def test_a_missing_driver_or_an_unreachable_server_is_a_clear_error():
    with pytest.raises(UserError) as error:
        open_storage(parse_storage("mysql://user@127.0.0.1/studies"), 30)
    assert error.value.where == "--storage" and "driver" in error.value.problem and "pip install" in error.value.fix
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(UserError) as error:
        open_storage(parse_storage(f"postgresql://qa:secret@127.0.0.1:{port}/studies"), 30)
    assert error.value.where == "--storage" and "cannot connect" in error.value.problem
    assert "secret" not in str(error.value) and "***" in str(error.value)  # the password is masked
    assert "database server is running" in error.value.fix


def test_a_worker_with_other_model_files_is_refused(tmp_path):
    spec = parse_storage(str(tmp_path / "journal.log"))
    claim = claim_lock(spec, "model-check")
    storage = open_storage(spec, 30, claim=claim())
    study = open_shared_study(storage, spec, "model-check", claim)
    first = {"model.safetensors": "size 10, mtime_ns 1, header sha256 aa"}
    check_shared_model(study, first, "m", spec, claim)
    # another host's copy: the same content, another modification time -> the same model
    check_shared_model(study, {"model.safetensors": "size 10, mtime_ns 99, header sha256 aa"}, "m", spec, claim)
    assert study.user_attrs[MODEL_CONTENT_ATTR] == {"model.safetensors": "size 10, header sha256 aa"}
    with pytest.raises(UserError) as error:
        check_shared_model(study, {"model.safetensors": "size 12, mtime_ns 1, header sha256 bb"}, "m", spec, claim)
    assert "is not the model that study 'model-check'" in error.value.problem and "model.safetensors" in error.value.problem


def _testbed_argv(out: Path, storage: str, trials: int, *extra: str) -> list[str]:
    return ["--model", str(TESTBED), "--device_map", "cpu", "--dtypes", "float32", "--cpu_threads", "1",
            "--max_test_prompts", "8", "--max_train_prompts", "32", "--max_response_length", "8", "--kl_tokens", "2",
            "--batch_size", "8", "--n_trials", str(trials), "--n_startup_trials", str(trials), "--out", str(out),
            "--select", "best_kl_under 1.0", "--no-plot", "--storage", storage, "--heartbeat_seconds", "2", *extra]


def _completed(log: str) -> int:
    return sum(int(count) for count in re.findall(r"this worker completed (\d+) trial", log))


def test_two_workers_on_the_testbed_share_one_journal_and_the_first_writes_the_output(storage_of, tmp_path, capsys,
                                                                                     monkeypatch):
    from abliterate import workers

    # the second worker may still be importing when the first has done every trial: let it arrive and exit by
    # itself (finding nothing left) rather than being stopped, so that its log shows it joined the study
    monkeypatch.setattr(workers, "CHILD_GRACE_SECONDS", 120)
    storage, out = storage_of("journal"), tmp_path / "out"
    assert main(_testbed_argv(out, storage, 4, "--workers", "2")) == 0
    printed = capsys.readouterr().out
    chosen = json.loads((out / "chosen_trial.json").read_text())
    trials = _study(storage, chosen["study_name"]).get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4 and sorted(t.number for t in trials) == [0, 1, 2, 3]
    log = (tmp_path / "out.study" / "worker-1.log").read_text()
    assert "search-only worker" in log and "directions: " in log
    assert _completed(printed) + _completed(log) == 4  # the two processes' trials, none twice
    assert chosen["trial_number"] in range(4) and chosen["journal"] == parse_storage(storage).describe()


def test_a_search_on_postgres_resumes_and_selects_from_the_shared_study(postgres_url, tmp_path, capsys):
    """The command end to end against the server (its several workers are the stand-in tests above)."""
    out = tmp_path / "out"
    assert main(_testbed_argv(out, postgres_url, 2)) == 0
    assert "directions: stored in the shared study by this worker" in capsys.readouterr().out
    # resume: the same command with more trials continues the study and reuses its directions
    assert main(_testbed_argv(out, postgres_url, 3, "--overwrite")) == 0
    printed = capsys.readouterr().out
    assert "directions: reusing the shared study's" in printed and "2/3 complete" in printed
    chosen = json.loads((out / "chosen_trial.json").read_text())
    trials = _study(postgres_url, chosen["study_name"]).get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3 and sorted(t.number for t in trials) == [0, 1, 2]
    assert chosen["trial_number"] in range(3) and chosen["settings"]["storage"] == postgres_url  # no password here
    assert chosen["journal"] == parse_storage(postgres_url).describe()


def test_a_study_moves_between_one_process_and_a_shared_search_with_its_directions(tmp_path, capsys):
    """--workers without --storage shares the one-process study's own journal: either mode resumes the other's."""
    from safetensors.torch import load_file

    from abliterate.search.shared_study import stored_directions

    out, journal = tmp_path / "out", tmp_path / "out.study" / "journal.log"
    one_process = [arg for arg in _testbed_argv(out, "-", 2) if arg not in ("--storage", "-")]
    assert main(one_process) == 0
    chosen = json.loads((out / "chosen_trial.json").read_text())
    saved = load_file(str(journal.parent / f"{chosen['study_name']}.directions.safetensors"))["refusal_directions"]
    capsys.readouterr()
    assert main(_testbed_argv(out, f"journal:{journal}", 3, "--overwrite")) == 0  # what --workers N runs
    assert "2/3 complete" in capsys.readouterr().out
    study = _study(f"journal:{journal}", chosen["study_name"])
    assert sorted(t.number for t in study.get_trials(deepcopy=False)) == [0, 1, 2]
    assert stored_directions(study).equal(saved)  # the file's, not recomputed
    one_process[one_process.index("--n_trials") + 1] = "4"
    assert main([*one_process, "--overwrite"]) == 0
    assert "directions: reusing the study's (stored by its shared search)" in capsys.readouterr().out
    assert len(_study(f"journal:{journal}", chosen["study_name"]).get_trials(
        deepcopy=False, states=(TrialState.COMPLETE,))) == 4


def test_a_pipeline_stage_cannot_be_search_only_but_may_run_workers(tmp_path):
    from pipelines.adapters import abliterate as adapter
    from pipelines.stages import StageContext

    stage = StageContext("t", str(TESTBED), None, str(tmp_path / "out" / "abliterate"))
    with pytest.raises(UserError) as error:
        adapter.build_settings({"search_only": True, "storage": str(tmp_path / "j.log")}, stage)
    assert error.value.where == "abliterate.search_only" and "workers" in error.value.fix
    settings = adapter.build_settings({"workers": 2}, stage)
    assert settings.workers == 2 and settings.storage is None  # --workers alone shares the stage's own journal


def test_overwrite_never_deletes_the_shared_journal(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "study.log").write_text("")
    with pytest.raises(UserError) as error:
        main(["--model", str(TESTBED), "--out", str(out), "--overwrite", "--storage", f"journal:{out / 'study.log'}"])
    assert "the output contains the input --storage" in error.value.problem and "would destroy" in error.value.problem


def test_a_missing_postgresql_fails_the_tests_unless_skipping_is_asked_for(monkeypatch):
    from tests import postgres_server as server

    monkeypatch.setattr(server, "_binaries", lambda: None)
    monkeypatch.delenv(server.SKIP_VARIABLE, raising=False)
    with pytest.raises(pytest.fail.Exception, match="apt-get install -y postgresql"):
        server._require()  # CI: loud, never a silent skip
    monkeypatch.setenv(server.SKIP_VARIABLE, "1")
    with pytest.raises(pytest.skip.Exception, match="QA_SKIP_POSTGRES"):
        server._require()
