"""Attention with grouped K/V heads that reads K and V as cached instead of copying them once per query head.

Why apart from ``static_decode``: the static decoder's step and prefill use it, and so does every long forward of
a trial on a GPU (the KL pass, the residual capture); it is an attention implementation registered with
transformers (``AttentionInterface``), not part of the decoding loop.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from abliterate.evaluation import decode_attention

GROUPED_DECODE_ATTENTION = "quant_abliterate_grouped_decode"


def grouped_decode_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs):
    """SDPA for one new token per row with grouped KV heads, K and V read as cached instead of copied.

    Why: given a mask, transformers' ``sdpa`` repeats K and V to one copy per query head (SDPA's GQA kernels
    take no mask); for a decode step at batch 100 with a 140-position cache that copy is 2 x 115 MB per
    layer and measured 2/3 of the step's attention time on an H200. A decode query has length 1, so the
    query heads sharing a KV head (head h uses KV head h // groups, as ``repeat_kv`` lays them out) can
    stand on SDPA's query-length axis instead: the same scores and softmax, one query row per head.
    Where Triton runs, ``decode_attention``'s kernel computes it and skips the cache positions the mask closes.
    A prefill on a GPU stacks the heads the same way (``_grouped_prefill_attention``); anything else (a CPU
    prefill, dropout, position bias, sinks) goes to transformers' own ``sdpa``.
    """
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    unusual = dropout or any(kwargs.get(name) is not None for name in ("position_bias", "s_aux", "softcap"))
    if heads == kv_heads or unusual or value.shape[-1] != dim:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if length != 1:
        return _grouped_prefill_attention(module, query, key, value, attention_mask, scaling, **kwargs)
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    mask = attention_mask[..., :1, : key.shape[2]] if attention_mask is not None else None  # [batch, 1, 1, keys]
    if decode_attention.available(query.device) and decode_attention.supports(grouped, key, value, mask):
        scale = scaling if scaling is not None else dim**-0.5
        return decode_attention.decode_attention(grouped, key, value, mask, scale), None
    out = F.scaled_dot_product_attention(grouped, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


def _grouped_prefill_attention(module, query, key, value, attention_mask, scaling, **kwargs):
    """A prefill on a GPU: each KV head's query heads stacked on SDPA's query axis (their mask rows repeated).

    Why: with a mask, transformers' sdpa copies K and V once per query head; over the static cache of a batch of
    100 that is 2 x 115 MB per layer, the largest transient of the harmful answers' prefill on an H200. The
    scores, softmax and output are the same. CPUs (and no mask, or one that is not a plain 4-D one) keep transformers'.
    """
    mask = attention_mask[..., : key.shape[2]] if attention_mask is not None else None
    if query.device.type != "cuda" or mask is None or mask.dim() != 4 or mask.shape[1] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    return stacked_heads_attention(query, key, value, mask, scaling), None


def stacked_heads_attention(query, key, value, mask, scaling):
    """SDPA of query [B, H, T, D] on K/V [B, Hkv, S, D] with mask [B|1, 1, T, S]: [B, T, H, D], no K/V copies."""
    batch, heads, length, dim = query.shape
    kv_heads, positions = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    stacked = query.reshape(batch, kv_heads, groups * length, dim)  # head h = kv * groups + g -> row g * T + t
    mask = mask.unsqueeze(2).expand(-1, -1, groups, -1, -1).reshape(mask.shape[0], 1, groups * length, positions)
    out = F.scaled_dot_product_attention(stacked, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(batch, heads, length, dim).transpose(1, 2).contiguous()


AttentionInterface.register(GROUPED_DECODE_ATTENTION, grouped_decode_attention)
AttentionMaskInterface.register(GROUPED_DECODE_ATTENTION, sdpa_mask)  # the step's 4-D mask is used as given


@contextmanager
def grouped_attention(model, *, gpu_only: bool = False) -> Iterator[None]:
    """Within the block, a model that uses sdpa runs ``grouped_decode_attention``: the static decoder's prefill
    and captured step, and every long forward of a trial on a GPU (the KL pass, the residual capture), whose
    masked sdpa would otherwise copy K and V once per query head (at a 5,500-token forward of the 8B-shaped
    model, 90 MB standing at the process peak: bench/stage2_trial_profile.py --memory_history, 2026-12-03).
    ``gpu_only``: leave a model on the CPU as it is (those forwards keep transformers' sdpa and its results)."""
    config = model.config
    previous = config._attn_implementation
    first = next(model.parameters(), None)
    if previous != "sdpa" or (gpu_only and (first is None or first.device.type != "cuda")):
        yield
        return
    config._attn_implementation = GROUPED_DECODE_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = previous
