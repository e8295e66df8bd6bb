"""The Triton kernels behind ``nvfp4_matmul`` (imported only where Triton is installed).

Kept apart from the dispatch so the math of one tile reads top to bottom:
decoding E2M1 codes and E4M3 scales exactly (bit tricks, or inline PTX that
turns 8 codes of a uint32 into fp16 pairs), the shared tile pointers, loads and
split-K epilogue, and the tensor-core tiles for decode batches. The CUDA-core
GEMV (M = 1-4) is in ``nvfp4_triton_gemv``, the prefill path's dequantize kernel
in ``nvfp4_triton_dequant``. ``nvfp4_matmul`` picks the kernel and launch shape.
"""

import triton
import triton.language as tl


@triton.jit
def _epilogue(
    out_ptr, acc, gs_ptr, bias_ptr, offs_m, offs_n, M, N, stride_om, first_split, ws_ptr, count_ptr, splits,
    HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, SELF_CLEAN: tl.constexpr,
):  # fmt: skip
    """Global scale and bias on the fp32 accumulator, then store (or add, when K is split)."""
    y = acc * tl.load(gs_ptr)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        y += bias[None, :] * first_split
    ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if ATOMIC and SELF_CLEAN:
        _reduce_splits(ptrs, y, mask, ws_ptr + offs_m[:, None] * N + offs_n[None, :], count_ptr, splits,
                       out_ptr.dtype.element_ty)  # fmt: skip
    elif ATOMIC:
        tl.atomic_add(ptrs, y, mask=mask, sem="relaxed")  # a sum: no ordering needed (acq_rel fences every add)
    else:
        tl.store(ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)

@triton.jit
def _reduce_splits(out_ptrs, y, mask, sum_ptrs, count_ptr, splits, out_dtype: tl.constexpr):
    """Split K finished in this launch (see ``split_k_workspace``): add this split's part to the zeroed fp32
    sums; the split that arrives last at the tile writes the total in out's dtype and zeroes sums and counter."""
    tl.atomic_add(sum_ptrs, y, mask=mask, sem="relaxed")
    tl.debug_barrier()  # every thread's adds come before the arrival that releases them
    counter = count_ptr + tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    if tl.atomic_add(counter, 1, sem="acq_rel") == splits - 1:
        total = tl.load(sum_ptrs, mask=mask, cache_modifier=".cg")  # from L2, where the adds were made
        tl.store(out_ptrs, total.to(out_dtype), mask=mask)
        # Every thread has read its totals before any thread zeroes them: the compiler may give the load and the
        # zeroing different thread layouts, and without this barrier a zero overtook a read (14336 x 4096 at M = 4:
        # 137 of 1,000 calls wrong on an H200, bench/split_k_race_check.py, 2026-12-03).
        tl.debug_barrier()
        tl.store(sum_ptrs, tl.zeros_like(total), mask=mask)
        tl.atomic_xchg(counter, 0, sem="relaxed")

@triton.jit
def _code_f16(words, J: tl.constexpr):
    """Code J (bits 4J..4J+3) of each uint32 word -> its E2M1 value * 2^-14 as fp16, exact.

    The magnitude bits go to the fp16 exponent's low 2 bits and the mantissa's top bit, the sign to bit 15;
    E=0 codes (0, 0.5) land on fp16 zero / subnormal, which fp16 and fp32 arithmetic keep.
    """
    if 4 * J >= 9:
        mag = (words >> (4 * J - 9)) & 0xE00
    else:
        mag = (words << (9 - 4 * J)) & 0xE00
    if 4 * J >= 12:
        sign = (words >> (4 * J - 12)) & 0x8000
    else:
        sign = (words << (12 - 4 * J)) & 0x8000
    return (mag | sign).to(tl.uint16).to(tl.float16, bitcast=True)

@triton.jit
def _e4m3_f16(byte):
    """E4M3 byte -> its value * 2^-8 as fp16 (normals and subnormals alike), exact."""
    bits = byte.to(tl.uint16)
    bits = ((bits & 0x80) << 8) | ((bits & 0x7F) << 7)
    return bits.to(tl.float16, bitcast=True)

