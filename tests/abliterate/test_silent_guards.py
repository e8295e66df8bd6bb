"""Stage 2 refuses inputs that used to give silently wrong results (issue 14, S3 S5 S6 S7)."""

from __future__ import annotations

import pytest

from abliterate.search.selection import parse_rule
from abliterate.settings import parse_settings
from foundation.errors import UserError


@pytest.mark.parametrize("rule", ["trial 1.5", "trial .5", "trial 2.0"])
def test_select_with_a_fractional_trial_number_is_refused_with_the_accepted_forms(tmp_path, rule):
    with pytest.raises(UserError, match="--select") as caught:
        parse_settings(["--model", str(tmp_path), "--select", rule])
    message = str(caught.value)
    assert "whole number" in message and "trial 12" in message and "best_kl_under" in message
    assert parse_rule("trial 12", n_harmful=10) == ("trial", 12.0)


def _without(model_dir, name):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(model_dir / "model.safetensors"))
    tensors.pop(name)
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    return model_dir


def test_a_tensor_missing_from_the_model_stops_stage_2_naming_it(tmp_path):
    from tiny_chat import write_tiny_chat_model

    from abliterate.loading import load_model

    model_dir = _without(write_tiny_chat_model(tmp_path / "model", layers=2), "model.layers.1.self_attn.o_proj.weight")
    with pytest.raises(UserError) as caught:
        load_model(str(model_dir), dtypes=["float32"], device_map="cpu")
    assert caught.value.where == "--model" and str(model_dir) in caught.value.problem
    assert "missing (they would be random): model.layers.1.self_attn.o_proj.weight" in caught.value.problem
