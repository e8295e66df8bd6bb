"""--gentle_share: a share of the trials in a gentle study of its own; the product trials unchanged; one front."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from optuna.trial import TrialState
from rich.console import Console
from safetensors.torch import load_file

from abliterate.artifacts import read_chosen_trial
from abliterate.edits.delta import abliteration_delta
from abliterate.edits.plan import edit_directions
from abliterate.export.formats_out import export_full_precision
from abliterate.export.streaming_merge import StreamingMerger
from abliterate.search.regimes import (
    GENTLE,
    PRODUCT,
    REGIME_ATTR,
    SEARCH_TRIAL_ATTR,
    gentle_study_name,
    next_regime,
    run_mixed_trials,
    split_trials,
)
from abliterate.search.space import suggest_parameters
from abliterate.search.study import open_study, run_trials
from abliterate.settings import AbliterateSettings, parse_settings
from foundation.errors import UserError
from tests.abliterate.export.conftest import load_all
from tests.abliterate.test_search import BASE, fake_evaluate
from tests.abliterate.test_study_name import name

REPO = Path(__file__).resolve().parents[2]


def test_split_and_schedule_spread_the_gentle_trials_evenly():
    split = split_trials(60, 20, 0.33)
    assert (split.n_product, split.n_gentle, split.product_startup, split.gentle_startup) == (40, 20, 20, 7)
    product = gentle = 0
    order = []
    for _ in range(60):
        regime = next_regime(product, gentle, split)
        order.append(regime)
        product, gentle = product + (regime == PRODUCT), gentle + (regime == GENTLE)
    assert (product, gentle) == (40, 20)
    assert all(order[i : i + 3].count(GENTLE) == 1 for i in range(0, 60, 3))  # one in three, never two in a row
    assert split_trials(10, 4, 0.0).n_gentle == 0 and next_regime(3, 0, split_trials(10, 4, 0.0)) == PRODUCT
    assert next_regime(40, 5, split) == GENTLE  # the product's quota is full: the rest are gentle


def _gentle_suggest(trial):
    return suggest_parameters(trial, 6, ["attn", "mlp"], depth="late")


def _product_suggest(trial):
    return suggest_parameters(trial, 6, ["attn", "mlp"], depth="full")


def _run_mixed(journal, n_trials, evaluate=fake_evaluate, gentle_evaluate=fake_evaluate):
    product, gentle = open_study(journal, "mixed"), open_study(journal, gentle_study_name("mixed"))
    common = {"base": BASE, "seed": 7}
    run_mixed_trials({PRODUCT: product, GENTLE: gentle},
                     {PRODUCT: {**common, "suggest": _product_suggest, "evaluate": evaluate, "kl_target": 0.5},
                      GENTLE: {**common, "suggest": _gentle_suggest, "evaluate": gentle_evaluate, "kl_target": 0.0}},
                     split_trials(n_trials, 3, 0.34))
    return product, gentle


def _history(study):
    return [(t.number, t.state, t.params, t.values, t.user_attrs.get(SEARCH_TRIAL_ATTR), t.user_attrs.get(REGIME_ATTR))
            for t in study.get_trials(deepcopy=False)]


def test_product_trials_are_the_product_search_unchanged_and_each_trial_records_its_regime(tmp_path):
    product, gentle = _run_mixed(tmp_path / "mixed.log", 9)  # 6 product, 3 gentle
    alone = open_study(tmp_path / "alone.log", "alone")
    run_trials(alone, suggest=_product_suggest, evaluate=fake_evaluate, base=BASE, n_trials=6, n_startup_trials=3,
               seed=7, kl_target=0.5)
    assert [t.params for t in product.trials] == [t.params for t in alone.trials]  # number for number
    assert [t.values for t in product.trials] == [t.values for t in alone.trials]
    assert {t.user_attrs[REGIME_ATTR] for t in product.trials} == {PRODUCT}
    assert {t.user_attrs[REGIME_ATTR] for t in gentle.trials} == {GENTLE} and len(gentle.trials) == 3
    numbers = sorted(t.user_attrs[SEARCH_TRIAL_ATTR] for study in (product, gentle) for t in study.trials)
    assert numbers == list(range(9))  # one numbering over the whole search
    assert [t.user_attrs[SEARCH_TRIAL_ATTR] for t in gentle.trials] == [2, 5, 8]
    # the gentle damage is the raw KL (kl_target 0), the product's is flat below its target 0.5
    for t in gentle.trials:
        assert t.values[1] == t.user_attrs["metrics"]["kl"] < 0.5
    assert all(t.values[1] >= 0.5 for t in product.trials)
    # the gentle space is the late depth: every peak in [0.6 L, L - 1]
    assert all(3.6 <= t.params["attn.max_weight_position"] <= 5.0 for t in gentle.trials)


def test_a_run_killed_in_a_gentle_trial_resumes_it_in_its_study_under_the_same_numbers(tmp_path):
    uninterrupted = [_history(study) for study in _run_mixed(tmp_path / "a.log", 9)]
    calls = {"count": 0}

    def killed_on_second(parameters):
        calls["count"] += 1
        if calls["count"] == 2:
            raise KeyboardInterrupt  # the second gentle trial (search trial 5)
        return fake_evaluate(parameters)

    with pytest.raises(KeyboardInterrupt):
        _run_mixed(tmp_path / "b.log", 9, gentle_evaluate=killed_on_second)
    left = open_study(tmp_path / "b.log", gentle_study_name("mixed")).get_trials(deepcopy=False)
    assert [t.state for t in left] == [TrialState.COMPLETE, TrialState.RUNNING]
    assert left[1].user_attrs[SEARCH_TRIAL_ATTR] == 5
    assert [_history(study) for study in _run_mixed(tmp_path / "b.log", 9)] == uninterrupted


def test_bad_gentle_settings_are_user_errors_naming_the_flag():
    for argv, flag in ((["--gentle_share", "1"], "--gentle_share"), (["--gentle_share", "-0.1"], "--gentle_share"),
                       (["--gentle_share", "0.3", "--workers", "2"], "--gentle_share"),
                       (["--gentle_share", "0.3", "--storage", "journal:/tmp/x.log"], "--gentle_share"),
                       (["--gentle_kl_target", "-1e-5"], "--gentle_kl_target"),
                       (["--gentle_depth", "deep"], "--gentle_depth")):
        with pytest.raises(UserError) as caught:
            parse_settings(["--model", "org/tiny-model", *argv])
        assert flag in str(caught.value), (argv, str(caught.value))
    assert AbliterateSettings(model="org/tiny-model").gentle_share == 0.0


def test_a_mixed_search_names_its_own_study_and_other_studies_keep_their_names():
    assert name(gentle_share=0.0) == name() == "abliterate-tiny-model-a7009e70bd73"
    assert name(gentle_share=0.33) != name() and name(gentle_share=0.33) != name(gentle_share=0.5)
    assert name(gentle_share=0.33, gentle_kl_target=1e-5) != name(gentle_share=0.33)


def test_the_export_of_a_gentle_trial_rebuilds_it_with_the_projected_single_directions(tmp_path):
    """End to end on the fast testbed: a gentle trial chosen from the union front exports its own directions."""
    from abliterate.run import run_abliteration

    model = REPO / "testbed" / "model"
    common = {"model": str(model), "device_map": "cpu", "dtypes": ["float32"], "cpu_threads": 1, "max_test_prompts": 8,
              "max_train_prompts": 32, "kl_tokens": 2, "max_response_length": 8, "batch_size": 8, "plot": False,
              "n_trials": 3, "n_startup_trials": 2, "gentle_share": 0.34, "directions": "subspace", "direction_rank": 2,
              "search_depth": "full"}
    out = tmp_path / "out"
    printed = io.StringIO()
    run_abliteration(AbliterateSettings.model_validate({**common, "out": str(out), "select": "trial 2"}),
                     Console(file=printed, width=250))  # 3 trials: 0, 1 product, 2 gentle
    trial = read_chosen_trial(out)
    assert trial.header.trial_number == 2
    assert trial.header.regime == {"regime": GENTLE, "study_name": gentle_study_name(trial.header.study_name),
                                   "study_trial_number": 0, "directions": "mean_difference", "direction_rank": 1,
                                   "direction_projected": True, "search_depth": "full", "kl_target": 0.0}
    assert "trial   2 gentle" in printed.getvalue() and "(gentle)" in printed.getvalue()
    study_dir = Path(f"{out}.study")
    gentle = load_file(str(study_dir / f"{trial.header.regime['study_name']}.directions.safetensors"))["refusal_directions"]
    product = load_file(str(study_dir / f"{trial.header.study_name}.directions.safetensors"))["refusal_directions"]
    assert gentle.ndim == 2 and product.ndim == 3  # the single projected direction, not the product's subspace
    assert torch.equal(trial.directions["refusal_directions"], gentle)
    for key, vector in edit_directions(trial.parameters, gentle).items():
        if key in trial.directions:
            assert torch.equal(trial.directions[key], vector)
    # the merge applies exactly those directions (not the product's)
    exported = tmp_path / "bf16"
    exported.mkdir()
    export_full_precision(StreamingMerger.from_directory(model, trial), exported, show_progress=False)
    merged, original = load_all(exported), load_all(model)
    assert trial.edits
    for parameter, record in trial.edits.items():
        weight = original[parameter]
        expected = (weight.float() + abliteration_delta(weight, edit_directions(trial.parameters, gentle)[record.direction],
                                                        record.strength, method=trial.method, rank=trial.rank,
                                                        seed=trial.svd_seed)).to(weight.dtype)
        assert torch.equal(merged[parameter], expected), parameter
    # the union front lists the trials of both regimes
    front = json.loads((out / "pareto_front.json").read_text())
    assert front and {record["trial"] for record in front} <= {0, 1, 2}
    assert all(record["regime"] == (GENTLE if record["trial"] == 2 else PRODUCT) for record in front)
