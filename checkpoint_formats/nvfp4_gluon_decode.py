"""The decode matmul for Hopper written in Gluon: each thread loads exactly the code bytes its wgmma fragment needs.

Why: ``_dot_kernel``'s swapped tile (plain Triton) decodes whole uint32 words, 8 consecutive k per thread,
while Hopper's wgmma wants its register operand spread across lanes (lane bits hold k bits 1-2), so every K
tile of decoded weights went through shared memory and back, and each wgmma was waited for before the next
tile was decoded: the tile ran at ~1 us per K step where the decode's instructions and the MMA's tensor
work take ~0.2 us each (SASS, H200, 2026-12-03). Gluon states layouts explicitly, so here

- each thread reads the code words of its rows from shared memory (16-byte loads) and decodes the one byte
  of each word that its fragment holds: byte ``b`` of a 16-k group holds k = 2b, 2b+1, exactly a fragment
  register's k pair, and lane bits 0-1 pick ``b`` mod 4 as the fragment's lane bits do (``nvfp4_layouts``): the
  decoded pairs are the fragment, with no shuffle and no trip of the decoded tile through shared memory;
- codes, their scales and x stream through a ring of ``STAGES`` shared-memory stages filled by asynchronous
  copies (``cp.async``, 16 bytes a thread; 4 for the scales), ``STAGES - 1`` K tiles in flight, and the wgmma
  is left in flight while the next tile is decoded (``warpgroup_mma_wait(1)``).

MEASURED (H200, 2026-12-03, bench/nvfp4_matmul_wgmma_sweep_gpu.json): the first version, which loaded the next
tile into registers (one K tile, 4 KB of codes per SM, in flight), was correct but 73.6 us against the Triton
tile's 65.2 us at M = 100 on 14336 x 4096: bound by the latency of its loads, not by its instructions or its
MMA. The copy ring is the answer to that (bench/RESULTS.md has its numbers).

The arithmetic is ``_dot_kernel``'s BF16_PAIRS decode (exact codes * scale in bf16, fp32 accumulation in K
order); K must be a multiple of 256 and of 2 * BLOCK_K, x bf16, rows 16-byte aligned (``_wgmma_runs``). GPU
only: Gluon has no interpreter, so CPU tests check the layouts' bases (``fragment_coordinates``) and the dispatch
falls back to ``_dot_kernel`` there.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.runtime.jit import constexpr_function
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

from checkpoint_formats.nvfp4_layouts import (
    PAIR_MASK,
    PAIR_SELECT_BASE,
    PAIR_SHIFT,
    WORD_SHIFT,
    byte_layout_bases,
    word_layout_bases,
)

ROWS_PER_WARP = 16  # a wgmma fragment's rows per warp: BLOCK_N = 16 * num_warps
_byte_layout_bases = constexpr_function(byte_layout_bases)  # callable while a kernel is compiled
_word_layout_bases = constexpr_function(word_layout_bases)


@constexpr_function
def _mma_layout(block_m, num_warps):
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, block_m, 16])


@constexpr_function
def _byte_layout(block_n, block_k):
    reg, lane, warp = _byte_layout_bases(block_n, block_k)
    return gl.DistributedLinearLayout(reg, lane, warp, [], [block_n, block_k // 16, 2, 4])


@constexpr_function
def _word_layout(block_n, block_k):
    reg, lane, warp = _word_layout_bases(block_n, block_k)
    return gl.DistributedLinearLayout(reg, lane, warp, [], [block_n, block_k // 8])


@constexpr_function
def _copy_layout(columns, vector, num_warps):
    """Rows of ``columns`` elements copied ``vector`` consecutive elements per thread, a warp's lanes along a row
    first (whole rows where a row needs fewer than 32 copies)."""
    across = columns // vector if columns // vector < 32 else 32
    return gl.BlockedLayout([1, vector], [32 // across, across], [num_warps, 1], [1, 0])


# Byte c of a code word and its scale (bf16 E4M3 value * 2^119) -> the byte's two scaled codes as a bf16x2,
# W * 2^-7 exactly: ``nvfp4_layouts.decoded_pair_bits`` (one shift, one prmt with selector $3, one shift, one
# mask; checked on CPU), then one fma by the scale with a -0 addend. Five instructions a pair; seven before
# (two shifts and two masks to put the signs in place).
_BYTE_ASM = gl.constexpr(
    "{ .reg .b32 r, b, s, z; mov.b32 s, {$4, $4}; mov.b32 z, 0x80008000; "
    f"shl.b32 b, $2, {WORD_SHIFT}; prmt.b32 r, $2, b, $3; shl.b32 r, r, {PAIR_SHIFT}; and.b32 r, r, {PAIR_MASK:#x}; "
    "fma.rn.bf16x2 r, r, s, z; mov.b32 {$0, $1}, r; }"
)
_SELECT_BASE = gl.constexpr(PAIR_SELECT_BASE)
_SCALE_BIAS = gl.constexpr(2.0**119)  # E4M3 * 2^119 in bf16: the decode's 2^-126 comes back to 2^-7


@gluon.jit
def _decoded_fragment(words, scale_bytes, byte_layout: gl.constexpr, a_layout: gl.constexpr, BLOCK_N: gl.constexpr,
                      BLOCK_K: gl.constexpr):  # fmt: skip
    """Code words [BLOCK_N, BLOCK_K/8] and their E4M3 scales [BLOCK_N, BLOCK_K/16] -> W * 2^-7 [BLOCK_N,
    BLOCK_K] in bf16, already in the wgmma register-operand layout (each lane decodes its own byte of a word)."""
    GROUPS: gl.constexpr = BLOCK_K // 16
    shape: gl.constexpr = [BLOCK_N, GROUPS, 2, 4]
    words = gl.convert_layout(gl.reshape(words, [BLOCK_N, GROUPS, 2]), gl.SliceLayout(3, byte_layout), assert_trivial=True)
    words = gl.expand_dims(words, 3).broadcast_to(shape)
    c = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(0, gl.SliceLayout(0, byte_layout))))
    select = (c * 0x1111 + _SELECT_BASE).to(gl.uint32)  # nvfp4_layouts.pair_selector
    select = gl.expand_dims(gl.expand_dims(gl.expand_dims(select, 0), 0), 0).broadcast_to(shape)
    # E4M3 -> fp32 (the hardware's two-at-a-time conversion), * 2^119, -> bf16: all exact
    scale = (scale_bytes.to(gl.float8e4nv, bitcast=True).to(gl.float32) * _SCALE_BIAS).to(gl.bfloat16)
    scale = gl.expand_dims(gl.expand_dims(scale, 2), 3).broadcast_to(shape).to(gl.int16, bitcast=True)
    low, high = gl.inline_asm_elementwise(_BYTE_ASM, "=h,=h,r,r,h", [words.to(gl.uint32, bitcast=True), select, scale],
                                          dtype=(gl.int16, gl.int16), is_pure=True, pack=1)  # fmt: skip
    pairs = gl.join(low.to(gl.bfloat16, bitcast=True), high.to(gl.bfloat16, bitcast=True))  # [n, g, h, c, nibble]
    return gl.convert_layout(gl.reshape(pairs, [BLOCK_N, BLOCK_K]), a_layout, assert_trivial=True)


@gluon.jit
def _issue(t, tiles, w_ring, s_ring, x_ring, w_base, s_base, x_base, w_offs, s_offs, x_offs, BLOCK_K: gl.constexpr,
           STAGES: gl.constexpr):  # fmt: skip
    """Start the copies of K tile t (codes, scales, x) into ring stage t % STAGES; one commit group per call, empty
    past the last tile, so that the wait's count of outstanding groups stays the same in every step."""
    if t < tiles:
        stage = t % STAGES
        async_copy.async_copy_global_to_shared(w_ring.index(stage), w_base + t * (BLOCK_K // 8) + w_offs)
        async_copy.async_copy_global_to_shared(s_ring.index(stage), s_base + t * (BLOCK_K // 16) + s_offs)
        async_copy.async_copy_global_to_shared(x_ring.index(stage), x_base + t * BLOCK_K + x_offs)
    async_copy.commit_group()


@gluon.jit
def _k_step(i, tiles, w_ring, s_ring, x_ring, w_base, s_base, x_base, w_offs, s_offs, x_offs, acc, w_previous,
            word_layout: gl.constexpr, scale_layout: gl.constexpr, byte_layout: gl.constexpr, a_layout: gl.constexpr,
            BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr):  # fmt: skip
    """Tile i: wait for its copies, decode, start the MMA, wait for tile i-1's MMA (``w_previous``), then refill
    tile i-1's stage with tile i + STAGES - 1.

    Two barriers a step: Triton's shared-memory analysis cannot tell ring stages apart and would add one before
    every copy and after every wait anyway; these two are the ones the ring needs."""
    stage = i % STAGES
    async_copy.wait_group(STAGES - 2)  # this thread's copies of tile i have landed
    gl.thread_barrier()  # ... and so have every other thread's
    # ... and the MMA's (async proxy) reads of x see them. After the barrier, as Triton orders its own pipelines:
    # its shared-memory analysis puts a barrier right after every wait anyway, so a fence before it would cost one
    fence_async_shared()
    words = w_ring.index(stage).load(word_layout)
    scales = s_ring.index(stage).load(scale_layout)
    w = _decoded_fragment(words, scales, byte_layout, a_layout, BLOCK_N, BLOCK_K)
    acc = warpgroup_mma(w, x_ring.index(stage).permute((1, 0)), acc, is_async=True)
    acc, w_previous = warpgroup_mma_wait(num_outstanding=1, deps=(acc, w_previous))
    gl.thread_barrier()  # both warpgroups' MMA of tile i-1 has retired: nothing reads its stage any more
    _issue(i + STAGES - 1, tiles, w_ring, s_ring, x_ring, w_base, s_base, x_base, w_offs, s_offs, x_offs, BLOCK_K, STAGES)
    return acc, w


@gluon.jit
def _wgmma_decode_kernel(
    x_ptr, w_ptr, s_ptr, gs_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_om, k_per_split,
    ws_ptr, count_ptr, splits,
    HAS_BIAS: gl.constexpr, ATOMIC: gl.constexpr, SELF_CLEAN: gl.constexpr,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr,
):  # fmt: skip
    """out^T[n, m] = sum_k W[n, k] x[m, k] for one [BLOCK_N, BLOCK_M] tile and one K split (``_dot_kernel``'s
    contract: rows past M or N read row M-1 / N-1 and are never stored; split K adds into sums as there).

    K, k_per_split and stride_xm are multiples of 256, 256 and 16 (``nvfp4_matmul._wgmma_runs`` and
    ``fused_matmul`` make sure): every row start is then 16-byte aligned (codes, x) or 4-byte aligned (scales),
    which the ``gl.multiple_of`` hints below tell Triton, so that it issues whole-vector copies."""
    mma_layout: gl.constexpr = _mma_layout(BLOCK_M, num_warps)
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_layout, k_width=2)
    byte_layout: gl.constexpr = _byte_layout(BLOCK_N, BLOCK_K)
    word_layout: gl.constexpr = _word_layout(BLOCK_N, BLOCK_K)
    scale_layout: gl.constexpr = gl.SliceLayout(2, gl.SliceLayout(3, byte_layout))  # one scale per 16-k group
    w_copy: gl.constexpr = _copy_layout(BLOCK_K // 8, 4, num_warps)  # 16-byte copies
    s_copy: gl.constexpr = _copy_layout(BLOCK_K // 16, 4, num_warps)  # 4-byte copies (cp.async's smallest)
    x_copy: gl.constexpr = _copy_layout(BLOCK_K, 8, num_warps)  # 16-byte copies
    plain: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0])
    x_shared: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], gl.bfloat16)

    row0 = gl.program_id(0) * BLOCK_N
    k_start = gl.program_id(2) * k_per_split
    groups = gl.multiple_of(K // 16, 16)  # E4M3 scales per row (K % 256 == 0: Triton cannot infer it from K's)
    split_groups = gl.multiple_of(k_per_split // 16, 16)
    # int32 offsets, fixed for the whole loop, beside scalar bases that walk K: far fewer live registers than
    # tensors of 64-bit pointers
    rows = gl.minimum(row0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, w_copy)), N - 1)
    w_offs = gl.expand_dims(rows * (groups * 2), 1) + gl.expand_dims(gl.arange(0, BLOCK_K // 8, layout=gl.SliceLayout(0, w_copy)), 0)
    s_rows = gl.minimum(row0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, s_copy)), N - 1)
    s_offs = gl.expand_dims(s_rows * groups, 1) + gl.expand_dims(gl.arange(0, BLOCK_K // 16, layout=gl.SliceLayout(0, s_copy)), 0)
    x_rows = gl.minimum(gl.program_id(1) * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, x_copy)), M - 1)
    x_offs = gl.expand_dims(x_rows * stride_xm, 1) + gl.expand_dims(gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, x_copy)), 0)
    w_base = w_ptr + gl.program_id(2) * split_groups * 2
    s_base = s_ptr + gl.program_id(2) * split_groups
    x_base = x_ptr + k_start

    w_ring = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N, BLOCK_K // 8], plain)
    s_ring = gl.allocate_shared_memory(gl.uint8, [STAGES, BLOCK_N, BLOCK_K // 16], plain)
    x_ring = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_M, BLOCK_K], x_shared)
    tiles = (gl.minimum(k_start + k_per_split, K) - k_start) // BLOCK_K  # even: fused_matmul splits K in tile pairs
    gl.assume(tiles >= 2)  # no zero-trip path: its zeroed accumulator would make ptxas serialize every MMA
    for t in gl.static_range(STAGES - 1):  # tiles 0 .. STAGES - 2 in flight before the first step
        _issue(t, tiles, w_ring, s_ring, x_ring, w_base, s_base, x_base, w_offs, s_offs, x_offs, BLOCK_K, STAGES)
    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=mma_layout)
    # Two tiles per iteration, decoded into two register sets: a set stays in use by its MMA while the other tile
    # is decoded, and is named as the wait's dependency after it, so the compiler cannot reuse its registers early.
    w_odd = gl.zeros([BLOCK_N, BLOCK_K], gl.bfloat16, layout=a_layout)
    for pair in range(tiles // 2):
        acc, w_even = _k_step(2 * pair, tiles, w_ring, s_ring, x_ring, w_base, s_base, x_base, w_offs, s_offs, x_offs,
                              acc, w_odd, word_layout, scale_layout, byte_layout, a_layout, BLOCK_N, BLOCK_K, STAGES)  # fmt: skip
        acc, w_odd = _k_step(2 * pair + 1, tiles, w_ring, s_ring, x_ring, w_base, s_base, x_base, w_offs, s_offs,
                             x_offs, acc, w_even, word_layout, scale_layout, byte_layout, a_layout, BLOCK_N, BLOCK_K,
                             STAGES)  # fmt: skip
    acc, w_odd = warpgroup_mma_wait(num_outstanding=0, deps=(acc, w_odd))
    async_copy.wait_group(0)  # the empty groups past the last tile

    offs_n = row0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma_layout))
    offs_m = gl.program_id(1) * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, mma_layout))
    y = acc * (128.0 * gl.load(gs_ptr))  # the decode's 2^-7 and the global scale
    if HAS_BIAS:
        bias = gl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(gl.float32)
        y += gl.expand_dims(bias, 1) * (gl.program_id(2) == 0).to(gl.float32)
    mask = (gl.expand_dims(offs_n, 1) < N) & (gl.expand_dims(offs_m, 0) < M)
    ptrs = out_ptr + gl.expand_dims(offs_m, 0) * stride_om + gl.expand_dims(offs_n, 1)
    if ATOMIC and SELF_CLEAN:
        _reduce_splits(ptrs, y, mask, ws_ptr + gl.expand_dims(offs_m, 0) * N + gl.expand_dims(offs_n, 1), count_ptr,
                       splits, out_ptr.dtype.element_ty)  # fmt: skip
    elif ATOMIC:
        gl.atomic_add(ptrs, y, mask=mask, sem="relaxed")
    else:
        gl.store(ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)


