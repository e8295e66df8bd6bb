"""Launch shapes of the NVFP4 decode kernels: which kernel and tile a matmul of a given size gets (pure).

Why apart from ``nvfp4_matmul``: these are the measured policy (the winners of bench/nvfp4_matmul_bench.py's
sweeps on an H200, their provenance in each docstring), plain functions of (M, N, K, SM count) that a CPU test
can check without Triton or a GPU; ``nvfp4_matmul`` launches what they choose.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class KernelConfig:
    """One launch shape of the decode kernel."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    kernel: str = "dot"  # "gemv" (CUDA-core FMA), "dot" (tensor cores), "pipelined" (dot, compiler-pipelined),
    # or "wgmma" (Gluon, Hopper, bf16 x: always swapped, num_warps = block_n / 16, num_stages = its ring's depth)
    join: bool = False  # dot: rebuild K order in registers (one dot) instead of eight dots on strided x
    mul16: bool = True  # dot: code * scale in fp16 (exact) instead of fp32
    asm: bool = True  # decode 8 codes of a word with inline PTX (GPU only; the interpreter takes the portable path)
    swap: bool = False  # dot (joined) / pipelined: out^T = W x^T, the decoded weight as the MMA's first operand
    bf16_pairs: bool = True  # dot / pipelined, bf16 x with asm: codes straight to scaled bf16 pairs (no fp32 trip)


def next_pow2(value: int) -> int:
    return 1 << max(value - 1, 0).bit_length()


