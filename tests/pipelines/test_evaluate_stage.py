"""The pipeline's evaluate stage on the testbed: lm-eval scores of the original and its NVFP4 checkpoint (read by our
loader), in the manifest and the final table; which models it measures; its errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from foundation.errors import UserError
from pipelines import runner
from pipelines.adapters import evaluate as evaluate_stage
from pipelines.report import print_final_table, with_capability
from pipelines.stages import StageContext

REPO = Path(__file__).resolve().parents[2]
TESTBED = REPO / "testbed" / "model"


@pytest.fixture(scope="module")
def quantized_and_evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate_stage")
    pipeline = root / "pipe.yaml"
    pipeline.write_text(f"""
name: capability
model: {TESTBED}
output_dir: {root / 'out'}
stages:
  - quantize: {{format: nvfp4, max_samples: 16, batch_size: 16, device: cpu}}
  - evaluate: {{tasks: [testbed_heldout], limit: 6, device_map: cpu, dtypes: [float32], batch_size: 6}}
""")
    assert runner.main([str(pipeline)]) == 0
    return root / "out"


@pytest.mark.slow
def test_original_and_nvfp4_checkpoint_are_scored_in_the_manifest(quantized_and_evaluated):
    manifest = json.loads((quantized_and_evaluated / "manifest.json").read_text())
    record = manifest["stages"]["evaluate"]
    assert record["status"] == "complete" and record["limit"] == 6
    by_label = {entry["label"]: entry for entry in record["capability"]}
    assert list(by_label) == ["original", "quantized (nvfp4)"]
    assert by_label["quantized (nvfp4)"]["model"] == "quantize/checkpoint"  # relative to the output_dir
    assert "nvfp4" in by_label["quantized (nvfp4)"]["source_format"].lower()  # through our loader, not transformers
    original = by_label["original"]["scores"]["testbed_heldout"]["word_perplexity"]
    quantized = by_label["quantized (nvfp4)"]["scores"]["testbed_heldout"]["word_perplexity"]
    assert quantized != original and abs(quantized / original - 1) < 0.25  # 4-bit rounding costs a little, not all
    assert json.loads((quantized_and_evaluated / "evaluate" / "capability.json").read_text()) == record["capability"]


@pytest.mark.slow
def test_scores_are_columns_of_the_final_table_and_a_rerun_skips_the_stage(quantized_and_evaluated, capsys):
    manifest = json.loads((quantized_and_evaluated / "manifest.json").read_text())
    out = io.StringIO()
    print_final_table(Console(file=out, width=200), manifest)
    lines = {line.split("│")[1].strip(): line for line in out.getvalue().splitlines() if line.count("│") > 3}
    assert "word_perplexity" in out.getvalue() and "testbed_heldout" in out.getvalue()
    score = manifest["stages"]["evaluate"]["capability"][0]["scores"]["testbed_heldout"]["word_perplexity"]
    assert f"{score:.3g}" in lines["original"]
    pipeline = quantized_and_evaluated.parent / "pipe.yaml"
    capsys.readouterr()
    assert runner.main([str(pipeline)]) == 0
    assert "evaluate: up to date" in capsys.readouterr().out.replace("[green]", "").replace("✓ ", "")


def test_capability_scores_join_the_row_of_the_same_model():
    row = {"stage": "export", "label": "re-exported nvfp4", "refusals": 0.02}
    manifest = {"stages": {"evaluate": {"capability": [
        {"label": "re-exported nvfp4", "scores": {"arc_easy": {"acc": 0.61, "acc_norm": 0.58}}},
        {"label": "original", "scores": {"arc_easy": {"acc": 0.63}}}]}}}
    rows, columns = with_capability([row], manifest)
    assert columns == ["arc_easy acc", "arc_easy acc_norm"]
    assert rows[0]["refusals"] == 0.02 and rows[0]["arc_easy acc"] == 0.61
    assert rows[1] == {"stage": "evaluate", "label": "original", "arc_easy acc": 0.63}  # no other row of it: its own


def _context(tmp_path, previous):
    return StageContext("t", str(TESTBED), None, str(tmp_path / "out" / "evaluate"), previous_results=previous)


def test_models_follow_the_stages_and_a_missing_one_is_named(tmp_path):
    previous = {"quantize": {"artifact": "checkpoint", "format": "nvfp4"},
                "abliterate": {"artifact": "trial"},
                "export": {"artifact": "nvfp4", "merge_source": {"nvfp4": "base", "bf16": "base", "adapter": None}}}
    settings = evaluate_stage.build_settings({"tasks": ["testbed_heldout"]}, _context(tmp_path, previous))
    labels = [label for label, _ in evaluate_stage.models_to_measure(settings, _context(tmp_path, previous))]
    assert labels == ["original", "quantized (nvfp4)", "re-exported nvfp4", "re-exported bf16"]
    paths = dict(evaluate_stage.models_to_measure(settings, _context(tmp_path, previous)))
    assert paths["re-exported bf16"] == str(tmp_path / "out" / "export" / "bf16")
    only = evaluate_stage.build_settings({"tasks": ["testbed_heldout"], "models": ["abliterated"]}, _context(tmp_path, {}))
    with pytest.raises(UserError, match="'abliterated' needs an export stage"):
        evaluate_stage.models_to_measure(only, _context(tmp_path, {"quantize": previous["quantize"]}))


def test_stage_block_errors_name_the_stage(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="pipeline stage 'evaluate': field 'tasks'"):
        evaluate_stage.build_settings({}, _context(tmp_path, {}))
    with pytest.raises(UserError, match="pipeline stage 'evaluate': field 'models.0': Input should be 'original'"):
        evaluate_stage.build_settings({"tasks": ["t"], "models": ["searched"]}, _context(tmp_path, {}))
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(UserError, match=r"pipeline stage 'evaluate'(.|\n)*quant-abliterate\[eval\]"):
        evaluate_stage.build_settings({"tasks": ["t"]}, _context(tmp_path, {}))
