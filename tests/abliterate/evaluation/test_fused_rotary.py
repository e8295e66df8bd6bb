"""The fused rotary kernel gives transformers' Llama rotary embedding, and is patched in only where it applies."""

from __future__ import annotations

import pytest
import torch
from transformers.models.cohere import modeling_cohere
from transformers.models.llama import modeling_llama
from transformers.models.phi3 import modeling_phi3
from transformers.models.qwen3 import modeling_qwen3

from abliterate.evaluation import fused_rotary
from tests.tiny_models import dense_llama


def test_only_modules_running_llamas_rotary_code_qualify():
    assert fused_rotary.runs_llama_rotary(vars(modeling_llama)) and fused_rotary.runs_llama_rotary(vars(modeling_qwen3))
    assert not fused_rotary.runs_llama_rotary(vars(modeling_cohere))  # interleaved halves
    assert not fused_rotary.runs_llama_rotary(vars(modeling_phi3))  # partial rotary
    assert not fused_rotary.runs_llama_rotary({})


def _inputs(dtype, batch=3, heads=4, kv_heads=2, tokens=2, dim=16, seed=0):
    """q and k as the attention lays them out: [B, T, H*D] projections viewed [B, H, T, D] (not contiguous)."""
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(batch, tokens, heads * dim, generator=gen) * 4).to(dtype).view(batch, tokens, heads, dim).transpose(1, 2)
    k = (torch.randn(batch, tokens, kv_heads * dim, generator=gen) * 4).to(dtype).view(batch, tokens, kv_heads, dim).transpose(1, 2)
    angles = torch.rand(batch, tokens, dim // 2, generator=gen) * 50
    angles = torch.cat((angles, angles), dim=-1)
    return q, k, angles.cos().to(dtype), angles.sin().to(dtype)


# No bf16: Triton 3.9's interpreter truncates fp32 -> bf16 instead of rounding (bf16 is checked on the GPU bench).
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_equals_transformers_bit_for_bit(dtype):
    pytest.importorskip("triton")
    q, k, cos, sin = _inputs(dtype)
    assert fused_rotary.kernel_takes(q, k, cos, sin)
    q_ref, k_ref = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    q_out, k_out = fused_rotary.rotary(q, k, cos, sin)
    assert torch.equal(q_out, q_ref) and torch.equal(k_out, k_ref)
    assert q_out.stride() == q_ref.stride() and k_out.stride() == k_ref.stride()
    q_ref, k_ref = modeling_llama.apply_rotary_pos_emb(q, k, cos[:1], sin[:1])  # one row's table for every row
    q_out, k_out = fused_rotary.rotary(q, k, cos[:1], sin[:1])
    assert torch.equal(q_out, q_ref) and torch.equal(k_out, k_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_q_and_k_as_columns_of_one_fused_projection(dtype):
    """sibling_fusion hands the attention q and k as column slices of one q/k/v product (rows 3x wider than q):
    the kernel reads them through their strides and writes the dense outputs eager would, bit for bit."""
    pytest.importorskip("triton")
    batch, heads, kv_heads, tokens, dim = 3, 4, 2, 2, 16
    gen = torch.Generator().manual_seed(3)
    qkv = (torch.randn(batch, tokens, (heads + 2 * kv_heads) * dim, generator=gen) * 4).to(dtype)
    q = qkv[..., : heads * dim].view(batch, tokens, heads, dim).transpose(1, 2)
    k = qkv[..., heads * dim : (heads + kv_heads) * dim].view(batch, tokens, kv_heads, dim).transpose(1, 2)
    _, _, cos, sin = _inputs(dtype, batch, heads, kv_heads, tokens, dim)
    assert fused_rotary.kernel_takes(q, k, cos, sin)
    q_ref, k_ref = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    q_out, k_out = fused_rotary.rotary(q, k, cos, sin)
    assert torch.equal(q_out, q_ref) and torch.equal(k_out, k_ref)
    assert q_out.stride() == q_ref.stride() and k_out.stride() == k_ref.stride()


def test_kernel_refuses_what_it_does_not_compute():
    q, k, cos, sin = _inputs(torch.float16)
    assert not fused_rotary.kernel_takes(q, k, cos.float(), sin.float())  # mixed dtypes
    assert not fused_rotary.kernel_takes(q[..., :12], k[..., :12], cos[..., :12], sin[..., :12])  # not a power of 2
    assert not fused_rotary.kernel_takes(q, k, cos[:, :1], sin[:, :1])  # cos for other tokens
    assert not fused_rotary.kernel_takes(q, k, cos[:2], sin[:2])  # for other rows
    assert not fused_rotary.kernel_takes(q, k, cos.unsqueeze(1), sin.unsqueeze(1))  # already unsqueezed
    assert not fused_rotary.kernel_takes(q[..., ::2], k[..., ::2], cos[..., ::2], sin[..., ::2])  # strided dim


def test_nothing_is_patched_on_the_cpu():
    before = modeling_llama.apply_rotary_pos_emb
    with fused_rotary.fused_rotary(dense_llama(layers=1)) as patched:
        assert patched == 0 and modeling_llama.apply_rotary_pos_emb is before


def test_a_patched_model_gives_the_same_logits_and_is_restored(monkeypatch):
    """Where the kernel runs (here: the interpreter, made to count as a GPU), the model's forward calls it."""
    pytest.importorskip("triton")
    model = dense_llama(layers=2).float().eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1))
    before = modeling_llama.apply_rotary_pos_emb
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        monkeypatch.setattr(fused_rotary.decode_attention, "available", lambda device: True)
        calls = []
        kernel = fused_rotary.rotary
        monkeypatch.setattr(fused_rotary, "rotary", lambda *args: calls.append(1) or kernel(*args))
        with fused_rotary.fused_rotary(model) as patched:
            assert patched == 1 and modeling_llama.apply_rotary_pos_emb is not before
            fused = model(input_ids=ids).logits
    assert modeling_llama.apply_rotary_pos_emb is before
    assert len(calls) == 2 and torch.equal(fused, reference)
