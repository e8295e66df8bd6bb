"""Runner behaviour (ordering, skipping, resuming, errors) with small real stage adapters.

The adapters here are ordinary modules written to tmp_path and imported by the
stage child process, exactly as the real ones are; they count their runs in a
file so the tests can see which stages really executed.
"""

from __future__ import annotations

import json
import textwrap

import pytest

from foundation.errors import UserError
from pipelines import runner, stages
from pipelines.spec import load_pipeline

FAKE_ADAPTER = '''
import json, os
from pathlib import Path
from pydantic import BaseModel, ConfigDict

class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    factor: int = 1
    fail: bool = False

def build_settings(user_settings, context):
    return Settings(**user_settings)

def run(settings, context):
    log = Path(os.environ["FAKE_STAGE_LOG"])
    log.write_text(log.read_text() + "{name}\\n" if log.exists() else "{name}\\n")
    if settings.fail:
        raise RuntimeError("planned failure")
    previous = int(Path(context.input_dir, "value.txt").read_text()) if context.input_dir else 1
    Path(context.stage_dir, "value.txt").write_text(str(previous * settings.factor))
    return {{"evaluations": [{{"label": "{name}", "refusals": 0.5, "kl": 0.01}}]}}
'''


def route_stage_processes(directory, mapping: dict[str, str]) -> None:
    """The stage process takes its adapter from ``pipelines.stages.ADAPTER_MODULES`` only (never from the
    request file), so a test reroutes it there, in the child too: a ``sitecustomize`` on its PYTHONPATH."""
    (directory / "sitecustomize.py").write_text(
        "import os, sys\n"
        "sys.path.insert(0, os.getcwd())  # this checkout's pipelines package, as 'python -m' would find it\n"
        "from pipelines import stages\n"
        f"stages.ADAPTER_MODULES.update({mapping!r})\n")


@pytest.fixture
def fake_stages(tmp_path, monkeypatch):
    package = tmp_path / "fakeadapters"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in stages.ADAPTER_MODULES:
        (package / f"{name}.py").write_text(FAKE_ADAPTER.format(name=name))
        monkeypatch.setitem(stages.ADAPTER_MODULES, name, f"fakeadapters.{name}")
    route_stage_processes(tmp_path, {name: f"fakeadapters.{name}" for name in stages.ADAPTER_MODULES})
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    log = tmp_path / "runs.log"
    monkeypatch.setenv("FAKE_STAGE_LOG", str(log))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    return tmp_path, log


def write_pipeline(directory, body: str):
    path = directory / "pipe.yaml"
    path.write_text(textwrap.dedent(body))
    return path


def executed(log) -> list[str]:
    return log.read_text().split() if log.exists() else []


def test_runs_in_order_then_skips_unchanged_stages(fake_stages):
    tmp, log = fake_stages
    pipe = write_pipeline(tmp, """
        name: t
        model: model
        output_dir: out
        stages:
          - quantize: {factor: 2}
          - abliterate: {factor: 3}
          - export: {factor: 5}
    """)
    out = tmp / "out"
    assert runner.main([str(pipe), "--output_dir", str(out)]) == 0
    assert executed(log) == ["quantize", "abliterate", "export"]
    assert (out / "export" / "value.txt").read_text() == "30"
    manifest = json.loads((out / "manifest.json").read_text())
    assert [manifest["stages"][s]["status"] for s in ("quantize", "abliterate", "export")] == ["complete"] * 3
    assert manifest["source_model"]["files"] == {"config.json": manifest["source_model"]["files"]["config.json"]}
    assert manifest["stages"]["quantize"]["peak_rss_mib"] > 0

    assert runner.main([str(pipe), "--output_dir", str(out)]) == 0
    assert executed(log) == ["quantize", "abliterate", "export"], "unchanged stages must be skipped"

    assert runner.main([str(pipe), "--output_dir", str(out), "--set", "abliterate.factor=7"]) == 0
    assert executed(log)[3:] == ["abliterate", "export"], "a changed stage and everything after it are redone"
    assert (out / "export" / "value.txt").read_text() == "70"

    assert runner.main([str(pipe), "--output_dir", str(out), "--set", "abliterate.factor=7", "--from", "export"]) == 0
    assert executed(log)[5:] == ["export"]


