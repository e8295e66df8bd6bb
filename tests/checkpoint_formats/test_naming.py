"""Checkpoint names <-> transformers module names, per family (layout.CHECKPOINT_RENAMES)."""

import pytest

from checkpoint_formats.naming import check_family_supported, checkpoint_candidates, to_model_name
from foundation.errors import UserError

MIXTRAL = {"model_type": "mixtral"}
PHIMOE = {"model_type": "phimoe"}


def test_mixtral_block_sparse_moe_is_the_models_mlp_both_ways():
    stored = "model.layers.3.block_sparse_moe.experts.7.w2.weight"
    assert to_model_name(stored, MIXTRAL) == "model.layers.3.mlp.experts.7.w2.weight"
    assert to_model_name("model.layers.3.block_sparse_moe.gate.weight", MIXTRAL) == "model.layers.3.mlp.gate.weight"
    assert checkpoint_candidates("model.layers.3.mlp.experts.down_proj", MIXTRAL) == [
        "model.layers.3.mlp.experts.down_proj", "model.layers.3.block_sparse_moe.experts.down_proj"]
    assert to_model_name("model.layers.0.self_attn.o_proj.weight", MIXTRAL) == "model.layers.0.self_attn.o_proj.weight"


def test_phimoe_router_is_the_checkpoints_gate_and_other_families_are_untouched():
    assert to_model_name("model.layers.0.block_sparse_moe.gate.weight", PHIMOE) == "model.layers.0.mlp.router.weight"
    assert checkpoint_candidates("model.layers.0.mlp.router.weight", PHIMOE)[1] == "model.layers.0.block_sparse_moe.gate.weight"
    name = "model.layers.0.block_sparse_moe.gate.weight"
    assert to_model_name(name, {"model_type": "qwen3_moe"}) == name and to_model_name(name, None) == name
    assert checkpoint_candidates("model.layers.0.mlp.down_proj.weight", {}) == ["model.layers.0.mlp.down_proj.weight"]


def test_unsupported_family_is_refused_naming_the_family_and_the_reason():
    with pytest.raises(UserError, match="'gpt_oss' is not supported for NVFP4: .*transposed") as caught:
        check_family_supported({"model_type": "gpt_oss"}, "ckpt/config.json")
    assert caught.value.where == "ckpt/config.json"
    check_family_supported(MIXTRAL, "x")  # supported: no error
