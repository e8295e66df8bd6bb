"""NVFP4 weight-only matmul on Hopper/Ampere: ``y = x @ dequant(W)^T (+ bias)`` in Triton.

Why: Hopper (sm_90) has no FP4 tensor cores, so serving our NVFP4 checkpoints
there either dequantizes every weight to bf16 (4x the memory) or needs a kernel
that reads the 4-bit codes and dequantizes them in registers. Decode (small M)
is bound by weight bytes: NVFP4 moves 0.5625 byte per weight instead of 2.

Libraries checked (2026-11): torchao 0.18's NVFP4Tensor runs its FP4 GEMMs only
on sm_100+ and otherwise dequantizes to high precision before F.linear (no
speed-up); FlashInfer 0.7's NVFP4 GEMMs target sm_100/sm_120 and its SM90
``megamoe`` is a multi-GPU W4A8 expert-parallel kernel on a Marlin-braided
layout, not a dense Linear; gemlite 0.6 is Triton W4A16 for integer formats with
its own packing, not this E2M1 + E4M3-block-16 + fp32-global layout; vLLM's
Marlin FP4 is inside the vLLM wheel; the small nvfp4effma project ships wheels
only for torch 2.7. None is a usable maintained wheel for torch 2.11-2.13 here,
so this module is plain Triton (kept optional: the project does not pin it).

Paths (measured on an H200, bench/nvfp4_matmul_bench.py, bench/nvfp4_matmul_gpu.json):

- decode, ``M <= DECODE_MAX_M``: one kernel reads the codes as uint32 words (8 codes each; inline PTX
  lays codes j and j+4 into one fp16x2, interpreter: portable bit ops), the next K tile prefetched in
  registers. M=1 (and tiny M on small weights): CUDA-core fp32-FMA GEMV with x split by code position;
  else tensor cores (codes * E4M3 scale exact in x's dtype, joined back into K order, one tl.dot); K split
  with fp32 atomics where N alone leaves SMs idle, finished in the same launch by the split that arrives
  last (``split_k_workspace``: no zero fill before, no cast after). Global scale and bias on the fp32
  accumulator.
  ``kernel="pipelined"``: the same tile in a plain ``tl.range`` loop that Triton's software pipeliner keeps
  3-5 K tiles deep (see ``nvfp4_launch_shapes.pipelined_config``: faster in isolation, not yet in a whole trial).
  ``kernel="wgmma"`` (the default for large weights, bf16 x, M = 2-128 on Hopper, ``nvfp4_launch_shapes.wgmma_config``): out^T =
  W x^T in Gluon (``nvfp4_gluon_decode``), codes decoded straight into the wgmma's register operand, codes,
  scales and x streamed through a ring of asynchronous copies, the MMA kept in flight.
  ``swap``: the same product in plain Triton (the decoded tile as the MMA's first operand, ``nvfp4_launch_shapes.swap_config``),
  where the Gluon tile cannot run (fp16 x, no Hopper or Gluon, misaligned rows).
  MEASURED (H200, bench/nvfp4_matmul_gpu.json, 2026-12-04): the Gluon tile 1.3-1.6x bf16's speed at M = 4-16,
  1.0-1.4x at M = 64, 0.7-1.0x at M = 100-128; the Triton tiles (smaller weights) 0.87-0.98x at M = 16 and
  0.70-0.78x at M = 128. ncu (bench/nvfp4_wgmma_ncu_gpu.txt) finds neither bound by bytes (DRAM at 14-24% of
  peak): at M = 16 under two warps a scheduler cannot hide the decode's latencies, at M = 128 one 8-warp block
  an SM stalls mostly at its two barriers a step.
- prefill, larger M: a Triton kernel dequantizes W to x's dtype (a slice of output rows at a time, at most
  ``PREFILL_SLICE_BYTES``) and cuBLAS multiplies; at these sizes the matmul is compute bound and cuBLAS beats
  a fused Triton kernel with in-register dequantization.

No ``prepare`` step is needed: the kernels read the checkpoint layout directly
(``weight_scale`` through a free uint8 view, ``weight_scale_2`` by pointer, so
no host sync). fp32 ``x`` goes through TF32 ``tl.dot`` on the decode path.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import torch.nn.functional as F

from checkpoint_formats import split_k_workspace
from checkpoint_formats.nvfp4_launch_shapes import (  # noqa: F401  (KernelConfig, decode_config, pipelined_config: public here too)
    KernelConfig,
    check_wgmma_config,
    decode_config,
    pipelined_config,
    swap_config,
)

try:
    import triton
except ImportError:  # CPU installs: callers use nvfp4.dequantize_weight instead
    triton = None
try:
    import triton.experimental.gluon  # noqa: F401  (Triton 3.5+)
except ImportError:  # no Triton, or one without Gluon: kernel="wgmma" runs as the swapped Triton tile
    gluon_available = False
else:
    gluon_available = True
# Only Triton itself is optional: an error in our kernel modules must surface, not turn every matmul into the
# slow pure-torch path (a half-written kernel module once did that silently: 12.5 s per trial instead of 1.7).
kernels = gemv = dequant_kernels = gluon_decode = None
if triton is not None:
    from checkpoint_formats import nvfp4_triton_dequant as dequant_kernels
    from checkpoint_formats import nvfp4_triton_gemv as gemv
    from checkpoint_formats import nvfp4_triton_kernels as kernels
if gluon_available:
    from checkpoint_formats import nvfp4_gluon_decode as gluon_decode

DECODE_MAX_M = 128
PREFILL_SLICE_BYTES = 64 << 20  # the largest dequantized weight slice a prefill holds at once
KERNEL_BLOCK_SIZE = 16  # codes per E4M3 scale the kernels decode (NVFP4); other block sizes dequantize first
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")  # no inline PTX in the interpreter
_X_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def available(device: torch.device | str) -> bool:
    """True where the Triton kernels can run: Triton importable and a CUDA device of sm_80+."""
    return _available_on(torch.device(device))


@functools.cache
def _available_on(device: torch.device) -> bool:
    """Asked by every packed Linear's forward: decided once per device, not per call."""
    if triton is None or device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def nvfp4_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_scale_2: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ dequant(packed, weight_scale, weight_scale_2)^T + bias`` in x's dtype, fp32 accumulation."""
    n, k = _check_arguments(x, packed, weight_scale, weight_scale_2, bias)
    x2d = x.reshape(-1, k)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    m = x2d.shape[0]
    # Triton launches on the *current* CUDA device: a layer on cuda:1 (a model split over GPUs) needs it set
    with torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext():
        if m == 0:
            out = x2d.new_empty(0, n)
        elif m <= DECODE_MAX_M:
            config = decode_config(m, n, k, _sm_count(x.device), x.element_size())
            out = fused_matmul(x2d, packed, weight_scale, weight_scale_2, bias, config)
        else:
            out = prefill_matmul(x2d, packed, weight_scale, weight_scale_2, bias)
    return out.reshape(*x.shape[:-1], n)


