"""--backend llmcompressor writes a compressed-tensors NVFP4 checkpoint from the same calibration set."""

from __future__ import annotations

import json

import pytest
import torch

from tests.quantize.conftest import SKIPPED_MODULE, load_tensors, quantize_args, run_cli


@pytest.fixture(scope="module")
def llmcompressor_output(tiny_model_dir, mix_yaml, work_dir):
    output = work_dir / "llmcompressor_nvfp4"
    run_cli(quantize_args(tiny_model_dir, mix_yaml, output, "--backend", "llmcompressor", "--format", "nvfp4",
                          "--skip_layers", "*layers.1.mlp.down_proj"))
    return output


def test_compressed_tensors_layout(llmcompressor_output, tiny_model_dir):
    tensors = load_tensors(llmcompressor_output)
    source = load_tensors(tiny_model_dir)
    name = "model.layers.0.self_attn.q_proj"
    out_features, in_features = source[f"{name}.weight"].shape
    assert tensors[f"{name}.weight_packed"].dtype == torch.uint8
    assert tensors[f"{name}.weight_packed"].shape == (out_features, in_features // 2)
    assert tensors[f"{name}.weight_scale"].dtype == torch.float8_e4m3fn
    assert tensors[f"{name}.weight_scale"].shape == (out_features, in_features // 16)
    assert tensors[f"{name}.weight_global_scale"].dtype == torch.float32
    assert f"{name}.input_global_scale" in tensors
    assert tensors[f"{SKIPPED_MODULE}.weight"].dtype == torch.bfloat16
    assert not [key for key in tensors if key.startswith(SKIPPED_MODULE + ".") and key != f"{SKIPPED_MODULE}.weight"]

    config = json.loads((llmcompressor_output / "config.json").read_text())
    quantization = config["quantization_config"]
    assert quantization["quant_method"] == "compressed-tensors"
    assert quantization["config_groups"]["group_0"]["format"] == "nvfp4-pack-quantized"
    assert "lm_head" in json.dumps(quantization["ignore"])
    manifest = json.loads((llmcompressor_output / "quantize_manifest.json").read_text())
    assert manifest["quantization"]["backend"] == "llmcompressor"
    assert manifest["calibration"]["samples"] == 12


def test_global_scale_is_the_reciprocal_of_modelopts(llmcompressor_output, quantized):
    """compressed-tensors global scales are the reciprocals of ModelOpt's weight_scale_2.

    Up to bf16 rounding: llm-compressor 0.14 computes the global scale in the
    model's dtype (measured: 36352 = bf16(2688 / amax) where ModelOpt keeps
    amax / 2688 in fp32), so the match is to bf16's 2^-8 relative precision.
    """
    ours, modelopt = load_tensors(llmcompressor_output), load_tensors(quantized["nvfp4"])
    for name in ("model.layers.0.self_attn.o_proj", "model.layers.1.mlp.gate_proj"):
        reciprocal = 1.0 / float(ours[f"{name}.weight_global_scale"])
        assert reciprocal == pytest.approx(float(modelopt[f"{name}.weight_scale_2"]), rel=2**-8), name


def test_disk_offloaded_model_gives_the_same_checkpoint(llmcompressor_output, tiny_model_dir, mix_yaml, work_dir):
    output = work_dir / "llmcompressor_nvfp4_offloaded"
    run_cli(quantize_args(tiny_model_dir, mix_yaml, output, "--backend", "llmcompressor", "--format", "nvfp4",
                          "--skip_layers", "*layers.1.mlp.down_proj", "--offload_folder", str(work_dir / "llmc_offload"),
                          "--max_cpu_memory", "0"), offload=True)
    manifest = json.loads((output / "quantize_manifest.json").read_text())
    assert manifest["placement"]["layers_per_device"] == {"disk": 2}
    offloaded, in_memory = load_tensors(output), load_tensors(llmcompressor_output)
    assert offloaded.keys() == in_memory.keys()
    for name, tensor in in_memory.items():
        assert torch.equal(offloaded[name].view(torch.uint8), tensor.view(torch.uint8)) \
            if tensor.dtype == torch.float8_e4m3fn else torch.equal(offloaded[name], tensor), name
