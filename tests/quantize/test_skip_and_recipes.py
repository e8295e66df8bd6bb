"""Skip rules and format recipes: pure functions, checked against ModelOpt's own matcher."""

from __future__ import annotations

import fnmatch

import pytest

from foundation.errors import UserError
from quantize.recipes import (
    FORMATS,
    build_quant_config,
    check_device_supports,
    get_recipe,
)
from quantize.skip_layers import (
    detect_default_skips,
    parse_skip_patterns,
    quantizable_module_names,
    quantizer_pattern,
    resolve_user_skips,
)


def test_parse_accepts_spaces_and_commas():
    assert parse_skip_patterns(["*q_proj,*k_proj", " *layers.0.* ", ""]) == ["*q_proj", "*k_proj", "*layers.0.*"]


def test_module_glob_becomes_quantizer_glob():
    pattern = quantizer_pattern("*mlp.gate")
    assert fnmatch.fnmatch("model.layers.3.mlp.gate.weight_quantizer", pattern)
    assert fnmatch.fnmatch("model.layers.3.mlp.gate.input_quantizer", pattern)
    assert not fnmatch.fnmatch("model.layers.3.mlp.gate_proj.weight_quantizer", pattern)
    assert fnmatch.fnmatch("model.layers.0.self_attn.k_bmm_quantizer", quantizer_pattern("*layers.0.*"))


def test_architecture_defaults_on_moe_and_hybrid_models():
    from tests.tiny_models import modulelist_moe, nemotron_h_hybrid

    moe = {match.module_glob: match.modules for match in detect_default_skips(quantizable_module_names(modulelist_moe()))}
    assert moe["*mlp.gate"] == ("model.layers.0.mlp.gate", "model.layers.1.mlp.gate")
    assert moe["*shared_expert_gate"] == ("model.layers.0.mlp.shared_expert_gate", "model.layers.1.mlp.shared_expert_gate")
    assert moe["*lm_head"] == ("lm_head",)
    assert not [name for names in moe.values() for name in names if "gate_proj" in name or "experts" in name]

    hybrid = {match.module_glob: match.modules for match in detect_default_skips(quantizable_module_names(nemotron_h_hybrid()))}
    assert hybrid["*conv1d"] == ("model.layers.0.mixer.conv1d",)


def test_vision_tower_detected():
    names = ["model.vision_tower.encoder.layers.0.q_proj", "model.multi_modal_projector.linear_1",
             "model.language_model.layers.0.self_attn.q_proj", "lm_head"]
    found = {match.module_glob for match in detect_default_skips(names)}
    assert {"*vision_tower*", "*multi_modal_projector*", "*lm_head"} <= found
    assert "model.language_model.layers.0.self_attn.q_proj" not in {
        name for match in detect_default_skips(names) for name in match.modules}


def test_user_skip_that_matches_nothing_is_an_error():
    names = ["m.layers.0.down_proj", "m.layers.0.up_proj", "m.layers.10.up_proj"]
    assert resolve_user_skips(["*down_proj"], names)[0].modules == ("m.layers.0.down_proj",)
    # A parent module's exact name (the seed's style) covers its children, and only them.
    assert resolve_user_skips(["m.layers.0"], names)[0].modules == ("m.layers.0.down_proj", "m.layers.0.up_proj")
    assert fnmatch.fnmatch("m.layers.0.up_proj.input_quantizer", quantizer_pattern("m.layers.0"))
    assert not fnmatch.fnmatch("m.layers.10.up_proj.input_quantizer", quantizer_pattern("m.layers.0"))
    with pytest.raises(UserError) as caught:
        resolve_user_skips(["*dwn_proj"], names)
    assert caught.value.where == "--skip_layers"



ATTENTION_AND_EXPERTS = ["m.layers.0.self_attn.q_proj", "m.layers.0.self_attn.k_proj", "m.layers.0.self_attn.v_proj",
                         "m.layers.0.self_attn.o_proj", "m.layers.0.mlp.experts.0.gate_proj",
                         "m.layers.0.mlp.experts.0.up_proj", "m.layers.0.mlp.experts.0.down_proj"]


