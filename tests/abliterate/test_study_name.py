"""A study's name is a promise to users with studies on disk: moving the code must not change it."""

from abliterate.evaluation_inputs import EvaluationInputs, evaluation_config
from abliterate.prompts import prompt_sets_of
from abliterate.search.naming import study_name
from abliterate.settings import AbliterateSettings


def name(**extra) -> str:
    """The study name of the golden test's settings, with ``extra`` settings added."""
    settings = AbliterateSettings(model="org/tiny-model", max_test_prompts=4, kl_tokens=3, refusal_markers=["nope"],
                                  seed=7, **extra)
    inputs = EvaluationInputs.from_settings(settings)
    prompts = prompt_sets_of(inputs)
    return study_name(settings, prompts, evaluation_config(inputs, prompts))


def test_the_study_name_is_the_one_earlier_versions_computed():
    """The digest below was computed by the code before the builders left abliterate/run.py (commit 3ecbd21).

    It also depends on the shipped testbed prompt spec; if that file changes on purpose, so do study names.
    """
    settings = AbliterateSettings(model="org/tiny-model", max_test_prompts=4, kl_tokens=3, refusal_markers=["nope"], seed=7)
    inputs = EvaluationInputs.from_settings(settings)
    prompts = prompt_sets_of(inputs)
    assert study_name(settings, prompts, evaluation_config(inputs, prompts)) == "abliterate-tiny-model-a7009e70bd73"


def test_counting_false_refusals_at_the_default_window_keeps_the_name_an_explicit_window_does_not():
    """Studies written before false refusals were counted resume; a study never mixes two windows."""
    assert name() == name(false_refusal_tokens=None) == "abliterate-tiny-model-a7009e70bd73"
    assert len({name(), name(false_refusal_tokens=3), name(false_refusal_tokens=16), name(false_refusal_tokens=0)}) == 4


def test_a_judge_names_its_own_study_and_judge_tokens_alone_do_not():
    """Judged refusals are another objective; without --judge, --judge_tokens changes nothing measured."""
    assert name(judge_tokens=64) == name() == "abliterate-tiny-model-a7009e70bd73"
    judged = {name(judge="org/judge"), name(judge="org/judge", judge_tokens=64), name(judge="org/other-judge")}
    assert len(judged) == 3 and name() not in judged


def test_a_spec_with_lookalike_and_skill_sets_loads_them_capped_and_names_its_own_study():
    """The default spec has neither set (its name is the golden one above); the hard spec's sets are test sets."""
    plain = prompt_sets_of(EvaluationInputs.from_settings(AbliterateSettings(model="org/tiny-model")))
    assert plain.lookalike_test == plain.skill_test == plain.skill_answers == ()
    settings = AbliterateSettings(model="org/tiny-model", prompts="datasets_yaml/testbed_hard_prompts.yaml",
                                  max_test_prompts=4)
    inputs = EvaluationInputs.from_settings(settings)
    hard = prompt_sets_of(inputs)
    assert len(hard.lookalike_test) == len(hard.skill_test) == len(hard.skill_answers) == 4
    assert hard.collateral_sets()["skill_answers"] == hard.skill_answers
    without = type(hard)(**{**hard.__dict__, "lookalike_test": (), "skill_test": (), "skill_answers": ()})
    config = evaluation_config(inputs, hard)
    assert study_name(settings, hard, config) != study_name(settings, without, config)
