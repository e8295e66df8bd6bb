"""The Triton decode-attention kernel gives SDPA's output, under Triton's interpreter (CPU tensors).

Skipped where Triton is not installed (CI's CPU machine): there ``grouped_decode_attention`` takes SDPA.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from abliterate.evaluation import decode_attention

pytest.importorskip("triton")


def _case(dtype, batch=3, kv_heads=2, groups=4, dim=32, positions=150, seed=0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, kv_heads, groups, dim, generator=generator).to(dtype)
    key, value = (torch.randn(batch, kv_heads, positions, dim, generator=generator).to(dtype) for _ in range(2))
    mask = torch.zeros(batch, 1, 1, positions, dtype=dtype)
    closed = torch.finfo(dtype).min
    mask[0, ..., :5] = closed  # left padding
    mask[1, ..., :70] = closed  # the whole first block closed, and part of the second
    mask[..., 100:] = closed  # positions the cache has not reached: the third block is skipped
    return query, key, value, mask


def _reference(query, key, value, mask, scale):
    out = F.scaled_dot_product_attention(query.float(), key.float(), value.float(), attn_mask=mask.float(), scale=scale)
    return out.reshape(query.shape[0], 1, -1, query.shape[-1])  # [B, Hkv, G, D] -> [B, 1, H, D]: head = h * G + g


# fp16 stands for the 16-bit case: the interpreter's tl.dot on bf16 operands is wrong (Triton 3.9, numpy 2.x:
# a 16 x 16 bf16 product came back 1e10 off); bf16 is checked on the GPU (bench/decode_kernels_bench.py).
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_kernel_equals_sdpa_with_padding_and_closed_blocks(dtype, tolerance):
    query, key, value, mask = _case(dtype)
    assert decode_attention.supports(query, key, value, mask) and not decode_attention.available(query.device)
    ours = decode_attention.decode_attention(query, key, value, mask, scale=0.2)
    assert ours.shape == (3, 1, 8, 32) and ours.dtype == dtype
    torch.testing.assert_close(ours.float(), _reference(query, key, value, mask, 0.2), rtol=tolerance, atol=tolerance)


def test_kernel_without_mask_and_with_one_mask_row_for_the_batch():
    query, key, value, mask = _case(torch.float32, positions=40)
    reference = F.scaled_dot_product_attention(query, key, value, scale=0.3).reshape(3, 1, 8, 32)
    torch.testing.assert_close(decode_attention.decode_attention(query, key, value, None, scale=0.3), reference,
                               rtol=1e-5, atol=1e-5)
    shared = mask[0:1].clone()  # one mask (left padding) broadcast over every row
    torch.testing.assert_close(decode_attention.decode_attention(query, key, value, shared, scale=0.3),
                               _reference(query, key, value, shared.expand(3, -1, -1, -1), 0.3), rtol=1e-5, atol=1e-5)


def test_shapes_the_kernel_does_not_take_go_to_sdpa():
    query, key, value, mask = _case(torch.float32, dim=24)  # not a power of two
    assert not decode_attention.supports(query, key, value, mask)
    query, key, value, mask = _case(torch.float32)
    assert not decode_attention.supports(query, key, value, mask[..., :10])  # mask shorter than the cache
    assert not decode_attention.supports(query, key, value, mask.bool())  # boolean masks: SDPA