@triton.jit
def _load_tile(w_ptrs, s_ptrs, x_ptrs, k0, K, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """One K tile as stored: codes as uint32 words [BLOCK_N, BLOCK_K/8] (word w = k 8w..8w+7), E4M3 bytes
    [BLOCK_N, BLOCK_K/16], x [BLOCK_M, BLOCK_K]. Nothing here uses the data, so the loads stay in flight."""
    if EVEN_K:
        words = tl.load(w_ptrs)
        scale = tl.load(s_ptrs)
        x = tl.load(x_ptrs)
    else:
        words = tl.load(w_ptrs, mask=(k0 // 8 + tl.arange(0, BLOCK_K // 8))[None, :] < K // 8, other=0)
        scale = tl.load(s_ptrs, mask=(k0 // 16 + tl.arange(0, BLOCK_K // 16))[None, :] < K // 16, other=0)
        x = tl.load(x_ptrs, mask=(k0 + tl.arange(0, BLOCK_K))[None, :] < K, other=0.0)
    return words, scale, x

@triton.jit
def _prefetch(w_ptrs, s_ptrs, x_ptrs, k0, k_end, K, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """The pointers advanced to the K tile after k0 and that tile's loads started (the last tile: itself again),
    so that they are in flight while tile k0 is decoded."""
    step = tl.where(k0 + BLOCK_K < k_end, BLOCK_K, 0)
    w_ptrs += step // 8
    s_ptrs += step // 16
    x_ptrs += step
    words, scale, x = _load_tile(w_ptrs, s_ptrs, x_ptrs, k0 + step, K, EVEN_K, BLOCK_K)
    return w_ptrs, s_ptrs, x_ptrs, words, scale, x


@triton.jit
def _word_scale(scale):
    """E4M3 bytes [BLOCK_N, G] -> fp16 scale (value * 2^-8) per word [BLOCK_N, 2G]."""
    scale = _e4m3_f16(scale)
    return tl.interleave(scale, scale)

@triton.jit
def _split8(x, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """x [BLOCK_M, BLOCK_K] -> its eight column sets x[:, 8w + j], j = 0..7, each [BLOCK_M, BLOCK_K/8]."""
    c0, c1 = tl.split(tl.reshape(x, (BLOCK_M, BLOCK_K // 8, 2, 2, 2)))  # [m, w, a, b, c]: k = 8w + 4a + 2b + c
    b00, b01 = tl.split(c0)
    b10, b11 = tl.split(c1)
    x0, x4 = tl.split(b00)
    x2, x6 = tl.split(b01)
    x1, x5 = tl.split(b10)
    x3, x7 = tl.split(b11)
    return x0, x1, x2, x3, x4, x5, x6, x7

@triton.jit
def _tile_pointers(
    x_ptr, w_ptr, s_ptr, M, N, K, stride_xm, k_start,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Pointers to this program's first K tile; rows past M or N read row M-1 / N-1 (never stored)."""
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_m = tl.minimum(offs_m, M - 1)
    rows_n = tl.minimum(offs_n, N - 1)
    w_ptrs = w_ptr + rows_n[:, None] * (K // 8) + (k_start // 8 + tl.arange(0, BLOCK_K // 8))[None, :]
    s_ptrs = s_ptr + rows_n[:, None] * (K // 16) + (k_start // 16 + tl.arange(0, BLOCK_K // 16))[None, :]
    x_ptrs = x_ptr + rows_m[:, None] * stride_xm + (k_start + tl.arange(0, BLOCK_K))[None, :]
    return offs_m, offs_n, w_ptrs, s_ptrs, x_ptrs

# Eight E2M1 codes of one uint32 word -> eight fp32 (value * 2^-14): codes j and j+4 sit 16 bits apart, so
# one shift/and/or pass lays both into an fp16x2 (magnitude to bits 9-11, sign to 15), then two cvt.
_PAIR = "shl.b32 a, $8, {m}; and.b32 a, a, 0x0E000E00; {sign} and.b32 b, b, 0x80008000; or.b32 a, a, b; " \
        "mov.b32 {{l, h}}, a; cvt.f32.f16 ${lo}, l; cvt.f32.f16 ${hi}, h; "  # fmt: skip
_CODES_ASM = tl.constexpr(
    "{ .reg .b32 a, b; .reg .b16 l, h; "
    + _PAIR.format(m=9, sign="shl.b32 b, $8, 12;", lo=0, hi=4)
    + _PAIR.format(m=5, sign="shl.b32 b, $8, 8;", lo=1, hi=5)
    + _PAIR.format(m=1, sign="shl.b32 b, $8, 4;", lo=2, hi=6)
    + _PAIR.format(m=9, sign="mov.b32 b, $8;", lo=3, hi=7).replace("shl.b32 a, $8, 9", "shr.b32 a, $8, 3")
    + "}"
)

@triton.jit
def _codes_f32(words, ASM: tl.constexpr):
    """The eight codes of each word (code j = bits 4j..4j+3) as fp32 E2M1 value * 2^-14, exact."""
    if ASM:
        c0, c1, c2, c3, c4, c5, c6, c7 = tl.inline_asm_elementwise(
            _CODES_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r", [words], dtype=(tl.float32,) * 8, is_pure=True, pack=1
        )
    else:
        c0 = _code_f16(words, 0).to(tl.float32)
        c1 = _code_f16(words, 1).to(tl.float32)
        c2 = _code_f16(words, 2).to(tl.float32)
        c3 = _code_f16(words, 3).to(tl.float32)
        c4 = _code_f16(words, 4).to(tl.float32)
        c5 = _code_f16(words, 5).to(tl.float32)
        c6 = _code_f16(words, 6).to(tl.float32)
        c7 = _code_f16(words, 7).to(tl.float32)
    return c0, c1, c2, c3, c4, c5, c6, c7

@triton.jit
def _scaled_codes(words, scale16, MUL16: tl.constexpr, ASM: tl.constexpr, dtype: tl.constexpr):
    """The eight codes of each word times their E4M3 scale: W * 2^-14, exact in fp16 (so in bf16/fp32 too)."""
    if MUL16 and not ASM:
        c0 = (_code_f16(words, 0) * scale16).to(dtype)
        c1 = (_code_f16(words, 1) * scale16).to(dtype)
        c2 = (_code_f16(words, 2) * scale16).to(dtype)
        c3 = (_code_f16(words, 3) * scale16).to(dtype)
        c4 = (_code_f16(words, 4) * scale16).to(dtype)
        c5 = (_code_f16(words, 5) * scale16).to(dtype)
        c6 = (_code_f16(words, 6) * scale16).to(dtype)
        c7 = (_code_f16(words, 7) * scale16).to(dtype)
    else:
        s = scale16.to(tl.float32)
        c0, c1, c2, c3, c4, c5, c6, c7 = _codes_f32(words, ASM)
        c0 = (c0 * s).to(dtype)
        c1 = (c1 * s).to(dtype)
        c2 = (c2 * s).to(dtype)
        c3 = (c3 * s).to(dtype)
        c4 = (c4 * s).to(dtype)
        c5 = (c5 * s).to(dtype)
        c6 = (c6 * s).to(dtype)
        c7 = (c7 * s).to(dtype)
    return c0, c1, c2, c3, c4, c5, c6, c7

# bf16 x: the eight codes of a word straight to scaled bf16 pairs. Codes j and j+4 sit 16 bits apart, so one
# pass per pair lays both into a bf16x2: magnitude bits to 6-8 (the exponent's low two bits and the mantissa's
# top bit: the code reads as its E2M1 value * 2^-126, 0.5 as a bf16 subnormal), sign to bit 15; then one
# fma.rn.bf16x2 by the word's scale (E4M3 value * 2^119, a -0 addend) gives W * 2^-7 exactly (code * scale has
# at most 6 significant bits). About 2.5 instructions per weight against the fp32 round trip's 5.
_BF16_PAIR = "{mag} and.b32 a, a, 0x01C001C0; {sign} and.b32 b, b, 0x80008000; or.b32 a, a, b; " \
             "fma.rn.bf16x2 a, a, s, z; mov.b32 {{${lo}, ${hi}}}, a; "  # fmt: skip
_BF16_CODES_ASM = tl.constexpr(
    "{ .reg .b32 a, b, s, z; mov.b32 s, {$9, $9}; mov.b32 z, 0x80008000; "
    + _BF16_PAIR.format(mag="shl.b32 a, $8, 6;", sign="shl.b32 b, $8, 12;", lo=0, hi=4)
    + _BF16_PAIR.format(mag="shl.b32 a, $8, 2;", sign="shl.b32 b, $8, 8;", lo=1, hi=5)
    + _BF16_PAIR.format(mag="shr.b32 a, $8, 2;", sign="shl.b32 b, $8, 4;", lo=2, hi=6)
    + _BF16_PAIR.format(mag="shr.b32 a, $8, 6;", sign="mov.b32 b, $8;", lo=3, hi=7)
    + "}"
)


@triton.jit
def _bf16_scaled_codes(words, scale_bytes):
    """The eight codes of each word times their E4M3 scale, as bf16 W * 2^-7 (exact); GPU only (inline PTX)."""
    scale = (_e4m3_f16(scale_bytes).to(tl.float32) * 1.7014118346046923e38).to(tl.bfloat16)  # * 2^127: value * 2^119
    scale = tl.interleave(scale, scale).to(tl.int16, bitcast=True)
    c0, c1, c2, c3, c4, c5, c6, c7 = tl.inline_asm_elementwise(
        _BF16_CODES_ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r,h", [words, scale], dtype=(tl.int16,) * 8, is_pure=True, pack=1
    )
    return (c0.to(tl.bfloat16, bitcast=True), c1.to(tl.bfloat16, bitcast=True), c2.to(tl.bfloat16, bitcast=True),
            c3.to(tl.bfloat16, bitcast=True), c4.to(tl.bfloat16, bitcast=True), c5.to(tl.bfloat16, bitcast=True),
            c6.to(tl.bfloat16, bitcast=True), c7.to(tl.bfloat16, bitcast=True))  # fmt: skip


@triton.jit
def _tile_codes(words, scale_bytes, MUL16: tl.constexpr, ASM: tl.constexpr, BF16_PAIRS: tl.constexpr, dtype: tl.constexpr):
    """A K tile's eight scaled code tiles, by the decode the kernel was compiled for (undo with _unscaled)."""
    if BF16_PAIRS:
        c0, c1, c2, c3, c4, c5, c6, c7 = _bf16_scaled_codes(words, scale_bytes)
    else:
        c0, c1, c2, c3, c4, c5, c6, c7 = _scaled_codes(words, _word_scale(scale_bytes) * 256.0, MUL16, ASM, dtype)
    return c0, c1, c2, c3, c4, c5, c6, c7


@triton.jit
def _unscaled(acc, BF16_PAIRS: tl.constexpr):
    """The accumulator times the power of two _tile_codes left out: 2^7 (bf16 pairs) or 2^14 (fp16 codes)."""
    if BF16_PAIRS:
        acc = acc * 128.0
    else:
        acc = acc * 16384.0
    return acc


@triton.jit
def _dot_kernel(
    x_ptr, w_ptr, s_ptr, gs_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_om, k_per_split,
    ws_ptr, count_ptr, splits,
    HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, SELF_CLEAN: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, JOIN: tl.constexpr, MUL16: tl.constexpr,
    ASM: tl.constexpr, SWAP: tl.constexpr = False, BF16_PAIRS: tl.constexpr = False,
):  # fmt: skip
    """Tensor-core decode: codes decoded straight from uint32 words, no byte unpacking.

    JOIN=False: eight dots per K tile, code j of every word against x's columns 8w+j (x split in
    registers). JOIN=True: the eight code tiles joined back into K order, one dot. SWAP (with JOIN)
    computes out^T = W x^T, the decoded tile as the MMA's first operand (Hopper's wgmma reads it from
    registers; only x goes through shared memory). BF16_PAIRS (bf16 x, on a GPU): see ``_bf16_scaled_codes``.
    """
    k_start = tl.program_id(2) * k_per_split
    offs_m, offs_n, w_ptrs, s_ptrs, x_ptrs = _tile_pointers(
        x_ptr, w_ptr, s_ptr, M, N, K, stride_xm, k_start, BLOCK_M, BLOCK_N, BLOCK_K
    )
    dtype = x_ptr.dtype.element_ty
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_end = tl.minimum(k_start + k_per_split, K)
    words_next, scale_next, x_next = _load_tile(w_ptrs, s_ptrs, x_ptrs, k_start, K, EVEN_K, BLOCK_K)
    for k0 in range(k_start, k_end, BLOCK_K):
        words, scale, x = words_next, scale_next, x_next
        w_ptrs, s_ptrs, x_ptrs, words_next, scale_next, x_next = _prefetch(w_ptrs, s_ptrs, x_ptrs, k0, k_end, K,
                                                                           EVEN_K, BLOCK_K)  # fmt: skip
        words = words.to(tl.uint32, bitcast=True)
        c0, c1, c2, c3, c4, c5, c6, c7 = _tile_codes(words, scale, MUL16, ASM, BF16_PAIRS, dtype)
        if JOIN:
            q0 = tl.join(tl.join(c0, c4), tl.join(c2, c6))
            q1 = tl.join(tl.join(c1, c5), tl.join(c3, c7))
            w = tl.reshape(tl.join(q0, q1), (BLOCK_N, BLOCK_K))  # [n, w, a, b, c] is code 4a + 2b + c
            if SWAP:
                acc = tl.dot(w, tl.trans(x), acc)
            else:
                acc = tl.dot(x, tl.trans(w), acc)
        else:
            x0, x1, x2, x3, x4, x5, x6, x7 = _split8(x, BLOCK_M, BLOCK_K)
            acc = tl.dot(x0, tl.trans(c0), acc)
            acc = tl.dot(x1, tl.trans(c1), acc)
            acc = tl.dot(x2, tl.trans(c2), acc)
            acc = tl.dot(x3, tl.trans(c3), acc)
            acc = tl.dot(x4, tl.trans(c4), acc)
            acc = tl.dot(x5, tl.trans(c5), acc)
            acc = tl.dot(x6, tl.trans(c6), acc)
            acc = tl.dot(x7, tl.trans(c7), acc)
    acc = _unscaled(acc, BF16_PAIRS)
    first = (tl.program_id(2) == 0).to(tl.float32)
    if SWAP:
        acc = tl.trans(acc)
    _epilogue(out_ptr, acc, gs_ptr, bias_ptr, offs_m, offs_n, M, N, stride_om, first, ws_ptr, count_ptr, splits,
              HAS_BIAS, ATOMIC, SELF_CLEAN)

@triton.jit
def _pipelined_dot_kernel(
    x_ptr, w_ptr, s_ptr, gs_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_om, k_per_split,
    ws_ptr, count_ptr, splits,
    HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, SELF_CLEAN: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr, ASM: tl.constexpr,
    SWAP: tl.constexpr = False, BF16_PAIRS: tl.constexpr = False,
):  # fmt: skip
    """Tensor-core decode with Triton's software pipeliner keeping STAGES K tiles in flight (SWAP: as in _dot_kernel).

    The loads stand at the top of a plain ``tl.range`` loop, so the compiler (not a hand-written
    register prefetch) overlaps them with the decode and the dot of earlier tiles.
    """
    k_start = tl.program_id(2) * k_per_split
    offs_m, offs_n, w_ptrs, s_ptrs, x_ptrs = _tile_pointers(
        x_ptr, w_ptr, s_ptr, M, N, K, stride_xm, k_start, BLOCK_M, BLOCK_N, BLOCK_K
    )
    dtype = x_ptr.dtype.element_ty
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=STAGES):
        words, scale, x = _load_tile(w_ptrs, s_ptrs, x_ptrs, k0, K, EVEN_K, BLOCK_K)
        w_ptrs += BLOCK_K // 8
        s_ptrs += BLOCK_K // 16
        x_ptrs += BLOCK_K
        words = words.to(tl.uint32, bitcast=True)
        c0, c1, c2, c3, c4, c5, c6, c7 = _tile_codes(words, scale, True, ASM, BF16_PAIRS, dtype)
        q0 = tl.join(tl.join(c0, c4), tl.join(c2, c6))
        q1 = tl.join(tl.join(c1, c5), tl.join(c3, c7))
        w = tl.reshape(tl.join(q0, q1), (BLOCK_N, BLOCK_K))  # [n, w, a, b, c] is code 4a + 2b + c
        if SWAP:
            acc = tl.dot(w, tl.trans(x), acc)
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    acc = _unscaled(acc, BF16_PAIRS)
    first = (tl.program_id(2) == 0).to(tl.float32)
    if SWAP:
        acc = tl.trans(acc)
    _epilogue(out_ptr, acc, gs_ptr, bias_ptr, offs_m, offs_n, M, N, stride_om, first, ws_ptr, count_ptr, splits,
              HAS_BIAS, ATOMIC, SELF_CLEAN)