def test_failed_stage_is_recorded_and_redone(fake_stages):
    tmp, log = fake_stages
    pipe = write_pipeline(tmp, """
        name: t
        model: model
        output_dir: out
        stages:
          - quantize: {}
          - abliterate: {fail: true}
    """)
    out = tmp / "out"
    assert runner.main([str(pipe), "--output_dir", str(out)]) == 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["abliterate"]["status"] == "failed"
    assert "planned failure" in manifest["stages"]["abliterate"]["error"]
    assert not (out / "abliterate").exists(), "a failed stage leaves no partial output"
    assert runner.main([str(pipe), "--output_dir", str(out), "--set", "abliterate.fail=false"]) == 0
    assert executed(log) == ["quantize", "abliterate", "abliterate"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("name: t\nmodel: model\noutput_dir: o\nstages: [quantize]\ncolour: red\n", "field 'colour': unknown key"),
        ("name: t\nmodel: nowhere/at/all\noutput_dir: o\nstages: [quantize]\n", "field 'model'"),
        ("name: t\nmodel: model\noutput_dir: o\nstages: [export]\n", "needs stage 'abliterate' before it"),
        ("name: t\nmodel: model\noutput_dir: o\nstages: [abliterate, quantize]\n", "cannot come after 'abliterate'"),
        ("name: t\nmodel: model\noutput_dir: o\nstages: [quantize, quantize]\n", "appears twice"),
        ("name: t\nmodel: model\noutput_dir: o\nstages: [train]\n", "unknown stage 'train'"),
        ("name: t\nmodel: model\nstages: [quantize]\n", "field 'output_dir'"),
    ],
)
def test_bad_pipeline_files_give_clear_errors(fake_stages, body, message):
    tmp, _ = fake_stages
    path = tmp / "bad.yaml"
    path.write_text(body)
    with pytest.raises(UserError, match=message) as error:
        load_pipeline(path)
    assert str(path) in str(error.value)


def test_existing_foreign_output_dir_is_not_overwritten(fake_stages):
    tmp, log = fake_stages
    pipe = write_pipeline(tmp, "name: t\nmodel: model\noutput_dir: out\nstages: [quantize]\n")
    out = tmp / "out"
    out.mkdir()
    (out / "precious.txt").write_text("user data")
    with pytest.raises(UserError, match="--overwrite"):
        runner.main([str(pipe), "--output_dir", str(out)])
    assert (out / "precious.txt").exists() and not executed(log)


@pytest.mark.parametrize("output", ["model", ".", "model/out"])
def test_overwrite_never_deletes_the_model_or_the_working_directory(fake_stages, monkeypatch, output):
    """S12 / security 4: output_dir = the model folder (or one holding it) used to be rmtree'd by --overwrite."""
    tmp, log = fake_stages
    monkeypatch.chdir(tmp)
    pipe = write_pipeline(tmp, "name: t\nmodel: model\noutput_dir: out\nstages: [quantize]\n")
    with pytest.raises(UserError) as caught:
        runner.main([str(pipe), "--output_dir", output, "--overwrite"])
    assert "output_dir" in str(caught.value) and "--overwrite" in str(caught.value)
    assert (tmp / "model" / "config.json").is_file() and pipe.is_file() and not executed(log)


