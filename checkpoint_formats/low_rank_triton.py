"""The first factor of a low-rank side path, ``scaling * x @ A^T`` in fp32, as one small Triton kernel.

Why: a LoRA edit on a packed NVFP4 Linear adds ``B (A x)`` to the packed matmul. At a decode step the rank is
1-8 and the batch ~100, so cuBLAS runs ``x @ A^T`` as a split-K GEMM plus its reduction (two launches, ~9 us on an
H200) for a product of a few hundred kilobytes. Here K is cut into slices of ``BLOCK_K`` and every program reads
``BLOCK_M`` rows of one slice once, against the slice of all ``rank`` rows of A, and writes its fp32 partial sums;
the decode tile's epilogue adds the slices' partials up and multiplies by B (``nvfp4_gluon_decode``), so no
reduction kernel runs. (A first version walked all of K in each program: 16.4 us a call at M = 100, bound by
the latency of its sequential loads, bench/stage2_trial_profile.py on an H200, 2026-12-04 13:20 UTC.)
Imported only where Triton is installed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_M = 2  # rows of x per program
BLOCK_K = 1024  # k per slice: one load of x and A per program
MAX_SLICES = 32  # the partials the epilogue adds per output at most; longer K walks several tiles per slice


@triton.jit
def _down_kernel(x_ptr, a_ptr, out_ptr, M, K, stride_xm, stride_ar, k_per_slice, scaling, RANK: tl.constexpr,
                 RANK_P2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """out[s, m, r] = scaling * sum over slice s of k of x[m, k] A[r, k], for BLOCK_M rows; fp32 products and sums."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, RANK_P2)
    k_start = tl.program_id(1) * k_per_slice
    k_end = tl.minimum(k_start + k_per_slice, K)
    acc = tl.zeros((BLOCK_M, RANK_P2), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        in_k = offs_k[None, :] < k_end
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=(offs_m[:, None] < M) & in_k, other=0.0)
        a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :], mask=(offs_r[:, None] < RANK) & in_k, other=0.0)
        acc += tl.sum(x.to(tl.float32)[:, None, :] * a.to(tl.float32)[None, :, :], axis=2)
    mask = (offs_m[:, None] < M) & (offs_r[None, :] < RANK)
    out_ptrs = out_ptr + tl.program_id(1) * M * RANK + offs_m[:, None] * RANK + offs_r[None, :]
    tl.store(out_ptrs, acc * scaling, mask=mask)


def slices_of(k: int) -> tuple[int, int]:
    """(slices, k per slice) for a K: slices of BLOCK_K, at most MAX_SLICES of them (pure)."""
    slices = min(triton.cdiv(k, BLOCK_K), MAX_SLICES)
    k_per_slice = triton.cdiv(triton.cdiv(k, slices), BLOCK_K) * BLOCK_K
    return triton.cdiv(k, k_per_slice), k_per_slice


def down_projection(x2d: torch.Tensor, lora_a: torch.Tensor, scaling: float) -> torch.Tensor:
    """``scaling * x2d @ lora_a^T`` as fp32 partial sums [slices, M, rank] (contiguous; their sum over dim 0 is the
    product) for x2d [M, K] with unit column stride and lora_a [rank, K] in any float dtype, on the current GPU."""
    m, k = x2d.shape
    rank = lora_a.shape[0]
    if lora_a.stride(-1) != 1:
        lora_a = lora_a.contiguous()
    slices, k_per_slice = slices_of(k)
    out = torch.empty(slices, m, rank, device=x2d.device, dtype=torch.float32)
    rank_p2 = max(2, triton.next_power_of_2(rank))
    grid = (triton.cdiv(m, BLOCK_M), slices)
    _down_kernel[grid](x2d, lora_a, out, m, k, x2d.stride(0), lora_a.stride(0), k_per_slice, float(scaling),
                       RANK=rank, RANK_P2=rank_p2, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, num_warps=4)  # fmt: skip
    return out
