"""A study's name is a promise to users with studies on disk: moving the code must not change it."""

from abliterate.evaluation_inputs import EvaluationInputs, evaluation_config
from abliterate.prompts import prompt_sets_of
from abliterate.search.naming import study_name
from abliterate.settings import AbliterateSettings


def test_the_study_name_is_the_one_earlier_versions_computed():
    """The digest below was computed by the code before the builders left abliterate/run.py (commit 3ecbd21).

    It also depends on the shipped testbed prompt spec; if that file changes on purpose, so do study names.
    """
    settings = AbliterateSettings(model="org/tiny-model", max_test_prompts=4, kl_tokens=3, refusal_markers=["nope"], seed=7)
    inputs = EvaluationInputs.from_settings(settings)
    prompts = prompt_sets_of(inputs)
    assert study_name(settings, prompts, evaluation_config(inputs, prompts)) == "abliterate-tiny-model-a7009e70bd73"
