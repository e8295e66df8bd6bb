"""transformers' Llama rotary embedding, q and k in one Triton kernel, for the captured decode step.

Why: eagerly, ``apply_rotary_pos_emb`` is ten kernels per layer (for each of q and k: two multiplies, a negation,
a concatenation, an add); an 8B-shaped decode step has 32 of them, about 320 of its ~1,100 kernels
(bench/stage2_trial_profile_kernels_step_kernels.txt), each on a few hundred KB. Only where the attention's
module runs Llama's own ``apply_rotary_pos_emb`` and ``rotate_half`` (Mistral, Qwen2/3, Mixtral and others copy
them; compared by bytecode, not by name), only inside the decode step on a CUDA device with Triton, and only for
what the kernel takes (4-D q/k laid out [batch, heads, tokens, dim] with unit stride in dim, cos/sin
[batch or 1, tokens, dim], one 16-bit dtype or fp32, ``unsqueeze_dim=1``); anything else calls transformers' code.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers.models.llama import modeling_llama

from abliterate.evaluation import decode_attention
from abliterate.evaluation.forward_swaps import same_code

try:
    from abliterate.evaluation import decode_kernels as kernel
except ImportError:
    kernel = None

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def runs_llama_rotary(module_globals: dict) -> bool:
    """True when a modeling module's ``apply_rotary_pos_emb`` and ``rotate_half`` are Llama's code."""
    return same_code(module_globals.get("apply_rotary_pos_emb"), modeling_llama.apply_rotary_pos_emb) and same_code(
        module_globals.get("rotate_half"), modeling_llama.rotate_half)


def kernel_takes(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """The shapes, layouts and dtypes ``rotary`` computes (CPU tensors only under TRITON_INTERPRET, the tests)."""
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or cos.shape != sin.shape:
        return False
    dim = q.shape[-1]
    if dim % 2 or dim & (dim - 1) or k.shape[-1] != dim or cos.shape[-1] != dim:
        return False  # a power-of-two head dim: one tile per half
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or cos.shape[0] not in (1, q.shape[0]):
        return False  # cos/sin of one row of positions serve every row (the default position_ids)
    if cos.shape[1] != q.shape[2]:
        return False
    tensors = (q, k, cos, sin)
    return (len({t.dtype for t in tensors}) == 1 and q.dtype in _DTYPES and all(t.stride(-1) == 1 for t in tensors)
            and len({t.device for t in tensors}) == 1)  # fmt: skip


def _row_stride(table: torch.Tensor) -> int:
    return table.stride(0) if table.shape[0] > 1 else 0


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``apply_rotary_pos_emb(q, k, cos, sin)`` for q/k [B, H, T, D] and cos/sin [B or 1, T, D], bit for bit."""
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)  # dense, in the inputs' dimension order, as eager's
    batch, q_heads, tokens, dim = q.shape
    grid = (batch * tokens, q_heads + k.shape[1])
    kernel._rotary_kernel[grid](
        q, k, q_out, k_out, cos, sin, tokens, q_heads,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2), k_out.stride(0), k_out.stride(1), k_out.stride(2),
        _row_stride(cos), cos.stride(1), _row_stride(sin), sin.stride(1), HALF=dim // 2, num_warps=1,
        enable_fp_fusion=False,  # fp32: q * cos + rot * sin rounded twice, as eager computes it
    )  # fmt: skip
    return q_out, k_out


def _fused(original):
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if unsqueeze_dim == 1 and decode_attention.available(q.device) and kernel_takes(q, k, cos, sin):
            return rotary(q, k, cos, sin)
        return original(q, k, cos, sin, unsqueeze_dim)

    return apply_rotary_pos_emb


@contextmanager
def fused_rotary(model: torch.nn.Module) -> Iterator[int]:
    """Within the block, the modeling modules of the model's layers that run Llama's rotary code call ``rotary``
    on a Triton-capable CUDA device. Yields how many modules were patched (0 on a CPU: nothing is walked)."""
    first = next(model.parameters(), None)
    if kernel is None or first is None or not decode_attention.available(first.device):
        yield 0
        return
    patched = []
    for name in sorted({type(module).__module__ for module in model.modules()}):
        namespace = vars(sys.modules[name]) if name in sys.modules else {}
        if runs_llama_rotary(namespace):
            original = namespace["apply_rotary_pos_emb"]
            namespace["apply_rotary_pos_emb"] = _fused(original)
            patched.append((namespace, original))
    try:
        yield len(patched)
    finally:
        for namespace, original in patched:
            namespace["apply_rotary_pos_emb"] = original