def prefill_matmul(
    x2d: torch.Tensor,
    packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_scale_2: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """The prefill path: W dequantized to x's dtype a slice of output rows at a time, each slice through cuBLAS
    straight into its columns of the output.

    Why slices: a whole 14336 x 4096 weight in bf16 is 117 MB, live beside a forward's activations at the peak
    of a trial's prefill and KL pass; slices of at most ``PREFILL_SLICE_BYTES`` bound that transient and cost
    one more dequantize + matmul launch each (the products are compute bound at prefill sizes).
    """
    n, k = packed.shape[0], packed.shape[1] * 2
    slices = triton.cdiv(n * k * x2d.element_size(), PREFILL_SLICE_BYTES)
    if slices <= 1:
        return F.linear(x2d, dequantize(packed, weight_scale, weight_scale_2, x2d.dtype), bias)
    rows = triton.cdiv(triton.cdiv(n, slices), 64) * 64
    out = torch.empty(x2d.shape[0], n, device=x2d.device, dtype=x2d.dtype)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        weight = dequantize(packed[start:stop], weight_scale[start:stop], weight_scale_2, x2d.dtype)
        block = out[:, start:stop]  # a column block: cuBLAS writes it in place (leading dimension N)
        if bias is None:
            torch.mm(x2d, weight.t(), out=block)
        else:
            torch.addmm(bias[start:stop], x2d, weight.t(), out=block)  # as F.linear adds it
        del weight
    return out


def _check_arguments(
    x: torch.Tensor,
    packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_scale_2: torch.Tensor,
    bias: torch.Tensor | None,
) -> tuple[int, int]:
    """Refuse what the kernels would misread; returns (N, K)."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"packed must be a 2-D uint8 [N, K/2] tensor, got {packed.dtype} {tuple(packed.shape)}")
    n, k = packed.shape[0], packed.shape[1] * 2
    if weight_scale.dtype != torch.float8_e4m3fn or tuple(weight_scale.shape) != (n, k // 16):
        raise ValueError(
            f"weight_scale must be float8_e4m3fn [{n}, {k // 16}], got {weight_scale.dtype} {tuple(weight_scale.shape)}"
        )
    if weight_scale_2.dtype != torch.float32 or weight_scale_2.numel() != 1:
        raise ValueError(f"weight_scale_2 must be one float32 value, got {weight_scale_2.dtype} {tuple(weight_scale_2.shape)}")
    if not (packed.is_contiguous() and weight_scale.is_contiguous()):
        raise ValueError("packed and weight_scale must be contiguous (the checkpoint layout)")
    if x.dtype not in _X_DTYPES or x.shape[-1:] != (k,):
        raise ValueError(f"x must be bf16/fp16/fp32 [..., {k}], got {x.dtype} {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape [{n}], got {tuple(bias.shape)}")
    tensors = (x, packed, weight_scale, weight_scale_2) + ((bias,) if bias is not None else ())
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"all tensors must be on one device, got {[str(t.device) for t in tensors]}")
    return n, k


@functools.cache
def _sm_count(device: torch.device) -> int:
    """Multiprocessors to fill (a nominal H200's 132 off CUDA, i.e. under TRITON_INTERPRET)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def fused_matmul(
    x2d: torch.Tensor,
    packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_scale_2: torch.Tensor,
    bias: torch.Tensor | None,
    config: KernelConfig,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The decode path: [M, K] x packed [N, K/2] -> [M, N] with in-kernel dequantization."""
    if config.kernel not in ("gemv", "dot", "pipelined", "wgmma"):
        raise ValueError(f"kernel must be 'gemv', 'dot', 'pipelined' or 'wgmma', got {config.kernel!r}")
    if config.swap and not (config.kernel == "pipelined" or (config.kernel == "dot" and config.join)):
        raise ValueError(f"swap=True needs the joined dot tile or the pipelined one, got {config}")
    if config.kernel == "wgmma":
        check_wgmma_config(config)
        if not _wgmma_runs(x2d, packed, weight_scale):
            config = swap_config(x2d.shape[0], packed.shape[0], packed.shape[1] * 2)
    m, k = x2d.shape
    n = packed.shape[0]
    out_dtype = out_dtype or x2d.dtype
    # wgmma: an even number of K tiles per split, and whole 256-k blocks (the kernel's alignment hints)
    k_step = max(2 * config.block_k, 256) if config.kernel == "wgmma" else config.block_k
    k_per_split = triton.cdiv(triton.cdiv(k, config.split_k), k_step) * k_step
    split = triton.cdiv(k, k_per_split)
    atomic = split > 1
    grid = (triton.cdiv(n, config.block_n), triton.cdiv(m, config.block_m), split)
    workspace = split_k_workspace.workspace_for(x2d.device, m * n, grid[0] * grid[1]) if atomic else None
    if atomic and workspace is None:  # no clean workspace to finish in: zero-filled fp32 output, cast after
        out = torch.zeros(m, n, device=x2d.device, dtype=torch.float32)
    else:
        out = torch.empty(m, n, device=x2d.device, dtype=out_dtype)
    sums, arrivals = (workspace.sums, workspace.arrivals) if workspace is not None else (out, out)
    common = (weight_scale.view(torch.uint8), weight_scale_2, bias if bias is not None else out, out,
              m, n, k, x2d.stride(0), out.stride(0), k_per_split, sums, arrivals, split)  # fmt: skip
    meta = dict(HAS_BIAS=bias is not None, ATOMIC=atomic, SELF_CLEAN=workspace is not None, BLOCK_M=config.block_m,
                BLOCK_N=config.block_n, BLOCK_K=config.block_k, num_warps=config.num_warps,
                num_stages=config.num_stages)  # fmt: skip
    cast = out.dtype != out_dtype
    if packed.data_ptr() % 4:  # the kernels read the codes as int32 words (8 codes each)
        packed = packed.clone()
    words = packed.view(torch.int32)
    if config.kernel == "wgmma":
        gluon_decode.launch(x2d, words, weight_scale.view(torch.uint8), weight_scale_2, bias, out, sums, arrivals, m, n,
                            k, k_per_split, split, grid, config, atomic, workspace is not None)  # fmt: skip
        return out.to(out_dtype) if cast else out
    meta.update(EVEN_K=k % config.block_k == 0, ASM=config.asm and not _INTERPRET)
    bf16_pairs = config.bf16_pairs and meta["ASM"] and x2d.dtype == torch.bfloat16
    if config.kernel == "gemv":
        gemv._gemv_kernel[grid](x2d, words, *common, **meta)
    elif config.kernel == "pipelined":
        stages = meta.pop("num_stages")
        kernels._pipelined_dot_kernel[grid](x2d, words, *common, STAGES=stages, num_stages=stages, SWAP=config.swap,
                                              BF16_PAIRS=bf16_pairs, **meta)
    else:
        kernels._dot_kernel[grid](x2d, words, *common, JOIN=config.join, MUL16=config.mul16, SWAP=config.swap,
                                   BF16_PAIRS=bf16_pairs, **meta)
    return out.to(out_dtype) if cast else out


def _wgmma_runs(x2d: torch.Tensor, packed: torch.Tensor, weight_scale: torch.Tensor) -> bool:
    """Where the Gluon tile can run: compiled Triton with Gluon, bf16 x on a Hopper GPU, K in whole 256-k blocks,
    and the alignment its whole-vector copies assume: x, codes and scales start on 16 bytes, and x's row stride is
    a multiple of 16 elements (Triton's divisibility specialization, which tells the kernel its rows are aligned)."""
    aligned = all(t.data_ptr() % 16 == 0 for t in (x2d, packed, weight_scale)) and x2d.stride(0) % 16 == 0
    return (gluon_decode is not None and not _INTERPRET and x2d.dtype == torch.bfloat16
            and packed.shape[1] * 2 % 256 == 0 and aligned and _is_hopper(x2d.device))  # fmt: skip


@functools.cache
def _is_hopper(device: torch.device) -> bool:
    """Decided once per device, not per call (as ``_available_on``)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


def dequantize(
    packed: torch.Tensor, weight_scale: torch.Tensor, weight_scale_2: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """The prefill path's first half: W [N, K] in ``dtype``, equal to ``nvfp4.dequantize_weight``."""
    n, k = packed.shape[0], packed.shape[1] * 2
    out = torch.empty(n, k, device=packed.device, dtype=dtype)
    block_n, block_k = 32, 256
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    dequant_kernels._dequant_kernel[grid](
        packed, weight_scale.view(torch.uint8), weight_scale_2, out, n, k, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4
    )
    return out
