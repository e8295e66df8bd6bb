"""Attention for one new token per row over a static KV cache, as a Triton kernel on the GPU.

Why: a captured decode step attends over the whole preallocated cache, the positions not yet written and the
left padding closed by the additive mask. SDPA's kernels take such a mask as a dense per-position bias and
read every position's keys and values anyway: on an H200 at batch 100, 8 KV heads and a 141-position cache,
cuDNN's took 88 us per layer and step, 16% of a trial (bench/stage2_trial_profile_kernels_swap.txt). The kernel
reads the query heads of one KV head as one tile (no copies of K and V per query head) and skips each block of
positions the mask closes entirely. Measured there (bench/decode_kernels_gpu_2026-12-02_1550.json): 28-37 us
against SDPA's 93, the error of SDPA's own; the skipped blocks do not show in the time (three serial block loads per program bound
it, not bytes), 20.7 us per call inside a trial.

Used where Triton runs on a CUDA device of sm_80+; anything else, or a shape the kernel does not take, goes to
SDPA as before.
"""

from __future__ import annotations

import functools

import torch

try:
    import triton

    from abliterate.evaluation import decode_kernels as kernel
except ImportError:  # CPU installs: SDPA
    triton = kernel = None

BLOCK_POSITIONS = 64
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def available(device: torch.device) -> bool:
    """True where the model's decode steps take the kernel: Triton importable and a CUDA device of sm_80+.

    CPU tensors run it only when called directly under TRITON_INTERPRET (the tests); the model's own CPU
    steps keep SDPA, which is much faster than the interpreter.
    """
    return kernel is not None and device.type == "cuda" and _cuda_capable(device)


@functools.cache
def _cuda_capable(device: torch.device) -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 0)


def supports(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Shapes and dtypes the kernel takes: grouped query [B, Hkv, G, D], K/V [B, Hkv, S, D], mask [B|1, 1, 1, S]."""
    dim = query.shape[-1]
    if query.dim() != 4 or key.shape != value.shape or key.shape[:2] != query.shape[:2] or key.shape[-1] != dim:
        return False
    if dim < 16 or dim > 256 or dim & (dim - 1) or query.dtype not in _DTYPES:
        return False
    if not query.dtype == key.dtype == value.dtype:
        return False
    if any(t.stride(-1) != 1 for t in (query, key, value)):
        return False
    if mask is not None and (mask.dim() != 4 or mask.shape[1:3] != (1, 1) or mask.shape[-1] != key.shape[2]
                             or mask.shape[0] not in (1, query.shape[0]) or not mask.is_floating_point()):
        return False
    return True


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                     scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v for grouped queries [B, Hkv, G, D]; returns [B, 1, Hkv * G, D] (row-major).

    The output is laid out as transformers' attention returns it (batch, query position, heads, dim), so no
    transpose copy follows.
    """
    batch, kv_heads, groups, dim = query.shape
    positions = key.shape[2]
    out = torch.empty(batch, 1, kv_heads * groups, dim, device=query.device, dtype=query.dtype)
    mask_arg = mask if mask is not None else out
    mask_strides = (0, 0)
    if mask is not None:
        mask_strides = (mask.stride(0) if mask.shape[0] > 1 else 0, mask.stride(-1))
    kernel._decode_attention_kernel[(batch, kv_heads)](
        query, key, value, mask_arg, out, positions, float(scale),
        query.stride(0), query.stride(1), query.stride(2), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), *mask_strides,
        out.stride(0), groups * dim, dim,
        GROUPS=groups, GROUPS_PAD=max(16, triton.next_power_of_2(groups)), D=dim, BLOCK_S=BLOCK_POSITIONS,
        HAS_MASK=mask is not None, PRECISION="ieee" if query.dtype == torch.float32 else None, num_warps=4,
    )  # fmt: skip
    return out
