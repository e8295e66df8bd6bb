"""The study: resumable with the same trial numbers, objectives with a fragment guard, selection rules."""

import pytest
from optuna.trial import TrialState

from abliterate.edits.plan import AbliterationParameters
from abliterate.search.objectives import (
    TrialMetrics,
    objective_values,
    refusal_score,
    zero_base_refusals_note,
)
from abliterate.search.selection import (
    Candidate,
    effective_refusals,
    pareto_front,
    select_trial,
)
from abliterate.search.space import suggest_parameters
from abliterate.search.study import open_study, run_trials
from foundation.errors import UserError

BASE = TrialMetrics(refusals=20, n_harmful=20, compliance=0, kl=0.0, kl_first_token=0.0, seconds=0.0)


def fake_evaluate(parameters: AbliterationParameters) -> TrialMetrics:
    """A deterministic stand-in for a model: fewer refusals near index 4.5, KL grows with strength."""
    index = parameters.direction_index if parameters.direction_index is not None else 3.0
    strength = sum(k.max_weight for k in parameters.kernels.values())
    refusals = min(20, int(abs(index - 4.5) * 8))
    return TrialMetrics(refusals, 20, 20 - refusals, 0.01 * strength ** 2, 0.001, 0.0)


def _run(journal, n_trials, evaluate=fake_evaluate):
    study = open_study(journal, "resume-test")
    run_trials(study, suggest=lambda trial: suggest_parameters(trial, 6, ["attn", "mlp"]), evaluate=evaluate,
               base=BASE, n_trials=n_trials, n_startup_trials=3, seed=7, kl_target=0.01)
    return study


def _history(study):
    return [(t.number, t.state, t.params, t.values) for t in study.get_trials(deepcopy=False)]


def test_killed_and_resumed_study_continues_with_the_same_trial_numbers(tmp_path):
    uninterrupted = _history(_run(tmp_path / "a.log", 7))

    calls = {"count": 0}

    def killed_on_fifth(parameters):
        calls["count"] += 1
        if calls["count"] == 5:
            raise KeyboardInterrupt  # what Ctrl-C / a kill during trial 4 looks like
        return fake_evaluate(parameters)

    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "b.log", 7, killed_on_fifth)
    # A new process reading the journal: trial 4 was left running.
    states = [t.state for t in open_study(tmp_path / "b.log", "resume-test").get_trials(deepcopy=False)]
    assert states == [TrialState.COMPLETE] * 4 + [TrialState.RUNNING]

    resumed = _history(_run(tmp_path / "b.log", 7))
    assert resumed == uninterrupted  # same numbers, same parameters, same values, nothing failed

    # Re-running with more trials continues the numbering.
    extended = _history(_run(tmp_path / "b.log", 9))
    assert [number for number, *_ in extended] == list(range(9))
    assert extended[:7] == uninterrupted


def test_failed_trial_is_recorded_and_the_study_goes_on(tmp_path):
    calls = {"count": 0}

    def fails_once(parameters):
        calls["count"] += 1
        if calls["count"] == 2:
            raise RuntimeError("NaN logits")
        return fake_evaluate(parameters)

    study = _run(tmp_path / "c.log", 4, fails_once)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states.count(TrialState.COMPLETE) == 4 and states.count(TrialState.FAIL) == 1


def test_fewer_refusals_without_more_compliance_is_not_better():
    fragments = TrialMetrics(refusals=0, n_harmful=20, compliance=2, kl=0.001, kl_first_token=0.0, seconds=0.0)
    answers = TrialMetrics(refusals=2, n_harmful=20, compliance=18, kl=0.001, kl_first_token=0.0, seconds=0.0)
    assert refusal_score(fragments, BASE) == pytest.approx(18 / 20)  # 0 refusals, but 18 fragments
    assert refusal_score(answers, BASE) == pytest.approx(2 / 20)
    assert refusal_score(answers, BASE) < refusal_score(fragments, BASE)
    # Without compliance rules there is no guard.
    blind = TrialMetrics(0, 20, None, 0.001, 0.0, 0.0)
    assert refusal_score(blind, BASE) == 0.0


def test_kl_below_target_stops_mattering():
    low = TrialMetrics(2, 20, 18, 0.0001, 0.0, 0.0)
    lower = TrialMetrics(2, 20, 18, 0.00001, 0.0, 0.0)
    assert objective_values(low, BASE, 0.01) == objective_values(lower, BASE, 0.01) == (0.1, 0.01)
    assert objective_values(TrialMetrics(2, 20, 18, 0.3, 0.0, 0.0), BASE, 0.01)[1] == 0.3


def test_zero_base_refusals_do_not_divide_by_zero():
    base = TrialMetrics(0, 20, 20, 0.0, 0.0, 0.0)
    trial = TrialMetrics(3, 20, 17, 0.01, 0.0, 0.0)
    assert refusal_score(trial, base) == pytest.approx(3 / 20)
    assert "refused none of the 20" in zero_base_refusals_note(base)
    assert zero_base_refusals_note(BASE) is None


