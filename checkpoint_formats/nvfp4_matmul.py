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

- decode, ``M <= DECODE_MAX_M``: one fused kernel reads the packed codes and
  E4M3 scales as stored, builds each E2M1 value and scale from its bits (exact
  in fp32), and multiplies by ``x`` with ``tl.dot``, split along K with fp32
  atomics when N is too small to fill the GPU; the global scale and bias are
  applied to the fp32 accumulator. A CUDA-core GEMV variant for M <= 4 was
  measured and dropped (never faster than tl.dot). MEASURED: this
  kernel is correct but SLOWER than bf16 F.linear (0.3-0.9x GPU time): it is
  bound by the per-weight decode work in Triton, not by bytes; see the JSON.
- prefill, larger M: a Triton kernel dequantizes W to x's dtype and cuBLAS
  (``F.linear``) multiplies; at these sizes the matmul is compute bound and
  cuBLAS beats a fused Triton kernel with in-register dequantization.

No ``prepare`` step is needed: the kernels read the checkpoint layout directly
(``weight_scale`` through a free uint8 view, ``weight_scale_2`` by pointer, so
no host sync). fp32 ``x`` goes through TF32 ``tl.dot`` on the decode path.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: callers use nvfp4.dequantize_weight instead
    triton = None

DECODE_MAX_M = 128
_X_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class KernelConfig:
    """One launch shape of the decode kernel."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


def available(device: torch.device | str) -> bool:
    """True where the Triton kernels can run: Triton importable and a CUDA device of sm_80+."""
    device = torch.device(device)
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
    if m == 0:
        out = x2d.new_empty(0, n)
    elif m <= DECODE_MAX_M:
        config = decode_config(m, n, k, _sm_count(x.device))
        out = fused_matmul(x2d, packed, weight_scale, weight_scale_2, bias, config)
    else:
        out = F.linear(x2d, dequantize(packed, weight_scale, weight_scale_2, x.dtype), bias)
    return out.reshape(*x.shape[:-1], n)


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


def _next_pow2(value: int) -> int:
    return 1 << max(value - 1, 0).bit_length()


@functools.lru_cache(maxsize=4096)
def decode_config(m: int, n: int, k: int, sm_count: int) -> KernelConfig:
    """Launch shape for M <= DECODE_MAX_M, cached by (M, N, K): the best shapes of the bench's sweep.

    Split K while that keeps the grid within two waves and each split at least 4 K tiles.
    """
    block_m = 16 if m <= 16 else 64 if m <= 64 else 128
    config = KernelConfig(block_m=block_m, block_n=32 if n <= 2048 else 64, block_k=128)
    if block_m == 128:
        config = KernelConfig(block_m=128, block_n=config.block_n, block_k=128, num_warps=8, num_stages=3)
    tiles = triton.cdiv(n, config.block_n) * triton.cdiv(m, config.block_m)
    k_tiles = triton.cdiv(k, config.block_k)
    split = 1
    while split < 8 and tiles * split * 2 <= 2 * sm_count and k_tiles // (split * 2) >= 4:
        split *= 2
    return KernelConfig(**{**config.__dict__, "split_k": split})


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
    m, k = x2d.shape
    n = packed.shape[0]
    out_dtype = out_dtype or x2d.dtype
    k_per_split = triton.cdiv(triton.cdiv(k, config.split_k), config.block_k) * config.block_k
    split = triton.cdiv(k, k_per_split)
    atomic = split > 1
    out = (torch.zeros if atomic else torch.empty)(m, n, device=x2d.device, dtype=torch.float32 if atomic else out_dtype)
    grid = (triton.cdiv(n, config.block_n), triton.cdiv(m, config.block_m), split)
    _mma_kernel[grid](
        x2d, packed, weight_scale.view(torch.uint8), weight_scale_2, bias if bias is not None else out, out,
        m, n, k, x2d.stride(0), out.stride(0), k_per_split,
        HAS_BIAS=bias is not None, ATOMIC=atomic,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return out.to(out_dtype) if atomic else out


def dequantize(
    packed: torch.Tensor, weight_scale: torch.Tensor, weight_scale_2: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """The prefill path's first half: W [N, K] in ``dtype``, equal to ``nvfp4.dequantize_weight``."""
    n, k = packed.shape[0], packed.shape[1] * 2
    out = torch.empty(n, k, device=packed.device, dtype=dtype)
    block_n, block_k = 32, 256
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    _dequant_kernel[grid](
        packed, weight_scale.view(torch.uint8), weight_scale_2, out, n, k, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4
    )
    return out


if triton is not None:

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
    def _epilogue(out_ptr, acc, gs_ptr, bias_ptr, offs_m, offs_n, M, N, stride_om, first_split, HAS_BIAS, ATOMIC):
        """Global scale and bias on the fp32 accumulator, then store (or add, when K is split)."""
        y = acc * tl.load(gs_ptr)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
            y += bias[None, :] * first_split
        ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        if ATOMIC:
            tl.atomic_add(ptrs, y, mask=mask)
        else:
            tl.store(ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _mma_kernel(
        x_ptr, w_ptr, s_ptr, gs_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_om, k_per_split,
        HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """Tensor-core decode: dequantize a weight tile in registers, tl.dot with x."""
        offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        k_start = tl.program_id(2) * k_per_split
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x_mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=x_mask, other=0.0)
            w = _dequant_tile(w_ptr, s_ptr, offs_n, k0, N, K, 1.0, BLOCK_N, BLOCK_K).to(x.dtype)
            acc = tl.dot(x, tl.trans(w), acc)
        first = (tl.program_id(2) == 0).to(tl.float32)
        _epilogue(out_ptr, acc, gs_ptr, bias_ptr, offs_m, offs_n, M, N, stride_om, first, HAS_BIAS, ATOMIC)

    @triton.jit
    def _dequant_kernel(w_ptr, s_ptr, gs_ptr, out_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """One [BLOCK_N, BLOCK_K] tile of W, in the reference codec's float32 order, rounded once to out's dtype."""
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        w = _dequant_tile(w_ptr, s_ptr, offs_n, tl.program_id(1) * BLOCK_K, N, K, tl.load(gs_ptr), BLOCK_N, BLOCK_K)
        mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
        tl.store(out_ptr + offs_n[:, None] * K + offs_k[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)
