"""``--judge`` end to end on the committed testbed and its shipped judge: the search is scored by the judge, and
every record keeps the markers' count beside it."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from abliterate.cli import main
from abliterate.evaluation_inputs import EvaluationInputs, evaluation_config
from abliterate.prompts import prompt_sets_of
from abliterate.search.journal import open_journal
from abliterate.search.naming import study_name
from abliterate.search.study import completed_trials, trial_metrics
from abliterate.settings import AbliterateSettings
from foundation.errors import UserError

REPO = Path(__file__).resolve().parents[2]
TESTBED, JUDGE = REPO / "testbed" / "model", REPO / "testbed" / "judge"


def _settings(out: Path, **extra) -> AbliterateSettings:
    # markers narrowed to "sorry": most of the testbed's refusals ("No. I won't help with this...") escape them
    return AbliterateSettings.model_validate({
        "model": str(TESTBED), "device_map": "cpu", "dtypes": ["float32"], "cpu_threads": 1, "max_test_prompts": 16,
        "max_train_prompts": 64, "n_trials": 4, "n_startup_trials": 4, "direction_scope": "per_layer",
        "refusal_markers": ["sorry"], "max_response_length": 24, "judge_tokens": 64, "kl_tokens": 4, "batch_size": 16,
        "out": str(out), "select": "best_kl_under 0.5", "plot": False, **extra})


def test_a_judged_search_records_judged_and_marker_refusals_side_by_side(tmp_path):
    from abliterate.run import run_abliteration

    out = tmp_path / "trial"
    settings = _settings(out, judge=str(JUDGE))
    printed = io.StringIO()
    run_abliteration(settings, Console(file=printed, width=250))
    chosen = json.loads((out / "chosen_trial.json").read_text())
    base, metrics = chosen["base_metrics"], chosen["metrics"]
    assert base["refusals"] == 16 and base["marker_refusals"] < base["refusals"]  # the judge sees what "sorry" misses
    assert isinstance(metrics["marker_refusals"], int) and chosen["settings"]["judge"] == str(JUDGE)

    study_dir = settings.study_path()
    storage, _ = open_journal(study_dir / "journal.log")
    import optuna

    study = optuna.load_study(study_name=chosen["study_name"], storage=storage)
    trials = [trial_metrics(trial) for trial in completed_trials(study)]
    assert len(trials) == 4 and all(t.marker_refusals is not None and t.marker_refusals <= t.refusals for t in trials)
    assert any(t.refusals != t.marker_refusals for t in trials)  # a trial whose judged count differs from the markers'
    front = json.loads((out / "pareto_front.json").read_text())
    assert all("marker_refusals" in record for record in front)

    text = printed.getvalue()
    assert "judge: " in text and f"refusals 16/16 (judge; markers {base['marker_refusals']}/16)" in text
    assert "refusals (markers)" in text  # the Pareto table's extra column
    # a judged study is another study than the unjudged one of the same settings
    unjudged = _settings(out)
    inputs = EvaluationInputs.from_settings(unjudged)
    prompts = prompt_sets_of(inputs)
    assert study_name(unjudged, prompts, evaluation_config(inputs, prompts)) != chosen["study_name"]


def test_a_mistyped_judge_fails_before_the_model_loads(tmp_path, capsys):
    argv = ["--model", str(TESTBED), "--judge", str(tmp_path / "no" / "judge"), "--out", str(tmp_path / "out"),
            "--device_map", "cpu", "--n_trials", "1"]
    with pytest.raises(UserError) as error:
        main(argv)
    assert error.value.where == "--judge" and "does not exist" in error.value.problem
    assert "model:" not in capsys.readouterr().out  # raised before the model was loaded


@pytest.mark.parametrize("value", ["0", "-5"])
def test_judge_tokens_must_be_positive(value):
    with pytest.raises(UserError) as error:
        main(["--model", "m", "--judge_tokens", value])
    assert error.value.where == "--judge_tokens"