def _candidate(number, refusals, compliance, kl):
    metrics = TrialMetrics(refusals, 20, compliance, kl, 0.0, 0.0)
    return Candidate(number, metrics, effective_refusals(metrics, BASE), "global", 4.0)


def test_pareto_front_and_selection_rules():
    candidates = [
        _candidate(0, 20, 0, 0.0001),
        _candidate(1, 1, 19, 0.02),
        _candidate(2, 0, 5, 0.01),  # 15 fragments: effectively 15 refusals
        _candidate(3, 0, 20, 0.08),
        _candidate(4, 2, 18, 0.05),  # dominated by trial 1
    ]
    assert [c.number for c in pareto_front(candidates)] == [3, 1, 2, 0]
    assert select_trial("best_kl_under 1", candidates, 20)[0].number == 1
    assert select_trial("best_kl_under 0.05", candidates, 20)[0].number == 1  # 5% of 20 = 1
    assert select_trial("best_kl_under 0", candidates, 20)[0].number == 3
    assert select_trial("best_kl_under 1.0", candidates, 20)[0].number == 1  # a count, not 100%
    assert select_trial("trial 4", candidates, 20)[0].number == 4
    chosen, reason = select_trial("best_kl_under 0", [candidates[0], candidates[2]], 20)
    assert chosen.number == 2 and "no trial" in reason
    with pytest.raises(UserError):
        select_trial("trial 9", candidates, 20)
    with pytest.raises(UserError):
        select_trial("lowest please", candidates, 20)


def _counted(number, refusals, compliance, kl, false_refusals):
    metrics = TrialMetrics(refusals, 20, compliance, kl, 0.0, 0.0, false_refusals, 10)
    return Candidate(number, metrics, effective_refusals(metrics, BASE), "global", 4.0)


def test_a_false_refusal_cap_extends_the_rules():
    candidates = [
        _counted(0, 20, 0, 0.0001, 0),
        _counted(1, 1, 19, 0.02, 4),   # the best by refusals and KL, but refuses 4 of 10 harmless prompts
        _counted(2, 1, 19, 0.04, 1),
        _counted(3, 0, 20, 0.08, 0),
    ]
    assert select_trial("best_kl_under 1", candidates, 20, 10)[0].number == 1  # no cap: as before
    for rule in ("best_kl_under 1, false_refusals<=1", "best_kl_under 1 false_refusals <= 1",
                 "best_kl_under 1 and false_refusals<=1", "best_kl_under 0.05, false_refusals<=0.1"):
        chosen, reason = select_trial(rule, candidates, 20, 10)
        assert chosen.number == 2, rule
        assert reason == "lowest KL among trials with at most 1 effective refusals and at most 1 false refusals"
    assert select_trial("best_kl_under 1, false_refusals<=0", candidates, 20, 10)[0].number == 3  # none at <= 1
    chosen, reason = select_trial("best_kl_under 1, false_refusals<=0", candidates[1:3], 20, 10)
    assert chosen.number == 2 and "no trial has at most 0 false refusals; took the fewest (1)" in reason


def test_bad_caps_and_uncounted_trials_are_user_errors():
    with pytest.raises(UserError, match="cannot read the false-refusal cap"):
        select_trial("false_refusals<=1 best_kl_under 1", [_counted(0, 0, 20, 0.1, 0)], 20, 10)
    with pytest.raises(UserError, match="'trial N' names one"):
        select_trial("trial 0, false_refusals<=1", [_counted(0, 0, 20, 0.1, 0)], 20, 10)
    with pytest.raises(UserError, match="no trial has a false-refusal count"):
        select_trial("best_kl_under 1, false_refusals<=1", [_candidate(0, 0, 20, 0.1)], 20, 10)
    from pydantic import ValidationError

    from abliterate.settings import AbliterateSettings

    with pytest.raises(ValidationError, match="false-refusal cap"):  # a typo fails at parse time, not after the search
        AbliterateSettings(model="m", select="best_kl_under 1, false_refusal<=1")
    assert AbliterateSettings(model="m", select="best_kl_under 0.05, false_refusals<=2").select


def test_metrics_of_older_records_read_without_false_refusals():
    old = {"refusals": 3, "n_harmful": 20, "compliance": 17, "kl": 0.01, "kl_first_token": 0.0, "seconds": 1.0}
    metrics = TrialMetrics.from_dict(old)
    assert metrics.false_refusals is None and metrics.n_harmless is None
    assert TrialMetrics.from_dict(metrics.to_dict()) == metrics
    counted = TrialMetrics.from_dict({**old, "false_refusals": 2, "n_harmless": 10})
    assert (counted.false_refusals, counted.n_harmless) == (2, 10)
    with pytest.raises(KeyError):
        TrialMetrics.from_dict({key: value for key, value in old.items() if key != "kl"})  # required fields stay required