@gluon.jit
def _reduce_splits(out_ptrs, y, mask, sum_ptrs, count_ptr, splits, out_dtype: gl.constexpr):
    """``nvfp4_triton_kernels._reduce_splits`` in Gluon: the last split to arrive writes the total and cleans up."""
    gl.atomic_add(sum_ptrs, y, mask=mask, sem="relaxed")
    gl.thread_barrier()
    counter = count_ptr + gl.program_id(1) * gl.num_programs(0) + gl.program_id(0)
    if gl.atomic_add(counter, 1, sem="acq_rel") == splits - 1:
        total = gl.load(sum_ptrs, mask=mask, cache_modifier=".cg")
        gl.store(out_ptrs, total.to(out_dtype), mask=mask)
        gl.thread_barrier()  # every read of the totals before any zeroing (see the Triton kernel's race note)
        gl.store(sum_ptrs, gl.zeros_like(total), mask=mask)
        gl.atomic_xchg(counter, 0, sem="relaxed")


def launch(x2d, codes, scale_bytes, global_scale, bias, out, sums, arrivals, m, n, k, k_per_split, splits, grid,
           config, atomic: bool, self_clean: bool) -> None:  # fmt: skip
    """Launch the kernel for a ``KernelConfig(kernel="wgmma")`` (num_warps = block_n / 16)."""
    _wgmma_decode_kernel[grid](
        x2d, codes, scale_bytes, global_scale, bias if bias is not None else out, out, m, n, k, x2d.stride(0),
        out.stride(0), k_per_split, sums, arrivals, splits,
        HAS_BIAS=bias is not None, ATOMIC=atomic, SELF_CLEAN=self_clean, BLOCK_M=config.block_m,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, STAGES=config.num_stages,
        num_warps=config.block_n // ROWS_PER_WARP,
    )  # fmt: skip
