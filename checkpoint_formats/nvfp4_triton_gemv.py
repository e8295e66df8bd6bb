"""The CUDA-core decode kernel for tiny batches (M = 1-4): fp32 FMA of each code with its x column.

Why apart: at M <= 4 a tensor-core tile wastes its width, and the GEMV's loop (wide K tiles, x split by code
position, the scale applied once per word) is its own kernel; it shares the tile pointers, loads and split-K
epilogue of ``nvfp4_triton_kernels``.
"""

import triton
import triton.language as tl

from checkpoint_formats.nvfp4_triton_kernels import (
    _codes_f32,
    _epilogue,
    _load_tile,
    _prefetch,
    _split8,
    _tile_pointers,
    _word_scale,
)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, s_ptr, gs_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_om, k_per_split,
    ws_ptr, count_ptr, splits,
    HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, SELF_CLEAN: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ASM: tl.constexpr,
):  # fmt: skip
    """CUDA-core decode for tiny M: fp32 FMA of each code with its x column, the scale once per word."""
    k_start = tl.program_id(2) * k_per_split
    offs_m, offs_n, w_ptrs, s_ptrs, x_ptrs = _tile_pointers(
        x_ptr, w_ptr, s_ptr, M, N, K, stride_xm, k_start, BLOCK_M, BLOCK_N, BLOCK_K
    )
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K // 8), dtype=tl.float32)
    k_end = tl.minimum(k_start + k_per_split, K)
    words_next, scale_next, x_next = _load_tile(w_ptrs, s_ptrs, x_ptrs, k_start, K, EVEN_K, BLOCK_K)
    for k0 in range(k_start, k_end, BLOCK_K):
        words, scale, x = words_next, scale_next, x_next
        w_ptrs, s_ptrs, x_ptrs, words_next, scale_next, x_next = _prefetch(w_ptrs, s_ptrs, x_ptrs, k0, k_end, K,
                                                                           EVEN_K, BLOCK_K)  # fmt: skip
        scale = _word_scale(scale)
        x0, x1, x2, x3, x4, x5, x6, x7 = _split8(x.to(tl.float32), BLOCK_M, BLOCK_K)
        c0, c1, c2, c3, c4, c5, c6, c7 = _codes_f32(words.to(tl.uint32, bitcast=True), ASM)
        part = c0[None, :, :] * x0[:, None, :]
        part += c1[None, :, :] * x1[:, None, :]
        part += c2[None, :, :] * x2[:, None, :]
        part += c3[None, :, :] * x3[:, None, :]
        part += c4[None, :, :] * x4[:, None, :]
        part += c5[None, :, :] * x5[:, None, :]
        part += c6[None, :, :] * x6[:, None, :]
        part += c7[None, :, :] * x7[:, None, :]
        acc += part * scale.to(tl.float32)[None, :, :]
    acc = tl.sum(acc, axis=2) * 4194304.0  # 2^14 (codes) * 2^8 (scales)
    first = (tl.program_id(2) == 0).to(tl.float32)
    _epilogue(out_ptr, acc, gs_ptr, bias_ptr, offs_m, offs_n, M, N, stride_om, first, ws_ptr, count_ptr, splits,
              HAS_BIAS, ATOMIC, SELF_CLEAN)