@pytest.mark.parametrize(("pattern", "siblings"), [
    ("*q_proj", ["m.layers.0.self_attn.k_proj", "m.layers.0.self_attn.v_proj"]),
    ("*experts.0.gate_proj", ["m.layers.0.mlp.experts.0.up_proj"]),
])
def test_skip_that_splits_a_fused_group_names_the_siblings(pattern, siblings):
    with pytest.raises(UserError) as caught:
        resolve_user_skips([pattern], ATTENTION_AND_EXPERTS)
    assert caught.value.where == "--skip_layers"
    assert all(sibling in caught.value.problem and sibling in caught.value.fix for sibling in siblings)


def test_skips_that_keep_fused_groups_whole_are_accepted():
    for patterns in (["*o_proj"], ["*down_proj"], ["*q_proj", "*k_proj", "*v_proj"], ["*experts.0.*"], ["m.layers.0"]):
        assert resolve_user_skips(patterns, ATTENTION_AND_EXPERTS)

def test_quant_config_order_kv_and_exclusions():
    config = build_quant_config(get_recipe("fp8"), kv_cache="fp8", disabled_quantizer_patterns=["*layers.0.*.*"])
    entries = config["quant_cfg"]
    assert entries[0] == {"quantizer_name": "*", "enable": False}
    kv_index = next(i for i, entry in enumerate(entries) if entry["quantizer_name"] == "*[kv]_bmm_quantizer")
    assert entries[-1] == {"quantizer_name": "*layers.0.*.*", "enable": False}
    assert kv_index < len(entries) - 1
    # The preset itself is not mutated by our additions.
    import modelopt.torch.quantization as mtq

    assert {"quantizer_name": "*layers.0.*.*", "enable": False} not in mtq.FP8_DEFAULT_CFG["quant_cfg"]


def test_layerwise_config_shape_validates_in_modelopt():
    from modelopt.torch.quantization.config import MaxCalibConfig, QuantizeConfig

    config = build_quant_config(get_recipe("nvfp4"), layerwise=True, layerwise_checkpoint_dir="/tmp/ckpt")
    assert config["algorithm"] == {"method": "max", "layerwise": {"enable": True, "calib_mutates_weights": False,
                                                                  "checkpoint_dir": "/tmp/ckpt"}}
    QuantizeConfig(**config)
    validated = MaxCalibConfig(**config["algorithm"])
    assert validated.layerwise.enable is True and validated.layerwise.checkpoint_dir == "/tmp/ckpt"
    with pytest.raises(UserError):
        build_quant_config(get_recipe("nvfp4_awq"), layerwise=True)


def test_every_format_names_a_real_modelopt_config():
    import modelopt.torch.quantization as mtq

    for recipe in FORMATS.values():
        assert isinstance(getattr(mtq, recipe.modelopt_config), dict), recipe.modelopt_config


def test_gpu_only_format_refused_without_cuda():
    with pytest.raises(UserError) as caught:
        check_device_supports(get_recipe("nvfp4_awq"), cuda_available=False)
    assert caught.value.where == "--format"
    check_device_supports(get_recipe("nvfp4_awq"), cuda_available=True)
    check_device_supports(get_recipe("nvfp4"), cuda_available=False)


def test_cli_defaults_use_the_shipped_offline_mix(tiny_model_dir, tmp_path):
    from quantize.settings import DEFAULT_MIX, build_parser, settings_from_args

    settings = settings_from_args(build_parser().parse_args(["--input_model", str(tiny_model_dir), "--w4a8"]))
    assert settings.dataset_yaml == DEFAULT_MIX and DEFAULT_MIX.is_file()
    assert settings.format == "w4a8" and settings.output_model.name == "tiny-llama-W4A8"
    aliases = build_parser().parse_args(["--model", "m", "--output", "o", "--mix", "x.yaml", "--skip_layers", "a,b", "c"])
    assert (aliases.input_model, aliases.output_model, aliases.dataset_yaml) == ("m", "o", "x.yaml")
    assert aliases.skip_layers == ["a,b", "c"]
