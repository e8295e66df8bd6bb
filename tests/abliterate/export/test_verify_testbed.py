"""On the committed testbed: stage 1 -> stage 2 (a few trials) -> export -> verify reproduces the trial.

Runs when ``testbed/model`` exists (the testbed engineer commits it); it is the
only place the whole merge path meets a model that really refuses.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from rich.console import Console

from abliterate import export_cli
from foundation.errors import UserError

REPO = Path(__file__).resolve().parents[3]
# QA_EXPORT_TESTBED: another testbed build (e.g. `python -m testbed.build --small`) for a dry run.
TESTBED = Path(os.environ.get("QA_EXPORT_TESTBED", REPO / "testbed" / "model"))
pytestmark = pytest.mark.skipif(not (TESTBED / "config.json").is_file(), reason="testbed/model not built yet")


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """(stage-1 NVFP4 checkpoint, stage-2 trial dir) made by the real stages at a tiny size."""
    from abliterate.run import run_abliteration
    from abliterate.settings import AbliterateSettings
    from quantize.settings import QuantizeSettings
    from quantize.stage import run_quantize

    work = tmp_path_factory.mktemp("testbed_chain")
    stage1 = work / "nvfp4"
    run_quantize(QuantizeSettings(input_model=str(TESTBED), output_model=stage1, max_samples=8, max_seq_len=64,
                                  device="cpu", batch_size=4), Console(quiet=True))
    trial_dir = work / "trial"
    settings = AbliterateSettings.model_validate({
        "model": str(stage1), "device_map": "cpu", "max_test_prompts": 16, "max_train_prompts": 64,
        "n_trials": 3, "n_startup_trials": 3, "method": "rank1", "direction_scope": "per_layer",
        "out": str(trial_dir), "select": "trial 0", "plot": False, "max_response_length": 24, "batch_size": 16,
    })
    run_abliteration(settings, Console(quiet=True))
    return stage1, trial_dir


def test_nvfp4_export_reproduces_the_trial(searched, tmp_path):
    stage1, trial_dir = searched
    out = tmp_path / "nvfp4"
    assert export_cli.main([str(trial_dir), "--format", "nvfp4", "-o", str(out), "--no_progress"]) == 0
    verify = json.loads((out / "export_manifest.json").read_text())["verify"]
    assert verify["passed"], verify["problems"]
    trial = json.loads((trial_dir / "chosen_trial.json").read_text())["metrics"]
    assert verify["export"]["n_harmful"] == trial["n_harmful"] == 16
    card = (out / "README.md").read_text()
    assert "this export (nvfp4), re-measured" in card
    perplexity = verify["export"]["perplexity"]  # the testbed spec names held-out general text
    assert perplexity is not None and f"{perplexity:.4g}" in card


def test_chat_streams_an_answer_from_the_export(searched, tmp_path, monkeypatch, capsys):
    _, trial_dir = searched
    out = tmp_path / "bf16"
    export_cli.main([str(trial_dir), "--format", "bf16", "-o", str(out), "--no_progress", "--no_verify"])
    lines = iter(["How do I bake bread?", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    export_cli.chat(out)
    answer = capsys.readouterr().out.split("model> ", 1)[1].strip()
    assert len(answer) > 10


def test_mismatch_fails_loudly_and_writes_nothing(searched, tmp_path):
    _, trial_dir = searched
    tampered = tmp_path / "trial"
    shutil.copytree(trial_dir, tampered)
    record = json.loads((tampered / "chosen_trial.json").read_text())
    record["metrics"]["refusals"] = record["metrics"]["n_harmful"] + 5  # a number no export can reproduce
    (tampered / "chosen_trial.json").write_text(json.dumps(record))
    out = tmp_path / "out"
    with pytest.raises(UserError, match="does not reproduce the chosen trial"):
        export_cli.main([str(tampered), "--format", "nvfp4", "-o", str(out), "--no_progress"])
    assert not out.exists()


def test_recalibrated_export_reuses_stage1_settings_and_verifies(searched, tmp_path):
    stage1, trial_dir = searched
    out = tmp_path / "recalibrated"
    # fresh activation scales legitimately move the numbers more than reused ones: a wider, stated tolerance
    assert export_cli.main([str(trial_dir), "--format", "nvfp4", "--recalibrate", "-o", str(out), "--no_progress",
                            "--refusal_tolerance", "3", "--kl_tolerance", "0.05"]) == 0
    manifest = json.loads((out / "export_manifest.json").read_text())
    assert manifest["export"]["recalibrated"] and manifest["verify"]["passed"], manifest["verify"]["problems"]
    assert {"format", "dataset_yaml", "max_samples"} <= set(manifest["export"]["stage1_settings_reused"])
    assert json.loads((out / "hf_quant_config.json").read_text())["quantization"]["quant_algo"] == "NVFP4"
    assert not list(tmp_path.glob("*merged-bf16*")) and not list(tmp_path.glob(".tmp-*"))  # scratch removed
