"""The exported checkpoints have the files, tensors and configs the README's "Formats" section lists."""

from __future__ import annotations

import json

import pytest
import torch

from tests.quantize.conftest import SKIPPED_MODULE, load_tensors

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def quantized_linears(skip: set[str] = frozenset()):
    for layer in range(2):
        for linear in LINEARS:
            name = f"model.layers.{layer}.{linear}"
            if name not in skip:
                yield name


@pytest.fixture(scope="module")
def source_tensors(tiny_model_dir):
    return load_tensors(tiny_model_dir)


def decode_nvfp4(packed: torch.Tensor, weight_scale: torch.Tensor, weight_scale_2: torch.Tensor) -> torch.Tensor:
    """Even element in the low nibble; bit 3 sign, bits 0-2 index E2M1; block 16."""
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1).long()
    values = E2M1[codes & 0x7] * torch.where(codes & 0x8 > 0, -1.0, 1.0)
    scales = weight_scale.float().repeat_interleave(16, dim=1) * weight_scale_2.float()
    return values * scales


@pytest.mark.parametrize("format_name", ["nvfp4", "w4a16_nvfp4", "fp8"])
def test_checkpoint_files(quantized, format_name):
    names = {path.name for path in quantized[format_name].iterdir()}
    expected = {"config.json", "hf_quant_config.json", "generation_config.json", "quantize_manifest.json",
                "tokenizer.json", "tokenizer_config.json"}
    assert expected <= names
    assert any(name.endswith(".safetensors") for name in names)
    assert "chat_template.jinja" in names or "chat_template" in json.loads(
        (quantized[format_name] / "tokenizer_config.json").read_text())
    assert not [path for path in quantized[format_name].parent.iterdir() if path.name.startswith(".tmp-")]


