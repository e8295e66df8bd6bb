"""Unquantized checkpoints and compressed-tensors FP8, each against transformers' own loading."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file, save_file

from checkpoint_formats.detect import FormatKind, detect_format
from checkpoint_formats.loader import load_checkpoint
from checkpoint_formats.modules import FP8Linear

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(9))


@torch.no_grad()
def test_plain_bf16_checkpoint_loads_like_from_pretrained(tmp_path, make_tiny_llama):
    torch.manual_seed(0)
    model = make_tiny_llama().to(torch.bfloat16).eval()
    model.save_pretrained(tmp_path / "plain")
    loaded, fmt = load_checkpoint(tmp_path / "plain", dequantize=True)
    assert fmt.kind == FormatKind.BF16
    original = model.state_dict()
    assert all(torch.equal(tensor, original[name]) for name, tensor in loaded.state_dict().items())
    assert torch.isfinite(loaded(IDS).logits).all()


def _modelopt_fp8_to_ct_fp8(src, dst):
    """compressed-tensors 'float-quantized' per-tensor FP8: same tensors, [1]-shaped scales, CT config."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import FP8

    dst.mkdir()
    tensors = load_file(str(src / "model.safetensors"))
    tensors = {k: v.reshape(1) if k.endswith(("weight_scale", "input_scale")) else v for k, v in tensors.items()}
    save_file(tensors, str(dst / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    quant = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], **FP8)},
        format="float-quantized",
        quantization_status="compressed",
        ignore=["lm_head"],
    )
    config["quantization_config"] = json.loads(json.dumps(quant.model_dump(), default=str))
    config["quantization_config"]["quant_method"] = "compressed-tensors"
    (dst / "config.json").write_text(json.dumps(config))


@torch.no_grad()
def test_compressed_tensors_fp8_matches_transformers(modelopt_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    src, _ = modelopt_checkpoint("llama_fp8")
    _modelopt_fp8_to_ct_fp8(src, tmp_path / "ct_fp8")
    fmt = detect_format(tmp_path / "ct_fp8")
    assert fmt.kind == FormatKind.CT_FP8 and fmt.activations_quantized
    theirs = AutoModelForCausalLM.from_pretrained(
        tmp_path / "ct_fp8", dtype=torch.bfloat16, quantization_config=CompressedTensorsConfig(run_compressed=False)
    ).eval()
    ours, _ = load_checkpoint(tmp_path / "ct_fp8", dequantize=True)
    ours_state, their_state = ours.state_dict(), theirs.state_dict()
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        # compressed-tensors rounds the scale to bf16 before multiplying; we multiply in float32
        # (as ModelOpt does), so the two differ by at most one bf16 rounding step
        a, b = ours_state[name].float(), their_state[name].float()
        assert bool(((a - b).abs() <= b.abs() * 2**-7).all()), name
    packed, _ = load_checkpoint(tmp_path / "ct_fp8")
    assert isinstance(packed.model.layers[0].mlp.up_proj, FP8Linear)
    assert torch.equal(packed(IDS).logits, ours(IDS).logits)
    # same weights as the ModelOpt FP8 original
    modelopt_model, _ = load_checkpoint(src, dequantize=True)
    assert torch.equal(modelopt_model(IDS).logits, ours(IDS).logits)
