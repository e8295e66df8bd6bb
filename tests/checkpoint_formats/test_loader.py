"""Our loader against ModelOpt's own dequantization, on checkpoints ModelOpt exported."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from checkpoint_formats import nvfp4
from checkpoint_formats.detect import FormatKind, detect_format
from checkpoint_formats.loader import load_checkpoint
from checkpoint_formats.modules import FP8Linear, NVFP4Linear
from foundation.errors import UserError

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(42))

CASES = [
    ("llama_nvfp4", FormatKind.MODELOPT_NVFP4),
    ("llama_w4a16_tied", FormatKind.MODELOPT_W4A16_NVFP4),
    ("llama_w4a8", FormatKind.MODELOPT_W4A8),
    ("llama_fp8", FormatKind.MODELOPT_FP8),
    ("moe_nvfp4", FormatKind.MODELOPT_NVFP4),
]


@torch.no_grad()
@pytest.mark.parametrize("name,kind", CASES)
def test_logits_equal_modelopt_dequantized_reference(modelopt_checkpoint, reference_model, name, kind):
    path, _ = modelopt_checkpoint(name)
    expected = reference_model(path)(IDS).logits
    for dequantize in (True, False):
        model, fmt = load_checkpoint(path, dequantize=dequantize)
        assert fmt.kind == kind
        assert torch.equal(model(IDS).logits, expected), f"{name} dequantize={dequantize}"


@torch.no_grad()
def test_dequantized_weights_stay_near_the_original(modelopt_checkpoint):
    path, original = modelopt_checkpoint("moe_nvfp4")
    model, _ = load_checkpoint(path, dequantize=True)
    loaded = model.state_dict()
    for name in [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.mlp.experts.gate_up_proj",
        "model.layers.1.mlp.experts.down_proj",
    ]:
        error = (loaded[name].float() - original[name].float()).norm() / original[name].float().norm()
        assert error < 0.15, (name, float(error))  # NVFP4 of Gaussian weights: ~0.1 relative error
    assert torch.equal(loaded["model.embed_tokens.weight"], original["model.embed_tokens.weight"])


def test_packed_modules_keep_checkpoint_tensors(modelopt_checkpoint):
    from safetensors.torch import load_file

    path, _ = modelopt_checkpoint("llama_nvfp4")
    raw = load_file(str(path / "model.safetensors"))
    model, _ = load_checkpoint(path)
    q_proj = model.model.layers[1].self_attn.q_proj
    assert isinstance(q_proj, NVFP4Linear)
    prefix = "model.layers.1.self_attn.q_proj"
    for attr in ("weight", "weight_scale", "weight_scale_2", "input_scale"):
        assert torch.equal(
            getattr(q_proj, attr).reshape(-1).view(torch.uint8), raw[f"{prefix}.{attr}"].reshape(-1).view(torch.uint8)
        )
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight.dtype == torch.bfloat16
    fp8_model, _ = load_checkpoint(modelopt_checkpoint("llama_fp8")[0])
    assert isinstance(fp8_model.model.layers[0].mlp.down_proj, FP8Linear)


@torch.no_grad()
def test_simulated_activations_round_inputs_like_the_kernel(modelopt_checkpoint):
    path, _ = modelopt_checkpoint("llama_nvfp4")
    plain, _ = load_checkpoint(path)
    simulated, _ = load_checkpoint(path, simulate_activations=True)
    layer = simulated.model.layers[0].mlp.down_proj
    x = torch.randn(3, layer.in_features).to(torch.bfloat16)
    expected = nn.functional.linear(nvfp4.fake_quantize_activation(x, layer.input_scale), layer.dequantized_weight())
    assert torch.equal(layer(x), expected)
    a, b = plain(IDS).logits.float(), simulated(IDS).logits.float()
    assert not torch.equal(a, b) and (a - b).norm() / a.norm() < 0.2


def test_lora_attaches_to_dequantized_model(modelopt_checkpoint):
    from peft import LoraConfig, get_peft_model

    model, _ = load_checkpoint(modelopt_checkpoint("llama_nvfp4")[0], dequantize=True)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["o_proj", "down_proj"]))
    assert peft_model.get_nb_trainable_parameters()[0] > 0
    assert torch.isfinite(peft_model(IDS).logits).all()


def test_bad_dtype_and_flags_are_user_errors(modelopt_checkpoint):
    path, _ = modelopt_checkpoint("llama_fp8")
    with pytest.raises(UserError, match="dtype"):
        load_checkpoint(path, dtype=torch.float8_e4m3fn)
    with pytest.raises(UserError, match="simulate_activations"):
        load_checkpoint(path, dequantize=True, simulate_activations=True)
    with pytest.raises(UserError, match="w4a16"):
        load_checkpoint(modelopt_checkpoint("llama_w4a16_tied")[0], simulate_activations=True)
    with pytest.raises(UserError, match="disk"):
        load_checkpoint(path, device_map={"": "disk"})


@torch.no_grad()
def test_explicit_device_map_and_float32(modelopt_checkpoint):
    path, _ = modelopt_checkpoint("llama_nvfp4")
    model, _ = load_checkpoint(
        path, dequantize=True, dtype=torch.float32, device_map={"model": "cpu", "lm_head": "cpu"}
    )
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    assert torch.isfinite(model(IDS).logits).all()


def test_detect_reads_modelopt_metadata(modelopt_checkpoint):
    fmt = detect_format(modelopt_checkpoint("llama_w4a8")[0])
    assert (fmt.kind, fmt.group_size, fmt.quant_algo) == (FormatKind.MODELOPT_W4A8, 32, "W4A8_NVFP4_FP8")
    assert fmt.producer.startswith("modelopt") and "lm_head" in fmt.exclude_modules and fmt.activations_quantized


@torch.no_grad()
def test_switching_simulation_off_gives_the_dequantized_model(modelopt_checkpoint):
    from checkpoint_formats.modules import set_activation_simulation

    path, _ = modelopt_checkpoint("llama_w4a8")
    simulated, _ = load_checkpoint(path, simulate_activations=True)
    dequantized, _ = load_checkpoint(path, dequantize=True)
    with_rounding = simulated(IDS).logits
    assert set_activation_simulation(simulated, False) == 14  # 7 Linears x 2 layers
    assert torch.equal(simulated(IDS).logits, dequantized(IDS).logits)
    set_activation_simulation(simulated, True)
    assert torch.equal(simulated(IDS).logits, with_rounding) and not torch.equal(with_rounding, dequantized(IDS).logits)


@torch.no_grad()
def test_fused_experts_stay_packed_until_their_forward(modelopt_checkpoint):
    path, _ = modelopt_checkpoint("moe_nvfp4")
    model, _ = load_checkpoint(path)
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj is None and experts.gate_up_proj_packed.dtype == torch.uint8
    assert experts.gate_up_proj_packed.shape == (4, 64, 32) and experts.gate_up_proj_weight_scale_2.shape == (4, 2)
    seen = {}

    def record(module, args, output):
        seen["dtype"] = module.gate_up_proj.dtype

    handle = experts.register_forward_hook(record, prepend=True)
    model(IDS)
    handle.remove()
    assert seen["dtype"] == torch.bfloat16 and experts.gate_up_proj is None  # materialized only inside forward
    packed_bytes = sum(b.numel() * b.element_size() for n, b in experts.named_buffers())
    assert packed_bytes < 0.3 * (4 * 64 * 64 + 4 * 64 * 32) * 2


@torch.no_grad()
def test_awq_pre_quant_scale_multiplies_the_input(modelopt_checkpoint, tmp_path):
    """ModelOpt semantics: the input quantizer computes ``x * pre_quant_scale`` before rounding."""
    import shutil

    from safetensors.torch import load_file, save_file

    src, _ = modelopt_checkpoint("llama_nvfp4")
    awq = tmp_path / "awq"
    shutil.copytree(src, awq)
    tensors = load_file(str(awq / "model.safetensors"))
    scale = torch.rand(64, generator=torch.Generator().manual_seed(2)).add(0.5).to(torch.bfloat16)
    tensors["model.layers.0.mlp.down_proj.pre_quant_scale"] = torch.cat([scale, scale])
    save_file(tensors, str(awq / "model.safetensors"))
    packed, _ = load_checkpoint(awq)
    dequantized, _ = load_checkpoint(awq, dequantize=True)
    layer = packed.model.layers[0].mlp.down_proj
    x = torch.randn(3, 128).to(torch.bfloat16)
    w = layer.dequantized_weight()
    assert torch.equal(layer(x), nn.functional.linear(x * layer.pre_quant_scale, w))
    folded = (layer.dequantized_weight(torch.float32) * layer.pre_quant_scale.float()).to(torch.bfloat16)
    assert torch.equal(dequantized.model.layers[0].mlp.down_proj.weight, folded)
    assert torch.equal(layer.to_linear().weight, folded)


def test_only_16_blocks_go_to_the_gpu_kernel(modelopt_checkpoint):
    """W4A8's 32-code blocks are not what the Triton kernels decode: those Linears take the dequantize path.

    (The H200 algorithm bench of 2026-12-02 hit the kernel's scale-shape check on a W4A8 checkpoint.)"""
    for name, block in (("llama_nvfp4", 16), ("llama_w4a8", 32)):
        model, _ = load_checkpoint(modelopt_checkpoint(name)[0])
        linears = [m for m in model.modules() if isinstance(m, NVFP4Linear)]
        assert linears and {m.block_size for m in linears} == {block}
        assert all(m.kernel_block_size_ok == (block == 16) for m in linears)