@pytest.mark.parametrize(
    ("format_name", "quant_algo", "kv_algo"), [("nvfp4", "NVFP4", None), ("w4a16_nvfp4", "W4A16_NVFP4", None), ("fp8", "FP8", "FP8")]
)
def test_quant_configs(quantized, format_name, quant_algo, kv_algo):
    hf_quant = json.loads((quantized[format_name] / "hf_quant_config.json").read_text())
    assert hf_quant["producer"]["name"] == "modelopt"
    assert hf_quant["quantization"]["quant_algo"] == quant_algo
    assert hf_quant["quantization"]["kv_cache_quant_algo"] == kv_algo
    assert {"lm_head", "model.embed_tokens"} <= set(hf_quant["quantization"]["exclude_modules"])
    if format_name != "fp8":
        assert hf_quant["quantization"]["group_size"] == 16
    config = json.loads((quantized[format_name] / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["quantization_config"]["quant_method"] == "modelopt"
    assert config["quantization_config"]["quant_algo"] == quant_algo


@pytest.mark.parametrize("format_name", ["nvfp4", "w4a16_nvfp4"])
def test_nvfp4_tensors(quantized, source_tensors, format_name):
    tensors = load_tensors(quantized[format_name])
    skip = {SKIPPED_MODULE} if format_name == "nvfp4" else set()
    for name in quantized_linears(skip):
        source = source_tensors[f"{name}.weight"].float()
        out_features, in_features = source.shape
        assert tensors[f"{name}.weight"].dtype == torch.uint8
        assert tensors[f"{name}.weight"].shape == (out_features, in_features // 2)
        assert tensors[f"{name}.weight_scale"].dtype == torch.float8_e4m3fn
        assert tensors[f"{name}.weight_scale"].shape == (out_features, in_features // 16)
        assert tensors[f"{name}.weight_scale_2"].dtype == torch.float32
        assert tensors[f"{name}.weight_scale_2"].shape == ()
        if format_name == "nvfp4":
            assert tensors[f"{name}.input_scale"].dtype == torch.float32
            assert tensors[f"{name}.input_scale"].shape == ()
            assert tensors[f"{name}.input_scale"] > 0
        else:
            assert f"{name}.input_scale" not in tensors
        decoded = decode_nvfp4(tensors[f"{name}.weight"], tensors[f"{name}.weight_scale"], tensors[f"{name}.weight_scale_2"])
        relative_error = (decoded - source).norm() / source.norm()
        assert relative_error < 0.2, (name, float(relative_error))
    for name in ("lm_head.weight", "model.embed_tokens.weight"):
        assert tensors[name].dtype == torch.bfloat16
        assert torch.equal(tensors[name], source_tensors[name])


def test_nvfp4_shared_scales(quantized):
    """q/k/v share weight_scale_2 and input_scale, as do gate/up (fused kernels need it)."""
    tensors = load_tensors(quantized["nvfp4"])
    for layer in range(2):
        prefix = f"model.layers.{layer}"
        for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            block = "self_attn" if "q_proj" in group else "mlp"
            for suffix in ("weight_scale_2", "input_scale"):
                values = {float(tensors[f"{prefix}.{block}.{member}.{suffix}"]) for member in group}
                assert len(values) == 1, (prefix, group, suffix, values)


def test_fp8_tensors(quantized, source_tensors):
    tensors = load_tensors(quantized["fp8"])
    for name in quantized_linears():
        source = source_tensors[f"{name}.weight"].float()
        assert tensors[f"{name}.weight"].dtype == torch.float8_e4m3fn
        assert tensors[f"{name}.weight"].shape == source.shape
        assert tensors[f"{name}.weight_scale"].shape == ()
        assert tensors[f"{name}.input_scale"].dtype == torch.float32
        decoded = tensors[f"{name}.weight"].float() * tensors[f"{name}.weight_scale"]
        assert float(tensors[f"{name}.weight_scale"]) == pytest.approx(float(source.abs().max()) / 448, rel=1e-2)
        assert (decoded - source).norm() / source.norm() < 0.1
    # --kv_cache fp8: per-layer K and V scales beside the projections.
    for layer in range(2):
        for name in (f"model.layers.{layer}.self_attn.k_proj.k_scale", f"model.layers.{layer}.self_attn.v_proj.v_scale"):
            assert tensors[name].dtype == torch.float32 and tensors[name].shape == () and tensors[name] > 0


def test_w4a8_tensors(quantized, source_tensors):
    """NVFP4 weights with block-32 scales, FP8 activations (per-tensor input_scale)."""
    hf_quant = json.loads((quantized["w4a8"] / "hf_quant_config.json").read_text())
    assert hf_quant["quantization"]["quant_algo"] == "W4A8_NVFP4_FP8"
    tensors = load_tensors(quantized["w4a8"])
    for name in quantized_linears():
        out_features, in_features = source_tensors[f"{name}.weight"].shape
        assert tensors[f"{name}.weight"].dtype == torch.uint8
        assert tensors[f"{name}.weight"].shape == (out_features, in_features // 2)
        assert tensors[f"{name}.weight_scale"].shape == (out_features, in_features // 32)
        assert tensors[f"{name}.input_scale"].shape == ()


def test_skip_layers_keeps_module_in_bf16(quantized, source_tensors):
    tensors = load_tensors(quantized["nvfp4"])
    assert tensors[f"{SKIPPED_MODULE}.weight"].dtype == torch.bfloat16
    assert torch.equal(tensors[f"{SKIPPED_MODULE}.weight"], source_tensors[f"{SKIPPED_MODULE}.weight"])
    assert not [name for name in tensors if name.startswith(SKIPPED_MODULE + ".") and "scale" in name]
    hf_quant = json.loads((quantized["nvfp4"] / "hf_quant_config.json").read_text())
    assert SKIPPED_MODULE in hf_quant["quantization"]["exclude_modules"]
    # The same module in the other layer is still quantized: the glob hit only layer 1.
    assert tensors["model.layers.0.mlp.down_proj.weight"].dtype == torch.uint8


def test_manifest(quantized, tiny_model_dir, mix_yaml):
    from transformers import AutoTokenizer

    from quantize.calibration import build_calibration_set

    manifest = json.loads((quantized["nvfp4"] / "quantize_manifest.json").read_text())
    reference = build_calibration_set(str(mix_yaml), AutoTokenizer.from_pretrained(tiny_model_dir))
    assert manifest["source"]["model"] == str(tiny_model_dir.resolve())
    assert manifest["calibration"]["samples"] == len(reference.samples) == 12
    assert manifest["calibration"]["token_ids_sha256"] == reference.token_ids_sha256
    assert manifest["calibration"]["mix_sha256"] == reference.mix_sha256
    assert manifest["quantization"]["format"] == "nvfp4"
    assert manifest["quantization"]["modelopt_config"] == "NVFP4_DEFAULT_CFG"
    assert manifest["quantization"]["skipped"]["*layers.1.mlp.down_proj"] == [SKIPPED_MODULE]
    assert manifest["quantization"]["skipped"]["*lm_head"] == ["lm_head"]
    assert manifest["libraries"]["nvidia-modelopt"] == "0.47.0"
    assert manifest["libraries"]["transformers"].startswith("5.")
    assert set(manifest["timings_s"]) >= {"load", "calibrate", "export", "total"}
    assert manifest["peak_memory_bytes"]["cpu_rss"] > 10 * 2**20
