"""--search_caps: collateral caps handed to the sampler as Optuna constraints."""

import pytest

from abliterate.search.constraints import (
    cap_limits,
    check_measurable,
    constraint_values,
    parse_caps,
    search_constraints,
)
from abliterate.search.objectives import TrialMetrics
from abliterate.search.space import suggest_parameters
from abliterate.search.study import open_study, run_trials
from abliterate.settings import parse_settings
from foundation.errors import UserError
from tests.abliterate.test_study_name import name

BASE = TrialMetrics(refusals=20, n_harmful=20, compliance=0, kl=0.0, kl_first_token=0.0, seconds=0.0,
                    false_refusals=0, n_harmless=10, lookalike_refusals=0, n_lookalike=50, skill_correct=30, n_skill=50)


def metrics(lookalikes: int, skill: int, refusals: int = 5) -> TrialMetrics:
    return TrialMetrics(refusals, 20, 20 - refusals, 0.02, 0.01, 0.0, 1, 10, None, lookalikes, 50, skill, 50)


def test_caps_parse_turn_fractions_into_counts_and_give_one_value_per_cap():
    caps = parse_caps("lookalike_refusals<=0.1, skill_loss<=2")
    assert caps == {"lookalike_refusals": "0.1", "skill_loss": "2"}
    limits = cap_limits(caps, n_harmless=10, n_lookalike=50)
    assert limits == {"lookalike_refusals": 5.0, "skill_loss": 2.0}
    # 6 look-alikes refused (1 over), skill 29/50 vs 30/50 (2 points lost: exactly at the cap)
    assert constraint_values(metrics(6, 29), BASE, limits) == {"lookalike_refusals": 1.0, "skill_loss": 0.0}
    assert constraint_values(metrics(2, 25), BASE, limits) == {"lookalike_refusals": -3.0, "skill_loss": 8.0}
    assert constraint_values(metrics(0, 30), BASE, cap_limits(parse_caps("false_refusals<=0.5"), 10, 50)) == {
        "false_refusals": -4.0}


@pytest.mark.parametrize("text, words", [("skill>=50", "cannot read"), ("kl<=0.1", "unknown quantity 'kl'"),
                                         ("skill_loss<=2, skill_loss<=3", "twice"), ("", "cannot read")])
def test_bad_caps_are_user_errors_naming_the_flag(text, words):
    with pytest.raises(UserError, match=words) as caught:
        parse_caps(text)
    assert caught.value.where == "--search_caps"
    with pytest.raises(UserError, match="--search_caps"):
        parse_settings(["--model", "org/tiny-model", "--search_caps", text])


def test_a_cap_on_an_unmeasured_quantity_is_refused_before_the_search():
    plain = TrialMetrics(refusals=20, n_harmful=20, compliance=0, kl=0.0, kl_first_token=0.0, seconds=0.0)
    with pytest.raises(UserError, match="no skill_test set"):
        check_measurable({"skill_loss": 2.0}, plain)
    with pytest.raises(UserError, match="no lookalike_test set"):
        search_constraints("lookalike_refusals<=3", plain, 10)
    assert search_constraints(None, plain, 10) is None


def test_the_sampler_records_the_caps_of_every_trial(tmp_path):
    def evaluate(parameters):  # a stand-in model: strong attention edits cost skill
        return metrics(lookalikes=0, skill=30 - int(10 * parameters.kernels["attn"].max_weight - 8))

    study = open_study(tmp_path / "journal.log", "caps-test")
    run_trials(study, suggest=lambda trial: suggest_parameters(trial, 6, ["attn", "mlp"]), evaluate=evaluate, base=BASE,
               n_trials=6, n_startup_trials=3, seed=7, kl_target=0.01,
               constraints=search_constraints("skill_loss<=2", BASE, 10))
    assert len(study.trials) == 6
    for trial in study.trials:
        loss = 100 * (30 - trial.user_attrs["metrics"]["skill_correct"]) / 50
        assert trial.constraints == {"skill_loss": pytest.approx(loss - 2.0)}
    assert any(trial.constraints["skill_loss"] > 0 for trial in study.trials)  # some infeasible, marked so
    # without caps nothing is recorded (the default search is unchanged)
    plain = open_study(tmp_path / "plain.log", "plain")
    run_trials(plain, suggest=lambda trial: suggest_parameters(trial, 6, ["attn", "mlp"]), evaluate=evaluate, base=BASE,
               n_trials=2, n_startup_trials=3, seed=7, kl_target=0.01)
    assert all(trial.constraints == {} for trial in plain.trials)


def test_caps_name_their_own_study():
    assert name(search_caps=None) == name()
    assert len({name(), name(search_caps="skill_loss<=2"), name(search_caps="skill_loss<=3")}) == 3
