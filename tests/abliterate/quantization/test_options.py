"""Option names -> torchao config objects, overrides, and the settings fields (pure, no model)."""

import pytest
import torch

from abliterate.quantization.options import (
    OPTIONS,
    QuantizationRequest,
    check_overrides,
    torchao_config,
    torchao_quant_type,
)
from abliterate.settings import parse_settings
from foundation.errors import UserError

torchao_quantization = pytest.importorskip("torchao.quantization")


@pytest.mark.parametrize(("option", "cpu_class", "cuda_class"), [
    ("torchao_int4_weight_only", "IntxWeightOnlyConfig", "Int4WeightOnlyConfig"),
    ("torchao_int8_weight_only", "Int8WeightOnlyConfig", "Int8WeightOnlyConfig"),
    ("torchao_int8_dynamic", "Int8DynamicActivationInt8WeightConfig", "Int8DynamicActivationInt8WeightConfig"),
    ("torchao_float8_weight_only", "Float8WeightOnlyConfig", "Float8WeightOnlyConfig"),
    ("torchao_float8_dynamic", "Float8DynamicActivationFloat8WeightConfig", "Float8DynamicActivationFloat8WeightConfig"),
])
def test_each_torchao_option_is_a_config_object_with_a_cpu_layout_where_needed(option, cpu_class, cuda_class):
    assert type(torchao_config(option, group_size=64, device_type="cpu")).__name__ == cpu_class
    assert type(torchao_config(option, group_size=64, device_type="cuda")).__name__ == cuda_class


def test_int4_group_size_reaches_both_layouts():
    cuda = torchao_config("torchao_int4_weight_only", group_size=64, device_type="cuda")
    assert cuda.group_size == 64 and cuda.int4_packing_format.value == "tile_packed_to_4d"  # no mslk needed
    cpu = torchao_config("torchao_int4_weight_only", group_size=32, device_type="cpu")
    assert cpu.weight_dtype == torch.int4 and cpu.granularity.group_size == 32


def test_autoquant_has_no_config_object():
    with pytest.raises(ValueError, match="autoquant"):
        torchao_config("torchao_autoquant", group_size=128, device_type="cuda")


def test_overrides_become_an_fqn_config_with_regex_keys_and_a_default():
    request = QuantizationRequest("torchao_int8_weight_only", 32, False,
                                  ((r"model\.layers\.0\..*", "none"), (r".*down_proj", "torchao_int4_weight_only")))
    quant_type = torchao_quant_type(request, "cpu")
    assert type(quant_type).__name__ == "FqnToConfig"
    keys = list(quant_type.fqn_to_config)
    assert keys == [r"re:model\.layers\.0\..*", "re:.*down_proj", "_default"]
    assert quant_type.fqn_to_config[keys[0]] is None
    assert type(quant_type.fqn_to_config[keys[1]]).__name__ == "IntxWeightOnlyConfig"
    assert type(quant_type.fqn_to_config["_default"]).__name__ == "Int8WeightOnlyConfig"
    # a plain request stays a plain config
    assert type(torchao_quant_type(QuantizationRequest("torchao_int8_dynamic"), "cpu")).__name__ == "Int8DynamicActivationInt8WeightConfig"


def test_first_matching_override_wins_on_the_whole_name():
    request = QuantizationRequest("torchao_int8_weight_only", overrides=((r".*\.0\..*", "none"), (r".*proj", "torchao_int4_weight_only")))
    assert request.option_for("model.layers.0.mlp.down_proj") == "none"
    assert request.option_for("model.layers.1.mlp.down_proj") == "torchao_int4_weight_only"
    assert request.option_for("model.layers.1.mlp.down_proj_extra") == "torchao_int8_weight_only"  # full match only
    assert request.options_used() == {"torchao_int8_weight_only", "torchao_int4_weight_only"}


@pytest.mark.parametrize(("option", "overrides", "message"), [
    ("nvfp4", {"a": "torchao_int8_weight_only"}, "allowed"),
    ("bnb_4bit", {"a": "nvfp4"}, "allowed"),
    ("torchao_int8_weight_only", {"a": "bnb_4bit"}, "allowed"),
    ("torchao_int8_weight_only", {"a": "int3"}, "unknown option"),
    ("torchao_int8_weight_only", {"(": "none"}, "regular expression"),
    ("none", {"a": "torchao_int8_weight_only"}, "other than 'none'"),
])
def test_bad_overrides_are_refused(option, overrides, message):
    with pytest.raises(ValueError, match=message):
        check_overrides(option, overrides)


def test_settings_flags_build_the_request():
    settings = parse_settings(["--model", "m", "--quantization", "torchao_int4_weight_only", "--torchao_group_size", "32",
                               "--torchao_include_embedding", "--quantization_overrides", '{"lm_.*": "none"}'])
    assert settings.quantization_request() == QuantizationRequest("torchao_int4_weight_only", 32, True, (("lm_.*", "none"),))
    assert parse_settings(["--model", "m"]).quantization_request().enabled is False
    assert set(OPTIONS) >= {"none", "bnb_4bit", "nvfp4", "torchao_autoquant"}


@pytest.mark.parametrize("argv", [["--quantization", "int4"], ["--quantization", "nvfp4", "--quantization_overrides", '{"x": "torchao_int8_dynamic"}']])
def test_settings_refuse_unknown_choices_by_flag(argv):
    with pytest.raises(UserError, match="--quantization"):
        parse_settings(["--model", "m", *argv])
