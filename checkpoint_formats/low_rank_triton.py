"""The first factor of a low-rank side path, ``scaling * x @ A^T`` in fp32, as one small Triton kernel.

Why: a LoRA edit on a packed NVFP4 Linear adds ``B (A x)`` to the packed matmul. At a decode step the rank is
1-8 and the batch ~100, so cuBLAS runs ``x @ A^T`` as a split-K GEMM plus its reduction (two launches, ~9 us on an
H200) for a product of a few hundred kilobytes. Here each program reads ``BLOCK_M`` rows of x once, against all
``rank`` rows of A (which stay in L2), and writes fp32, which the decode tile's epilogue multiplies by B
(``nvfp4_gluon_decode``). Imported only where Triton is installed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_M = 2  # rows of x per program: 50 programs at a batch of 100, each reading 2 rows once
PRODUCT_ELEMENTS = 4096  # the fp32 [BLOCK_M, rank, BLOCK_K] product one step holds (32 registers a thread)


@triton.jit
def _down_kernel(x_ptr, a_ptr, out_ptr, M, K, stride_xm, stride_ar, scaling, RANK: tl.constexpr,
                 RANK_P2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """out[m, r] = scaling * sum_k x[m, k] A[r, k] for BLOCK_M rows of x, fp32 products and sums."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, RANK_P2)
    acc = tl.zeros((BLOCK_M, RANK_P2), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        in_k = offs_k[None, :] < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=(offs_m[:, None] < M) & in_k, other=0.0)
        a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :], mask=(offs_r[:, None] < RANK) & in_k, other=0.0)
        acc += tl.sum(x.to(tl.float32)[:, None, :] * a.to(tl.float32)[None, :, :], axis=2)
    mask = (offs_m[:, None] < M) & (offs_r[None, :] < RANK)
    tl.store(out_ptr + offs_m[:, None] * RANK + offs_r[None, :], acc * scaling, mask=mask)


def down_projection(x2d: torch.Tensor, lora_a: torch.Tensor, scaling: float) -> torch.Tensor:
    """``scaling * x2d @ lora_a^T`` as a contiguous fp32 [M, rank] tensor (x2d [M, K] with unit column stride,
    lora_a [rank, K] in any float dtype, both on the current CUDA device)."""
    m, k = x2d.shape
    rank = lora_a.shape[0]
    if lora_a.stride(-1) != 1:
        lora_a = lora_a.contiguous()
    out = torch.empty(m, rank, device=x2d.device, dtype=torch.float32)
    rank_p2 = max(2, triton.next_power_of_2(rank))
    block_k = min(1024, max(64, PRODUCT_ELEMENTS // (BLOCK_M * rank_p2)))
    _down_kernel[(triton.cdiv(m, BLOCK_M),)](x2d, lora_a, out, m, k, x2d.stride(0), lora_a.stride(0), float(scaling),
                                            RANK=rank, RANK_P2=rank_p2, BLOCK_M=BLOCK_M, BLOCK_K=block_k,
                                            num_warps=4)  # fmt: skip
    return out
