"""--direction_projection search: each trial draws plain or projected directions; fixed (default) is unchanged."""

import optuna
import pytest
import torch
from safetensors.torch import load_file
from tiny_chat import write_prompts, write_tiny_chat_model
from transformers import AutoModelForCausalLM

from abliterate.architectures import discover
from abliterate.artifacts import read_chosen_trial
from abliterate.cli import main
from abliterate.edits.lora import LoraAbliterator
from abliterate.edits.plan import AbliterationParameters
from abliterate.run import trial_directions
from abliterate.search.space import suggest_parameters
from abliterate.search.study import completed_trials, open_study, trial_parameters
from abliterate.settings import AbliterateSettings, parse_settings
from foundation.errors import UserError
from tests.abliterate.test_cli import _argv, _merged_logits
from tests.abliterate.test_study_name import name


def _draws(projection: str, n: int = 30):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=5))
    draws = []
    for _ in range(n):
        trial = study.ask()
        draws.append((suggest_parameters(trial, 8, ["attn", "mlp"], "search", "full", projection), trial.params))
        study.tell(trial, 0.0)
    return draws


def test_fixed_draws_what_the_search_drew_before_and_stores_no_new_key():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=5))
    for parameters, params in _draws("fixed", n=5):
        trial = study.ask()
        assert suggest_parameters(trial, 8, ["attn", "mlp"], "search", "full") == parameters
        study.tell(trial, 0.0)
        assert parameters.direction_projected is None and "direction_projected" not in params
        assert "direction_projected" not in parameters.to_dict()


def test_search_draws_both_choices_and_they_survive_the_stored_form():
    draws = _draws("search")
    choices = [parameters.direction_projected for parameters, _ in draws]
    assert set(choices) == {False, True}
    for parameters, params in draws:
        assert params["direction_projected"] is parameters.direction_projected
        stored = parameters.to_dict()
        assert stored["direction_projected"] is parameters.direction_projected
        assert AbliterationParameters.from_dict(stored) == parameters


def test_bad_values_are_user_errors_naming_the_flag():
    with pytest.raises(UserError, match="--direction_projection") as caught:
        parse_settings(["--model", "org/tiny-model", "--direction_projection", "both"])
    assert "search" in str(caught.value)
    with pytest.raises(UserError, match="--direction_projected"):
        parse_settings(["--model", "org/tiny-model", "--direction_projection", "search", "--direction_projected"])
    with pytest.raises(UserError, match="--direction_projection"):
        suggest_parameters(optuna.create_study().ask(), 8, ["attn"], projection="both")
    assert AbliterateSettings(model="org/tiny-model").direction_projection == "fixed"
    assert parse_settings(["--model", "org/tiny-model", "--direction_projection", "search"]).direction_projection == "search"


def test_search_names_its_own_study_and_fixed_keeps_the_old_name():
    assert name(direction_projection="fixed") == name() == "abliterate-tiny-model-a7009e70bd73"
    assert name(direction_projection="search") != name()
    assert name(direction_projection="search") != name(direction_projected=True)


def test_trial_directions_picks_the_drawn_set_and_refuses_a_mismatch():
    search = AbliterateSettings(model="org/tiny-model", direction_projection="search")
    fixed = AbliterateSettings(model="org/tiny-model")
    both = torch.stack([torch.zeros(3, 4), torch.ones(3, 4)])
    projected = AbliterationParameters("per_layer", None, {}, direction_projected=True)
    plain = AbliterationParameters("per_layer", None, {}, direction_projected=False)
    assert torch.equal(trial_directions(both, projected, search), both[1])
    assert torch.equal(trial_directions(both, plain, search), both[0])
    one = both[0]
    assert trial_directions(one, plain, fixed) is one
    with pytest.raises(RuntimeError, match="two direction sets"):
        trial_directions(torch.zeros(4, 3, 4), projected, search)
    with pytest.raises(RuntimeError, match="drawn choice"):
        trial_directions(both, AbliterationParameters("per_layer", None, {}), search)


def test_search_runs_end_to_end_and_writes_the_drawn_set_which_the_merge_reproduces(tmp_path, capsys):
    model_dir, spec = write_tiny_chat_model(tmp_path / "model"), write_prompts(tmp_path / "prompts")
    out = tmp_path / "out"
    assert main(_argv(model_dir, spec, out, 4, "--method", "rank1", "--direction_projection", "search",
                      "--direction_scope", "per_layer", "--study_dir", str(tmp_path / "study"))) == 0
    printed = " ".join(capsys.readouterr().out.split())
    chosen = read_chosen_trial(out)
    study = open_study(tmp_path / "study" / "journal.log", chosen.header.study_name)
    drawn = [trial_parameters(t).direction_projected for t in completed_trials(study)]
    assert all(choice in (False, True) for choice in drawn)
    assert printed.count(" projected ") + printed.count(" unprojected ") >= 4  # each trial line says which set
    # the study keeps both sets: [2, layers + 1, hidden], plain then projected, and they differ
    stored = load_file(str(next((tmp_path / "study").glob("*.directions.safetensors"))))["refusal_directions"]
    assert stored.shape[0] == 2 and stored.ndim == 3 and not torch.allclose(stored[0], stored[1])
    # projected: no component along the harmless mean, so the two differ; the chosen trial's set is the one written
    written = chosen.directions["refusal_directions"]
    assert chosen.parameters.direction_projected in (False, True)
    assert torch.equal(written, stored[int(chosen.parameters.direction_projected)])
    ids, merged_logits = _merged_logits(model_dir, chosen)
    searched = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    abliterator = LoraAbliterator(searched, discover(searched).components, method="rank1")
    abliterator.apply(chosen.parameters, written)
    with torch.no_grad():
        torch.testing.assert_close(searched(ids).logits, merged_logits, atol=1e-5, rtol=1e-4)
        if chosen.edits:  # the other set is another edit: the choice is really used
            abliterator.apply(chosen.parameters, stored[1 - int(chosen.parameters.direction_projected)])
            assert (searched(ids).logits - merged_logits).abs().max() > 1e-6