def test_a_second_run_on_the_same_output_dir_is_refused_naming_the_first(fake_stages, monkeypatch):
    """S14: two `make pipeline ARGS="--output_dir D"` at once; the second must not touch D."""
    import os
    import subprocess
    import sys
    import time

    tmp, _ = fake_stages
    out = tmp / "out"
    started = tmp / "started"
    slow = FAKE_ADAPTER.format(name="quantize").replace(
        "    if settings.fail:", f"    Path({str(started)!r}).write_text('x')\n    import time; time.sleep(600)\n    if settings.fail:")
    (tmp / "fakeadapters" / "quantize.py").write_text(slow)
    pipe = write_pipeline(tmp, "name: t\nmodel: model\noutput_dir: out\nstages: [quantize]\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp), os.getcwd()]))
    first = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "run", str(pipe), "--output_dir", str(out)],
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not started.exists():
            assert time.monotonic() < deadline and first.poll() is None, "the first run never started its stage"
            time.sleep(0.05)
        manifest_before = (out / "manifest.json").read_bytes()
        with pytest.raises(UserError) as caught:
            runner.main([str(pipe), "--output_dir", str(out)])
        message = str(caught.value)
        assert f"pid {first.pid}" in message and "--output_dir" in message and "since" in message
        assert (out / "manifest.json").read_bytes() == manifest_before
    finally:
        os.killpg(first.pid, 9)
        first.wait()


@pytest.mark.parametrize("name", ["testbed_default", "testbed_judge", "testbed_hard", "llama3_8b", "qwen3_30b_a3b_moe", "nemotron_h_9b",
                                  "llama3_70b_offload"])
def test_shipped_pipelines_validate_against_the_stages_own_settings(name, tmp_path):
    from pathlib import Path

    spec = load_pipeline(Path(runner.__file__).parent / f"{name}.yaml")
    runner.validate_all(spec, tmp_path)
    assert [stage.name for stage in spec.stages] == ["quantize", "abliterate", "export"]


def test_a_stage_setting_typo_names_the_stage_and_field(tmp_path):
    from pathlib import Path

    spec = load_pipeline(Path(runner.__file__).parent / "testbed_default.yaml")
    spec.stages[1].settings["n_trails"] = 5
    with pytest.raises(UserError, match="pipeline stage 'abliterate': field 'n_trails'"):
        runner.validate_all(spec, tmp_path)
    spec.stages[1].settings.pop("n_trails")
    spec.stages[0].settings["output_model"] = "x"
    with pytest.raises(UserError, match="set by the pipeline itself"):
        runner.validate_all(spec, tmp_path)


def test_a_stage_setting_typo_suggests_the_name_and_a_bad_value_points_at_help(tmp_path):
    from pathlib import Path

    spec = load_pipeline(Path(runner.__file__).parent / "testbed_default.yaml")
    spec.stages[1].settings["n_trails"] = 5
    with pytest.raises(UserError) as caught:
        runner.validate_all(spec, tmp_path)
    assert caught.value.fix.startswith("did you mean 'n_trials'?")
    spec.stages[1].settings.pop("n_trails")
    spec.stages[1].settings["n_trials"] = "abc"
    with pytest.raises(UserError, match="field 'n_trials'") as caught:
        runner.validate_all(spec, tmp_path)
    assert "quant-abliterate abliterate --help" in caught.value.fix and "valid settings" not in caught.value.fix
    spec.stages[1].settings["n_trials"] = 5
    spec.stages[1].settings["select"] = "best 3"  # caught here, not after the whole search
    with pytest.raises(UserError, match="field 'select'.*cannot read 'best 3'"):
        runner.validate_all(spec, tmp_path)


def test_interrupted_stage_is_marked_interrupted_and_redone(fake_stages, monkeypatch):
    tmp, log = fake_stages
    pipe = write_pipeline(tmp, """
        name: t
        model: model
        output_dir: out
        stages:
          - quantize: {}
          - abliterate: {}
    """)
    out = tmp / "out"
    real_run_stage_process = runner.run_stage_process

    def ctrl_c_during_abliterate(stage, *args):
        if stage == "abliterate":
            raise KeyboardInterrupt
        return real_run_stage_process(stage, *args)

    monkeypatch.setattr(runner, "run_stage_process", ctrl_c_during_abliterate)
    with pytest.raises(KeyboardInterrupt):
        runner.main([str(pipe), "--output_dir", str(out)])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["quantize"]["status"] == "complete"
    assert manifest["stages"]["abliterate"]["status"] == "interrupted"

    monkeypatch.setattr(runner, "run_stage_process", real_run_stage_process)
    assert runner.main([str(pipe), "--output_dir", str(out)]) == 0
    assert executed(log) == ["quantize", "abliterate"], "only the interrupted stage is redone"
    assert json.loads((out / "manifest.json").read_text())["stages"]["abliterate"]["status"] == "complete"


