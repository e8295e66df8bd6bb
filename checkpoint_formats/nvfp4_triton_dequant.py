"""The prefill path's dequantize kernel: W [N, K] in the reference codec's float32 order, rounded once.

Why apart: it decodes bytes in ``nvfp4.dequantize_weight``'s order (two codes per byte, fp32 arithmetic) so that
its output equals the pure-torch codec bit for bit, where the decode tiles take faster, word-wide routes.
"""

import triton
import triton.language as tl


@triton.jit
def _e2m1_to_f32(code):
    """4-bit code -> its E2M1 value * 2^-14: the code's bits laid into an fp16 (exact)."""
    bits = code.to(tl.uint16)
    bits = ((bits & 7) << 9) | ((bits & 8) << 12)
    return bits.to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _e4m3_to_f32(byte):
    """E4M3 byte -> its value * 2^14: as an fp16 it reads value * 2^-8, normals and subnormals alike."""
    bits = byte.to(tl.uint16)
    bits = ((bits & 0x80) << 8) | ((bits & 0x7F) << 7)
    return bits.to(tl.float16, bitcast=True).to(tl.float32) * 4194304.0  # 2^22


@triton.jit
def _dequant_tile(w_ptr, s_ptr, offs_n, k0, N, K, global_scale, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """W[offs_n, k0:k0+BLOCK_K] in fp32 as e2m1 * (e4m3 * global_scale); exact for global_scale 1."""
    GROUPS: tl.constexpr = BLOCK_K // 16
    offs_g = k0 // 16 + tl.arange(0, GROUPS)
    mask = (offs_n[:, None] < N) & (offs_g[None, :] < K // 16)
    scale = _e4m3_to_f32(tl.load(s_ptr + offs_n[:, None] * (K // 16) + offs_g[None, :], mask=mask, other=0))
    scale = scale * global_scale
    byte_ptrs = w_ptr + offs_n[:, None, None] * (K // 2) + offs_g[None, :, None] * 8 + tl.arange(0, 8)[None, None, :]
    packed = tl.load(byte_ptrs, mask=mask[:, :, None], other=0)
    values = tl.interleave(_e2m1_to_f32(packed & 15), _e2m1_to_f32(packed >> 4)) * scale[:, :, None]
    return tl.reshape(values, (BLOCK_N, BLOCK_K))


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, gs_ptr, out_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One [BLOCK_N, BLOCK_K] tile of W, in the reference codec's float32 order, rounded once to out's dtype."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    w = _dequant_tile(w_ptr, s_ptr, offs_n, tl.program_id(1) * BLOCK_K, N, K, tl.load(gs_ptr), BLOCK_N, BLOCK_K)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    tl.store(out_ptr + offs_n[:, None] * K + offs_k[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)