@functools.lru_cache(maxsize=4096)
def decode_config(m: int, n: int, k: int, sm_count: int, x_bytes: int = 2) -> KernelConfig:
    """Launch shape for M <= nvfp4_matmul.DECODE_MAX_M, cached by (M, N, K): the winners of the bench's sweep on an H200.

    Decode is latency bound unless enough weight bytes are in flight, so K tiles are wide (GEMV) and K is
    split (fp32 atomics into a self-cleaning workspace) until the grid has about three programs per SM.
    """
    small = n * k <= 4096 * 4096
    if m == 1 or (m <= 4 and small):
        config = KernelConfig(block_m=next_pow2(m), block_n=16 if m == 1 and n == 4096 else 8, block_k=1024, kernel="gemv")
    elif n * k >= 4096 * 4096 and x_bytes == 2:
        return wgmma_config(m, n, k, sm_count)  # fused_matmul runs swap_config's Triton tile where this cannot run
    elif m <= 16:
        if n * k < 4096 * 4096:
            config = KernelConfig(block_m=16, block_n=16, block_k=512, kernel="dot", join=True)
        else:
            config = KernelConfig(block_m=16, block_n=32, block_k=128, kernel="dot", join=True)
    elif m <= 64:
        config = KernelConfig(block_m=64, block_n=32, block_k=128, kernel="dot", join=True)
    elif n <= 4096 and n * k >= 4096 * 4096:  # measured: wider N tiles and a 2-way split win here (H200 sweep)
        config = KernelConfig(block_m=128, block_n=64, block_k=128, split_k=2, num_warps=8, kernel="dot", join=True)
        return dataclasses.replace(config, block_k=64, num_stages=2) if x_bytes > 2 else config
    else:
        config = KernelConfig(block_m=128, block_n=32, block_k=128, num_warps=8, kernel="dot", join=True)
    if x_bytes > 2 and config.kernel == "dot":  # fp32 x: half the K tile keeps the staged tiles in shared memory
        config = dataclasses.replace(config, block_k=config.block_k // 2, num_stages=2)
    if config.kernel == "gemv":
        return config  # measured: split K never paid for the GEMV at BLOCK_K 1024
    tiles = _cdiv(n, config.block_n) * _cdiv(m, config.block_m)
    k_tiles = _cdiv(k, config.block_k)
    split = 1
    while tiles * split < 3 * sm_count and k_tiles // (split * 2) >= 4:
        split *= 2
    return dataclasses.replace(config, split_k=split)


def wgmma_config(m: int, n: int, k: int, sm_count: int) -> KernelConfig:
    """Large weights, bf16 x, M = 2-128 on Hopper: the Gluon tile with its copy ring (``nvfp4_gluon_decode``).

    Measured on an H200 (bench/nvfp4_matmul_ring_sweep_gpu.json, ..._ring_sweep2_gpu.json, 19 cells, 34-37
    launch shapes each): 1.05-1.45x faster than the Triton tiles on 4096 x 4096, 14336 x 4096 and 4096 x 14336
    at every M swept (4-128). K tiles of 128 won in all 19 cells; a 4-stage ring was best or within 3% of the
    best in 18 (4096 x 4096 at M = 100: 6 stages, 9% faster); 128-row W tiles won at M = 100 on the non-square
    weights and 64-row ones everywhere else, M = 128 included (by 3% and 9%: not yet followed here, pending a
    whole-trial A/B). K is split until the grid has about 1.5 programs per SM up to M = 64 (more bytes in flight)
    and 0.75 above (the MMA is the larger share): on the three shapes that rule picks the winner's split or one
    timed within 2% of it at every M swept, and it gives widths not swept (fused q/k/v, gate/up:
    bench/sibling_fusion_gpu.json) the same treatment. (The stage-2 run of 14:44 UTC used the rule before it,
    commit 912a63f, which differs in two cells, both within 2%.)
    Smaller weights (K/V projections, MoE experts) stay with the x-first Triton tile, which won on two of three.
    """
    block_n = 128 if m > 64 and n != k else 64
    wanted = sm_count * (3 / 2 if m <= 64 else 3 / 4)
    split = 1
    while _cdiv(n, block_n) * split < wanted and split < 4 and k // (split * 2) >= 256:
        split *= 2
    return KernelConfig(max(16, next_pow2(m)), block_n, 128, split, block_n // 16, 4, kernel="wgmma")


def swap_config(m: int, n: int, k: int) -> KernelConfig:
    """The Triton tile for ``wgmma_config``'s weights where the Gluon tile cannot run (no Hopper or Gluon, x
    misaligned, K off 256): the decoded tile as the MMA's first operand (``swap``).

    Measured on an H200 (bench/nvfp4_matmul_swap_sweep_gpu.json, ..._wide_swap_sweep_gpu.json): 0.98-1.4x the
    x-first tile's speed on 4096 x 4096, 14336 x 4096 and 4096 x 14336 at every M swept; smaller
    weights (K/V projections, MoE experts) stay with the x-first tile, which won there. Tall weights (N > K)
    fill the GPU unsplit from M = 17; square and wide ones split K 4 ways.
    """
    split = 1 if m > 16 and n > k else 4
    if m <= 16:
        return KernelConfig(16, 64, 64 if n > k else 128, split, 4, 3, kernel="dot", join=True, swap=True)
    if m <= 64:
        return KernelConfig(next_pow2(m), 64, 128, split, 4, 3, kernel="dot", join=True, swap=True)
    return KernelConfig(128, 128, 64, split, 8, 3, kernel="dot", join=True, swap=True)


def pipelined_config(m: int, n: int, k: int) -> KernelConfig:
    """The pipelined tile's best launch shape for M = 17-128 (bench/nvfp4_matmul_sweep2_gpu.json); not the default.

    In isolation it beat the hand-prefetched kernel by up to 28% at M = 128, but a whole trial on the 8B-shaped
    model is 3% slower with it (bench/stage2_trial_profile.py --kernel pipelined, an A/B on one H200,
    2026-12-02: harmful + false-refusal decoding 2.26 s against 2.19 s), so ``decode_config`` keeps the
    hand-prefetched tile; this stays selectable for the next kernel round.

    A 4096-wide output leaves SMs idle, so K is split 4 ways there; 14336-wide outputs fill the GPU unsplit.
    Small (MoE expert, K/V) weights want narrow N tiles; a 128-row tile on a weight wider in K than in N
    ran best as the hand-prefetched kernel with a 4-way split.
    """
    big = n * k >= 4096 * 4096
    split = 4 if n <= 4096 else 1
    if m <= 64:
        if big:
            return KernelConfig(64, 64, 128, split_k=split, num_warps=4, num_stages=3, kernel="pipelined")
        return KernelConfig(64, 32, 128, split_k=4 if n < k else 1, num_warps=4, num_stages=4, kernel="pipelined")
    if big:
        return KernelConfig(128, 64, 64, split_k=split, num_warps=8, num_stages=4, kernel="pipelined")
    if n < k:
        return KernelConfig(128, 32, 128, split_k=4, num_warps=8, kernel="dot", join=True)
    return KernelConfig(128, 32, 128, split_k=1, num_warps=4, num_stages=4, kernel="pipelined")


WGMMA_SHARED_BYTES = 227 << 10  # an H100/H200 block's shared memory


def wgmma_stage_bytes(block_m: int, block_n: int, block_k: int) -> int:
    """Shared memory of one stage of the Gluon tile's copy ring: codes (1/2 byte each), E4M3 scales (1/16) and
    bf16 x (2 bytes each)."""
    return block_n * block_k * 9 // 16 + block_m * block_k * 2


def check_wgmma_config(config: KernelConfig) -> None:
    """Refuse a wgmma launch shape the Gluon tile cannot take (a ValueError naming the field)."""
    if not (config.block_k in (64, 128) and config.block_n in (64, 128) and config.block_m in (16, 32, 64, 128)):
        raise ValueError(f"kernel='wgmma' needs block_k 64 or 128, block_n 64 or 128 and block_m 16, 32, 64 or 128, "
                         f"got {config}")  # fmt: skip
    if config.num_stages < 3:
        raise ValueError(f"kernel='wgmma' needs num_stages (its copy ring's depth) >= 3, got {config}")
    stage_bytes = wgmma_stage_bytes(config.block_m, config.block_n, config.block_k)
    if config.num_stages * stage_bytes > WGMMA_SHARED_BYTES:
        raise ValueError(f"kernel='wgmma': {config.num_stages} stages of {stage_bytes} bytes exceed the "
                         f"{WGMMA_SHARED_BYTES} bytes of shared memory a block has; lower num_stages, block_m, block_n or block_k")  # fmt: skip
