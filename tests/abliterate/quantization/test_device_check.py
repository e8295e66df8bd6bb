"""A configuration the device cannot run is refused before loading, naming option, device and alternative."""

import importlib.util
import time

import pytest

from abliterate.loading import load_model
from abliterate.quantization.device_check import (
    DeviceFacts,
    check_runs_here,
    device_facts,
    target_device_type,
)
from abliterate.quantization.options import QuantizationRequest
from foundation.errors import UserError

CPU = DeviceFacts("cpu", None, bitsandbytes_installed=True, torchao_has_autoquant=True)
A100 = DeviceFacts("cuda", (8, 0), bitsandbytes_installed=True, torchao_has_autoquant=True)
H100 = DeviceFacts("cuda", (9, 0), bitsandbytes_installed=True, torchao_has_autoquant=True)


def _refusal(option: str, facts: DeviceFacts, overrides=()) -> UserError:
    with pytest.raises(UserError) as raised:
        check_runs_here(QuantizationRequest(option, overrides=overrides), facts)
    return raised.value


@pytest.mark.parametrize("option", ["torchao_int8_weight_only", "torchao_int8_dynamic", "torchao_float8_weight_only",
                                    "torchao_int4_weight_only", "nvfp4", "bnb_4bit", "none"])
def test_cpu_capable_options_pass_on_cpu(option):
    check_runs_here(QuantizationRequest(option), CPU)


def test_float8_dynamic_is_refused_on_cpu_with_an_alternative():
    error = _refusal("torchao_float8_dynamic", CPU)
    assert error.where == "--quantization"
    assert "'torchao_float8_dynamic'" in error.problem and "CPU" in error.problem
    assert "torchao_float8_weight_only" in error.fix


def test_float8_dynamic_needs_compute_capability_8_9():
    error = _refusal("torchao_float8_dynamic", A100)
    assert "compute capability 8.0" in error.problem and "torchao_int8_dynamic" in error.fix
    check_runs_here(QuantizationRequest("torchao_float8_dynamic"), H100)


def test_autoquant_is_refused_where_torchao_lacks_it_and_on_cpu():
    without = DeviceFacts("cuda", (9, 0), True, torchao_has_autoquant=False)
    assert "no longer ships autoquant" in _refusal("torchao_autoquant", without).problem
    error = _refusal("torchao_autoquant", CPU)
    assert "needs a GPU" in error.problem and "torchao_int8_weight_only" in error.fix


def test_missing_bitsandbytes_is_named_with_the_install_command():
    error = _refusal("bnb_4bit", DeviceFacts("cpu", None, bitsandbytes_installed=False, torchao_has_autoquant=False))
    assert "bitsandbytes is not installed" in error.problem
    assert "quant-abliterate[gpu]" in error.fix and "torchao_int4_weight_only" in error.fix


def test_an_override_that_cannot_run_is_named_as_such():
    error = _refusal("torchao_int8_weight_only", CPU, overrides=((".*down_proj", "torchao_float8_dynamic"),))
    assert error.where == "--quantization_overrides" and "torchao_float8_dynamic" in error.problem


@pytest.mark.parametrize(("device_map", "expected"), [
    (None, "cpu"), ("cpu", "cpu"), ("cuda:0", "cuda"), (0, "cuda"), ({"": "cpu"}, "cpu"), ({"model": 0, "lm_head": "cpu"}, "cuda"),
])
def test_target_device_type(device_map, expected):
    assert target_device_type(device_map) == expected


def test_this_machine_facts_match_the_installed_packages():
    facts = device_facts("cpu")
    assert facts.device_type == "cpu"
    assert facts.bitsandbytes_installed == (importlib.util.find_spec("bitsandbytes") is not None)
    assert facts.torchao_has_autoquant is False  # torchao 0.18 removed it


@pytest.mark.parametrize("option", ["torchao_float8_dynamic", "torchao_autoquant"])
def test_load_model_refuses_gpu_only_options_before_loading(tiny_llama_dir, option):
    started = time.perf_counter()
    with pytest.raises(UserError) as raised:
        load_model(str(tiny_llama_dir), dtypes=["bfloat16"], device_map="cpu", quantization=QuantizationRequest(option))
    assert option in str(raised.value) and "fix:" in str(raised.value)
    assert time.perf_counter() - started < 5  # refused up front, not after torchao failed on every weight


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed here")
def test_load_model_without_bitsandbytes_says_how_to_install_it(tiny_llama_dir):
    with pytest.raises(UserError, match=r"bitsandbytes is not installed.*\n.*fix: pip install"):
        load_model(str(tiny_llama_dir), dtypes=["bfloat16"], device_map="cpu", quantization=QuantizationRequest("bnb_4bit"))


def test_an_already_quantized_checkpoint_is_not_quantized_again(tiny_llama_dir, monkeypatch):
    monkeypatch.setattr("abliterate.loading._quantized_format", lambda path: "ModelOpt NVFP4")
    with pytest.raises(UserError, match="already quantized"):
        load_model(str(tiny_llama_dir), dtypes=["bfloat16"], device_map="cpu",
                   quantization=QuantizationRequest("torchao_int8_weight_only"))
