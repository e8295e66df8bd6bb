"""Tensor-layout facts live in checkpoint_formats.layout and the stages read them from there."""

from checkpoint_formats import layout


def test_scale_sharing_groups():
    assert layout.scale_sharing_group("k_proj") == ("q_proj", "k_proj", "v_proj")
    assert layout.scale_sharing_group("w3") == ("w1", "w3")
    assert layout.scale_sharing_group("o_proj") is None


def test_every_router_is_kept_out_of_quantization():
    from quantize.skip_layers import DEFAULT_SKIP_RULES

    globs = {rule.module_glob for rule in DEFAULT_SKIP_RULES}
    assert {glob for glob, _ in layout.MOE_ROUTERS} | set(layout.SHARED_EXPERT_GATES) <= globs


def test_fused_expert_parts_name_every_alternative_spelling():
    assert layout.FUSED_EXPERT_PARTS["gate_up_proj"] == (("gate_proj", "w1"), ("up_proj", "w3"))
    assert set(layout.NVFP4_WEIGHT_PARTS) <= set(layout.MODELOPT_NVFP4_SUFFIXES) | {"weight_scale_2"}
