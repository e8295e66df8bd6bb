"""The Triton kernels of the captured decode step (imported only where Triton is installed).

``_decode_attention_kernel`` (behind ``decode_attention``): one program per (row, KV head): the query heads
that share the KV head are the rows of one small tile, the cache is read a block of positions at a time, and a
block whose every position the additive mask closes (left padding, or positions the static cache has not
reached yet) is skipped before its keys and values are loaded. Online softmax in fp32, q.k and p.v on tensor cores with fp32 accumulation, as flash attention does.

``_rms_norm_kernel`` (behind ``fused_norm``): one program per row, transformers' Llama RMSNorm in one pass.

``_rotary_kernel`` (behind ``fused_rotary``): one program per (token, head) of q and k together, transformers'
Llama rotary embedding with its roundings.
"""

import triton
import triton.language as tl


@triton.jit
def _decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, S, scale,
    stride_qb, stride_qh, stride_qg, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_mb, stride_ms, stride_ob, stride_oh, stride_og,
    GROUPS: tl.constexpr, GROUPS_PAD: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr, HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    row, head = tl.program_id(0), tl.program_id(1)
    offs_g = tl.arange(0, GROUPS_PAD)
    offs_d = tl.arange(0, D)
    q = tl.load(q_ptr + row * stride_qb + head * stride_qh + offs_g[:, None] * stride_qg + offs_d[None, :],
                mask=offs_g[:, None] < GROUPS, other=0.0)  # fmt: skip
    k_base = k_ptr + row * stride_kb + head * stride_kh
    v_base = v_ptr + row * stride_vb + head * stride_vh
    m_i = tl.full((GROUPS_PAD,), float("-inf"), tl.float32)
    l_i = tl.zeros((GROUPS_PAD,), tl.float32)
    acc = tl.zeros((GROUPS_PAD, D), tl.float32)
    for s0 in range(0, S, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        inside = offs_s < S
        if HAS_MASK:
            bias = tl.load(mask_ptr + row * stride_mb + offs_s * stride_ms, mask=inside, other=float("-inf"))
            bias = tl.where(bias.to(tl.float32) > -1e30, bias.to(tl.float32), float("-inf"))  # dtype min: closed
        else:
            bias = tl.where(inside, 0.0, float("-inf"))
        if tl.max(bias, axis=0) > float("-inf"):  # some position of this block is open
            k = tl.load(k_base + offs_s[:, None] * stride_ks + offs_d[None, :], mask=inside[:, None], other=0.0)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale + bias[None, :]
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_base + offs_s[:, None] * stride_vs + offs_d[None, :], mask=inside[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + row * stride_ob + head * stride_oh + offs_g[:, None] * stride_og + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=offs_g[:, None] < GROUPS)  # fmt: skip


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, D, eps, stride_x, stride_out, BLOCK: tl.constexpr):
    """w * (x * rsqrt(mean(x^2) + eps)) with transformers' roundings: fp32 math, the normalized row rounded to
    x's dtype before the weight multiplies it, the product rounded once."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    inside = offs < D
    x = tl.load(x_ptr + row * stride_x + offs, mask=inside, other=0.0).to(tl.float32)
    variance = tl.sum(x * x, axis=0) / D
    normed = (x * (1.0 / tl.sqrt_rn(variance + eps))).to(x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + offs, mask=inside, other=0.0)
    out = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, out.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _rotate_row(x_ptr, out_ptr, cos_ptr, sin_ptr, HALF: tl.constexpr):
    """One head's row: x * cos + rotate_half(x) * sin, each product and the sum rounded to x's dtype as
    transformers' eager ops round them (so fp32 products are never contracted into an FMA across a rounding)."""
    dtype = out_ptr.dtype.element_ty
    offs = tl.arange(0, HALF)
    x1 = tl.load(x_ptr + offs).to(tl.float32)
    x2 = tl.load(x_ptr + HALF + offs).to(tl.float32)
    cos1 = tl.load(cos_ptr + offs).to(tl.float32)
    cos2 = tl.load(cos_ptr + HALF + offs).to(tl.float32)
    sin1 = tl.load(sin_ptr + offs).to(tl.float32)
    sin2 = tl.load(sin_ptr + HALF + offs).to(tl.float32)
    first = (x1 * cos1).to(dtype).to(tl.float32) + (-x2 * sin1).to(dtype).to(tl.float32)
    second = (x2 * cos2).to(dtype).to(tl.float32) + (x1 * sin2).to(dtype).to(tl.float32)
    tl.store(out_ptr + offs, first.to(dtype))
    tl.store(out_ptr + HALF + offs, second.to(dtype))


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, cos_ptr, sin_ptr, T, HQ,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_qob, stride_qoh, stride_qot, stride_kob, stride_koh, stride_kot,
    stride_cb, stride_ct, stride_sb, stride_st, HALF: tl.constexpr,
):  # fmt: skip
    """Program (token b * T + t, head): heads below HQ are q's, the rest k's. Outputs have strides of their own:
    q and k may be columns of one fused q/k/v product (``sibling_fusion``), the outputs dense."""
    token, head = tl.program_id(0), tl.program_id(1)
    b, t = token // T, token % T
    cos = cos_ptr + b * stride_cb + t * stride_ct
    sin = sin_ptr + b * stride_sb + t * stride_st
    if head < HQ:
        source = q_ptr + b * stride_qb + head * stride_qh + t * stride_qt
        _rotate_row(source, q_out_ptr + b * stride_qob + head * stride_qoh + t * stride_qot, cos, sin, HALF)
    else:
        head -= HQ
        source = k_ptr + b * stride_kb + head * stride_kh + t * stride_kt
        _rotate_row(source, k_out_ptr + b * stride_kob + head * stride_koh + t * stride_kot, cos, sin, HALF)
