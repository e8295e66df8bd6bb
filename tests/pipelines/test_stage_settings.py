"""A pipeline stage runs with its YAML block alone, and its fingerprint covers every setting it runs with."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from pipelines import runner, stages
from pipelines.adapters import abliterate as abliterate_adapter
from pipelines.adapters import export as export_adapter
from pipelines.manifest import OUTPUT_DIR, fingerprint, settings_used
from pipelines.stages import StageContext
from tests.pipelines.test_runner import route_stage_processes

# A stage whose default is read when the module is imported, as a new version of the code would change it.
DEFAULT_ADAPTER = '''
import os
from pathlib import Path
from pydantic import BaseModel, ConfigDict

class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    factor: int = int(os.environ.get("FAKE_DEFAULT_FACTOR", "1"))
    out: str = ""

def build_settings(user_settings, context):
    return Settings(**user_settings, out=str(Path(context.stage_dir) / "value.txt"))

def run(settings, context):
    log = Path(os.environ["FAKE_STAGE_LOG"])
    log.write_text((log.read_text() if log.exists() else "") + f"{settings.factor}\\n")
    Path(settings.out).write_text(str(settings.factor))
    return {}
'''


@pytest.fixture
def foreign_sources(tmp_path, monkeypatch):
    """What the direct CLI would read: QA_* variables and ./config.toml."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.toml").write_text("[abliterate]\nn_trials = 9\nkl_target = 0.5\n")
    monkeypatch.setenv("QA_N_TRIALS", "7")
    monkeypatch.setenv("QA_SEED", "3")
    return tmp_path


def context(tmp_path: Path, stage: str) -> StageContext:
    return StageContext("t", str(tmp_path / "model"), str(tmp_path / "out" / "quantize" / "checkpoint"),
                        str(tmp_path / "out" / stage))


def test_env_and_config_toml_do_not_reach_a_pipeline_stage(foreign_sources):
    from abliterate.settings import parse_settings

    assert parse_settings(["--model", "m"]).n_trials == 7  # the direct CLI does read them
    settings = abliterate_adapter.build_settings({}, context(foreign_sources, "abliterate"))
    assert (settings.n_trials, settings.seed, settings.kl_target) == (200, 42, 0.01)  # the defaults
    assert abliterate_adapter.build_settings({"n_trials": 5}, context(foreign_sources, "abliterate")).n_trials == 5


def test_export_verify_rebuilds_the_evaluation_from_the_record_alone(foreign_sources, monkeypatch):
    from abliterate.evaluation_inputs import EvaluationInputs

    monkeypatch.setenv("QA_MAX_TEST_PROMPTS", "7")
    inputs = EvaluationInputs.from_recorded({"model": "m", "kl_tokens": 4, "a_flag_renamed_since": 1}, "t.json")
    assert (inputs.kl_tokens, inputs.max_test_prompts, inputs.device_map) == (4, None, "auto")


def test_the_fingerprint_covers_defaults_and_wired_values(tmp_path):
    ctx = context(tmp_path, "export")
    used = settings_used(export_adapter.build_settings({}, ctx), tmp_path / "out")
    assert used["kl_tolerance"] == 0.02 and used["formats"] == ["nvfp4"]  # defaults, not only the YAML block
    assert used["trial"] == f"{OUTPUT_DIR}/quantize/checkpoint"  # relative: a moved output_dir stays up to date
    other = dict(used, kl_tolerance=0.05)  # what a changed default would give for the same (empty) block
    assert fingerprint("export", used, "h") != fingerprint("export", other, "h")
    assert fingerprint("export", used, "h") == fingerprint(
        "export", settings_used(export_adapter.build_settings({}, ctx), tmp_path / "out"), "h")


def test_a_changed_default_reruns_the_stage(tmp_path, monkeypatch):
    package = tmp_path / "defaultadapters"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "quantize.py").write_text(DEFAULT_ADAPTER)
    monkeypatch.setitem(stages.ADAPTER_MODULES, "quantize", "defaultadapters.quantize")
    route_stage_processes(tmp_path, {"quantize": "defaultadapters.quantize"})
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    log = tmp_path / "runs.log"
    monkeypatch.setenv("FAKE_STAGE_LOG", str(log))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    pipe = tmp_path / "pipe.yaml"
    pipe.write_text(textwrap.dedent("""
        name: t
        model: model
        output_dir: out
        stages:
          - quantize: {}
    """))
    out = tmp_path / "out"

    def run_with_default(factor: str) -> None:
        monkeypatch.setenv("FAKE_DEFAULT_FACTOR", factor)
        sys.modules.pop("defaultadapters.quantize", None)  # the runner imports the 'new version'
        assert runner.main([str(pipe), "--output_dir", str(out)]) == 0

    run_with_default("1")
    run_with_default("1")
    assert log.read_text().split() == ["1"], "unchanged settings: skipped"
    run_with_default("4")
    assert log.read_text().split() == ["1", "4"], "the same YAML block with another default must run again"
    record = json.loads((out / "manifest.json").read_text())["stages"]["quantize"]
    assert record["settings"] == {"factor": 4, "out": f"{OUTPUT_DIR}/quantize/value.txt"}
    assert record["settings_given"] == {}


def test_the_direct_cli_names_what_came_from_env_or_config_toml(foreign_sources):
    from abliterate.settings import outside_sources

    assert outside_sources(["--model", "m", "--seed", "1"]) == {"n_trials": "environment QA_N_TRIALS",
                                                               "kl_target": "config.toml"}
