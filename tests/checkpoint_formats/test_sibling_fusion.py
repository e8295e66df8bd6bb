"""q/k/v and gate/up of a packed NVFP4 model in one matmul each: same logits, views instead of copies, and only
where the fused product is exactly the members' (sibling_fusion)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from checkpoint_formats import nvfp4, nvfp4_matmul, sibling_fusion
from checkpoint_formats.modules import NVFP4Linear, set_activation_simulation
from tests.tiny_models import dense_llama


def _reference_linear(x, packed, weight_scale, weight_scale_2, bias=None):
    """The kernel's contract in pure torch (the CPU has no kernel): x @ dequant(W)^T + bias in x's dtype."""
    weight = nvfp4.dequantize_weight(nvfp4.NVFP4Weight(packed, weight_scale, weight_scale_2), torch.float32)
    out = x.float() @ weight.T + (0 if bias is None else bias.float())
    return out.to(x.dtype)


@pytest.fixture
def kernel_on_cpu(monkeypatch):
    """Make the CPU look like a device where the matmul kernel runs, with ``_reference_linear`` as the kernel."""
    calls = []

    def linear(*args):
        calls.append(args[1].shape)
        return _reference_linear(*args)

    monkeypatch.setattr(nvfp4_matmul, "available", lambda device: True)
    monkeypatch.setattr(nvfp4_matmul, "nvfp4_linear", linear)
    return calls


def _packed(model: nn.Module, shared_scale: bool = True) -> nn.Module:
    """Every q/k/v/o and MLP Linear of ``model`` as an NVFP4Linear, siblings sharing weight_scale_2 (as ModelOpt
    exports them) unless ``shared_scale`` is False."""
    for layer in model.model.layers:
        for parent, group in ((layer.self_attn, ("q_proj", "k_proj", "v_proj")), (layer.mlp, ("gate_proj", "up_proj"))):
            scale = max(getattr(parent, n).weight.abs().max() for n in group) / (6 * 448) if shared_scale else None
            for name in group:
                setattr(parent, name, _nvfp4(getattr(parent, name), scale))
        layer.self_attn.o_proj = _nvfp4(layer.self_attn.o_proj, None)
        layer.mlp.down_proj = _nvfp4(layer.mlp.down_proj, None)
    return model


def _nvfp4(linear: nn.Linear, scale) -> NVFP4Linear:
    q = nvfp4.quantize_weight(linear.weight.detach(), weight_scale_2=None if scale is None else scale.float())
    module = NVFP4Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, dtype=torch.float32)
    module.weight, module.weight_scale, module.weight_scale_2 = q.packed, q.weight_scale, q.weight_scale_2
    if linear.bias is not None:
        module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return module


def _model(seed: int = 0, shared_scale: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    return _packed(dense_llama(layers=2).float().eval(), shared_scale)


def test_fused_groups_give_the_members_logits_with_one_matmul_per_group(kernel_on_cpu) -> None:
    ids = torch.randint(1, 100, (3, 7), generator=torch.Generator().manual_seed(1))
    reference = _model()
    with torch.no_grad():
        expected = reference(ids).logits
    kernel_on_cpu.clear()
    model = _model()
    assert sibling_fusion.fuse_siblings(model) == 4  # two layers x (q/k/v, gate/up)
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    q, k, v = (getattr(model.model.layers[0].self_attn, n) for n in ("q_proj", "k_proj", "v_proj"))
    widths = {q.out_features + k.out_features + v.out_features, model.model.layers[0].mlp.gate_proj.out_features * 2}
    assert {shape[0] for shape in kernel_on_cpu} == widths  # one launch per group, none per member
    assert len(kernel_on_cpu) == 4
    with torch.inference_mode():  # as generate and the trials run: inference tensors keep no version counter
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert len(kernel_on_cpu) == 8


def test_members_hold_views_of_one_buffer_not_copies(kernel_on_cpu) -> None:
    model = _model()
    attention = model.model.layers[0].self_attn
    before = {n: getattr(attention, n).weight.clone() for n in ("q_proj", "k_proj", "v_proj")}
    sibling_fusion.fuse_siblings(model)
    shared = attention.q_proj.shared_product
    assert shared is attention.k_proj.shared_product is attention.v_proj.shared_product
    for name, weight in before.items():
        member = getattr(attention, name)
        assert torch.equal(member.weight, weight)
        assert member.weight.untyped_storage().data_ptr() == shared.weight.untyped_storage().data_ptr()
    assert attention.o_proj.shared_product is None  # the edited projections stay alone


def test_an_input_changed_in_place_between_members_is_not_served_stale(kernel_on_cpu) -> None:
    model = _model()
    sibling_fusion.fuse_siblings(model)
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, mlp.gate_proj.in_features)
    mlp.gate_proj(x)
    x.mul_(2)  # same tensor, new values: the product computed for gate is stale for up
    up = mlp.up_proj(x)
    torch.testing.assert_close(up, F.linear(x, mlp.up_proj.dequantized_weight(torch.float32)), rtol=1e-5, atol=1e-5)
    assert mlp.gate_proj.shared_product is None and mlp.up_proj.shared_product is None  # dissolved


def test_the_product_is_let_go_once_every_member_has_its_columns(kernel_on_cpu) -> None:
    """No [tokens, width] product outlives its layer."""
    model = _model()
    sibling_fusion.fuse_siblings(model)
    attention = model.model.layers[0].self_attn
    shared = attention.q_proj.shared_product
    x = torch.randn(4, attention.q_proj.in_features)
    attention.q_proj(x)
    attention.k_proj(x)
    assert shared._output is not None
    attention.v_proj(x)
    assert shared._output is None and shared._input is None
    assert len(kernel_on_cpu) == 1


def test_members_called_on_different_inputs_dissolve_the_group(kernel_on_cpu) -> None:
    """As in cross-attention (q on the hidden states, k/v on an encoder's): each member multiplies on its own
    again, with the right answer, and no product is kept waiting for members that never come."""
    model = _model()
    sibling_fusion.fuse_siblings(model)
    attention = model.model.layers[0].self_attn
    hidden, encoder = torch.randn(3, attention.q_proj.in_features), torch.randn(5, attention.q_proj.in_features)
    attention.q_proj(hidden)
    k = attention.k_proj(encoder)
    torch.testing.assert_close(k, F.linear(encoder, attention.k_proj.dequantized_weight(torch.float32)),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    assert all(getattr(attention, n).shared_product is None for n in ("q_proj", "k_proj", "v_proj"))


def test_biased_siblings_add_their_own_bias(kernel_on_cpu) -> None:
    """Qwen2-style q/k/v biases: the fused product adds each member's bias to its own columns."""
    from tests.tiny_models import llama_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(2)
    ids = torch.randint(1, 100, (2, 6), generator=torch.Generator().manual_seed(3))
    models = []
    for _ in range(2):
        torch.manual_seed(2)
        models.append(_packed(AutoModelForCausalLM.from_config(llama_config(attention_bias=True, mlp_bias=True)).float().eval()))
    with torch.no_grad():
        for model in models:  # transformers starts biases at zero: give every sibling the same random ones
            generator = torch.Generator().manual_seed(4)
            for module in model.modules():
                if isinstance(module, NVFP4Linear) and module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=generator))
        expected = models[0](ids).logits
        assert sibling_fusion.fuse_siblings(models[1]) > 0
        torch.testing.assert_close(models[1](ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_groups_whose_product_would_differ_stay_apart(kernel_on_cpu, monkeypatch) -> None:
    assert sibling_fusion.fuse_siblings(_model(shared_scale=False)) == 0  # weight_scale_2 differ
    model = _model()
    model.model.layers[0].self_attn.k_proj.pre_quant_scale = torch.ones(model.config.hidden_size)  # AWQ pre-scale
    model.model.layers[1].mlp.up_proj._hf_hook = object()  # an accelerate hook moves its weights
    model.model.layers[1].self_attn.v_proj.activation_mode = "fp8"
    model.model.layers[1].self_attn.v_proj.simulate_activations = True  # its input is rounded
    assert sibling_fusion.fuse_siblings(model) == 1
    assert model.model.layers[0].self_attn.q_proj.shared_product is None
    assert model.model.layers[1].mlp.gate_proj.shared_product is None
    assert model.model.layers[1].self_attn.q_proj.shared_product is None
    monkeypatch.setattr(nvfp4_matmul, "available", lambda device: False)  # no kernel on the device
    assert sibling_fusion.fuse_siblings(_model()) == 0


def test_nothing_is_fused_where_the_kernel_does_not_run() -> None:
    """A plain CPU: the packed model keeps transformers' three calls (and its CPU numerics)."""
    assert sibling_fusion.fuse_siblings(_model()) == 0


def test_a_w4a4_model_is_fused_while_its_rounding_is_off_and_exact_once_switched_on(kernel_on_cpu) -> None:
    """Stage 2 loads W4A4 checkpoints with input rounding off: fused. Switched on later
    (``set_activation_simulation``), each member rounds its own input, the group dissolves at the first mismatch,
    and the logits are the unfused model's with rounding."""
    models = [_model(), _model()]
    ids = torch.randint(0, models[0].config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    for model in models:
        for module in model.modules():
            if isinstance(module, NVFP4Linear):
                module.activation_mode, module.input_scale = "nvfp4", torch.tensor(0.05)
    assert sibling_fusion.fuse_siblings(models[1]) == 2 * len(models[1].model.layers)
    with torch.no_grad():
        unrounded = models[0](ids).logits
        torch.testing.assert_close(models[1](ids).logits, unrounded, rtol=1e-5, atol=1e-5)
        for model in models:
            assert set_activation_simulation(model, True) > 0
        rounded = models[0](ids).logits
        assert (rounded - unrounded).abs().max() > 1e-3  # the rounding is switched on and shows
        torch.testing.assert_close(models[1](ids).logits, rounded, rtol=1e-5, atol=1e-5)
        assert all(m.shared_product is None for m in models[1].modules() if isinstance(m, NVFP4Linear))
