"""Runner behaviour (ordering, skipping, resuming, errors) with small real stage adapters.

The adapters here are ordinary modules written to tmp_path and imported by the
stage child process, exactly as the real ones are; they count their runs in a
file so the tests can see which stages really executed.
"""

from __future__ import annotations

import json
import textwrap

import pytest

from pipelines import runner, stages
from pipelines.spec import load_pipeline
from quantize.errors import UserError

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


@pytest.fixture
def fake_stages(tmp_path, monkeypatch):
    package = tmp_path / "fakeadapters"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in stages.ADAPTER_MODULES:
        (package / f"{name}.py").write_text(FAKE_ADAPTER.format(name=name))
        monkeypatch.setitem(stages.ADAPTER_MODULES, name, f"fakeadapters.{name}")
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


@pytest.mark.parametrize("name", ["testbed_default", "llama3_8b", "qwen3_30b_a3b_moe", "nemotron_h_9b",
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
