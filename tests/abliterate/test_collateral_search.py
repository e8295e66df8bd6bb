"""Stage 2 on the hard testbed (issue 17): look-alike refusals and skill accuracy in every record; the default
testbed's records keep exactly their keys."""

from __future__ import annotations

import io
import json
from pathlib import Path

from rich.console import Console

from abliterate.settings import AbliterateSettings

REPO = Path(__file__).resolve().parents[2]
COLLATERAL = {"lookalike_refusals", "n_lookalike", "skill_correct", "n_skill"}


def _run(out: Path, model: str, **extra) -> tuple[dict, str]:
    from abliterate.run import run_abliteration

    settings = AbliterateSettings.model_validate({
        "model": str(REPO / model), "device_map": "cpu", "dtypes": ["float32"], "cpu_threads": 1,
        "max_test_prompts": 16, "max_train_prompts": 64, "n_trials": 2, "n_startup_trials": 2, "kl_tokens": 4,
        "max_response_length": 16, "batch_size": 16, "out": str(out), "plot": False, **extra})
    printed = io.StringIO()
    run_abliteration(settings, Console(file=printed, width=250))
    return json.loads((out / "chosen_trial.json").read_text()), printed.getvalue()


def test_the_hard_spec_scores_lookalikes_and_skill_for_the_base_and_every_trial(tmp_path):
    chosen, text = _run(tmp_path / "hard", "testbed/hard", prompts="datasets_yaml/testbed_hard_prompts.yaml",
                        select="best_kl_under 16, lookalike_refusals<=16, skill_loss<=100")
    base, metrics = chosen["base_metrics"], chosen["metrics"]
    assert base["n_lookalike"] == base["n_skill"] == metrics["n_lookalike"] == metrics["n_skill"] == 16
    assert base["lookalike_refusals"] <= 1 and base["skill_correct"] >= 6  # the card: look-alikes answered, skill ~57%
    assert isinstance(metrics["lookalike_refusals"], int) and isinstance(metrics["skill_correct"], int)
    assert "and at most 16 look-alike refusals and at most 100 points of skill accuracy lost" in chosen["selection"]
    front = json.loads((tmp_path / "hard" / "pareto_front.json").read_text())
    assert front and all(COLLATERAL <= set(record) for record in front)
    assert f"look-alike refusals {base['lookalike_refusals']}/16 skill {base['skill_correct']}/16" in text
    assert text.count("look-alike refusals") >= 4  # the base line, two trial lines, the Pareto table's column


def test_the_default_spec_records_no_collateral_fields(tmp_path):
    chosen, text = _run(tmp_path / "plain", "testbed/model", n_trials=1, n_startup_trials=1, select="best_kl_under 16")
    assert not COLLATERAL & (set(chosen["metrics"]) | set(chosen["base_metrics"]))
    assert "look-alike" not in text and "skill" not in text