SLOW_ADAPTER = '''
import time
from pathlib import Path

def build_settings(user_settings, context):
    return user_settings

def run(settings, context):
    Path(context.stage_dir, "partial.bin").write_text("half")
    Path(settings["started"]).write_text("started")
    time.sleep(60)
    return {}
'''


def test_stage_process_stops_when_the_runner_is_killed(tmp_path, monkeypatch):
    """kill -9 of the runner must not leave its stage running on (and writing) as an orphan."""
    import os
    import signal
    import subprocess
    import sys
    import time

    (tmp_path / "slowadapter.py").write_text(SLOW_ADAPTER)
    route_stage_processes(tmp_path, {"abliterate": "slowadapter"})
    started = tmp_path / "started"
    stage_dir = tmp_path / "out" / "abliterate"
    request = tmp_path / "request.json"
    request.write_text(json.dumps({
        "stage": "abliterate", "settings": {"started": str(started)},
        "result_path": str(tmp_path / "result.json"),
        "context": {"pipeline_name": "t", "source_model": "m", "input_dir": None, "stage_dir": str(stage_dir)},
    }))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.getcwd()]))
    runner_stand_in = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys; subprocess.run([sys.executable, '-m', 'pipelines.stage_exec', sys.argv[1]])"
    ), str(request)])
    deadline = time.monotonic() + 60
    while not started.exists():
        assert time.monotonic() < deadline and runner_stand_in.poll() is None, "the stage never started"
        time.sleep(0.05)
    from foundation.atomic_output import temporary_dirs

    [temporary] = temporary_dirs(stage_dir)
    assert (temporary / "partial.bin").exists()

    os.kill(runner_stand_in.pid, signal.SIGKILL)
    runner_stand_in.wait()
    deadline = time.monotonic() + 15
    while temporary.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not temporary.exists(), "the orphaned stage kept running (its temporary output is still there)"
    assert not stage_dir.exists() and not (tmp_path / "result.json").exists()


def test_a_missing_calibration_mix_is_reported_before_any_stage_runs(tmp_path):
    from pathlib import Path

    spec = load_pipeline(Path(runner.__file__).parent / "testbed_default.yaml")
    spec.stages[0].settings["dataset_yaml"] = str(tmp_path / "nowhere.yaml")
    with pytest.raises(UserError, match="pipeline stage 'quantize': dataset_yaml.*no such file"):
        runner.validate_all(spec, tmp_path)


def test_the_stage_module_never_comes_from_the_request_file(tmp_path, monkeypatch):
    """<output_dir>/.<stage>-request.json is a file anyone with write access to the output can edit: an
    'adapter' it names must not be imported, and a stage outside the fixed table is refused."""
    import os
    import subprocess
    import sys

    (tmp_path / "evil.py").write_text("from pathlib import Path\nPath(__file__).with_name('pwned').write_text('x')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.getcwd()]))
    for stage in ("evil", "export"):
        request = tmp_path / "request.json"
        request.write_text(json.dumps({
            "stage": stage, "adapter": "evil", "settings": {"no_such_setting": 1},
            "result_path": str(tmp_path / "result.json"),
            "context": {"pipeline_name": "t", "source_model": "m", "input_dir": None, "stage_dir": str(tmp_path / "out")},
        }))
        process = subprocess.run([sys.executable, "-m", "pipelines.stage_exec", str(request)], capture_output=True, text=True)
        assert process.returncode != 0
        assert not (tmp_path / "pwned").exists(), f"stage {stage!r}: the module named in the request file was imported"
        if stage == "evil":
            assert "unknown stage 'evil'" in process.stderr
