"""NVFP4: 4-bit E2M1 values in blocks of 16 with an FP8 E4M3 scale per block.

Every function reproduces, bit for bit, what NVIDIA ModelOpt 0.47 writes into a
unified HF checkpoint (``NVFP4QTensor``), so that a weight we dequantize, edit
and re-quantize lands on the same codes and scales ModelOpt would produce; the
order of the float32 operations below matters for that and is deliberate.

Layout (README, "Stage 1: quantize" > "Formats"): ``weight`` uint8 ``[..., in/2]`` (even element in
the low nibble), ``weight_scale`` float8_e4m3fn ``[..., in/block]``,
``weight_scale_2`` float32 scalar (or one per expert for a 3-D expert stack).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from foundation.errors import UserError

FP4_MAX = 6.0
FP8_E4M3_MAX = 448.0
BLOCK_SCALE_MIN = 2.0**-9  # smallest E4M3 subnormal: scales never underflow to 0
DEFAULT_BLOCK_SIZE = 16
W4A8_GLOBAL_DIVISOR = FP8_E4M3_MAX

# code -> value; bit 3 is the sign, bits 0-2 index the magnitudes. Code 8 is -0
# but decodes to +0 exactly as ModelOpt's table does.
E2M1_VALUES = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, 0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=torch.float32)
# Midpoints between magnitudes; a value on an odd midpoint (0.75, 1.75, 3.5)
# rounds up so that ties go to the even code (round half to even).
_E2M1_BOUNDS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=torch.float32)
_E2M1_ODD_BOUNDS = torch.tensor([0.75, 1.75, 3.5], dtype=torch.float32)
_TABLES_ON_DEVICE: dict[tuple[int, torch.device], torch.Tensor] = {}


def _on_device(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Lookup tables copied once per device: a host-to-GPU copy in every forward would stall it."""
    key = (id(table), device)
    if key not in _TABLES_ON_DEVICE:
        _TABLES_ON_DEVICE[key] = table.to(device)
    return _TABLES_ON_DEVICE[key]


@dataclass
class NVFP4Weight:
    """A quantized weight as stored on disk (ModelOpt names in the comments)."""

    packed: torch.Tensor  # "weight": uint8 [..., in/2]
    weight_scale: torch.Tensor  # "weight_scale": float8_e4m3fn [..., in/block]
    weight_scale_2: torch.Tensor  # "weight_scale_2": float32 [] (or [E] for 3-D experts)

    @property
    def block_size(self) -> int:
        return self.packed.shape[-1] * 2 // self.weight_scale.shape[-1]

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.packed.shape[:-1], self.packed.shape[-1] * 2))

    def to(self, device: torch.device | str) -> NVFP4Weight:
        return NVFP4Weight(self.packed.to(device), self.weight_scale.to(device), self.weight_scale_2.to(device))


def check_finite(tensor: torch.Tensor, name: str) -> None:
    """Quantizing a NaN/inf silently poisons a whole block; refuse it by name."""
    if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise UserError(
            name,
            f"contains {bad} NaN/inf value(s) and cannot be quantized",
            "fix the weights upstream (an edit with a non-finite direction or scale is the usual cause)",
        )


def _per_row_global(scale_2: torch.Tensor, ndim: int) -> torch.Tensor:
    """Shape a [] or [E] global scale so it broadcasts over [..., rows, blocks]."""
    if scale_2.dim() == 0:
        return scale_2
    return scale_2.reshape(-1, *([1] * (ndim - 1)))


def global_scale(
    weight: torch.Tensor, *, per_expert: bool = False, divisor: float = FP4_MAX * FP8_E4M3_MAX
) -> torch.Tensor:
    """``weight_scale_2 = amax / (6 * 448)``: maps the largest block scale to E4M3's max.

    ``per_expert`` gives one scale per leading index of a 3-D expert stack, as
    ModelOpt exports fused experts. W4A8_NVFP4_FP8 checkpoints use
    ``divisor=W4A8_GLOBAL_DIVISOR`` (amax / 448) because their kernel
    dequantizes weights into FP8.
    """
    if per_expert:
        amax = weight.detach().abs().amax(dim=tuple(range(1, weight.dim()))).float()
    else:
        amax = weight.detach().abs().amax().float()
    # ModelOpt's export asserts on an all-zero weight (its scale would be 0 and
    # the block scales NaN); an edit can legitimately zero a module, so treat
    # it as if its amax were 1: every code is then 0 and dequantizes to 0. The
    # same for an amax so small (< ~4e-42, all subnormal) that amax / divisor
    # underflows to 0: dividing by that scale would turn the weight into NaN.
    scale = amax / divisor
    return torch.where(scale > 0, scale, torch.ones_like(amax) / divisor)


def block_scales(
    weight: torch.Tensor, weight_scale_2: torch.Tensor, block_size: int = DEFAULT_BLOCK_SIZE
) -> torch.Tensor:
    """Per-block FP8 scales: ``e4m3(clamp(block_amax / (6 * weight_scale_2), 2^-9, 448))``."""
    blocks = weight.detach().float().unflatten(-1, (-1, block_size))
    block_amax = blocks.abs().amax(dim=-1)
    scale = block_amax / (FP4_MAX * _per_row_global(weight_scale_2.float(), block_amax.dim()))
    scale[scale == 0] = 1.0  # all-zero block: any scale works, ModelOpt picks 1
    return scale.clamp(min=BLOCK_SCALE_MIN, max=FP8_E4M3_MAX).to(torch.float8_e4m3fn)


def encode_e2m1(scaled: torch.Tensor) -> torch.Tensor:
    """Round float32 values (already divided by their scale) to 4-bit codes, half to even.

    Magnitudes above 6 saturate to 6. The sign bit is set for every value < 0,
    so small negatives become code 8 (-0), exactly as ModelOpt encodes them.
    """
    magnitude = scaled.abs()
    bounds = _on_device(_E2M1_BOUNDS, scaled.device)
    index = torch.searchsorted(bounds, magnitude, out_int32=True).to(torch.uint8)
    on_odd_bound = (magnitude.unsqueeze(-1) == _on_device(_E2M1_ODD_BOUNDS, scaled.device)).any(dim=-1).to(torch.uint8)
    sign = (scaled < 0).to(torch.uint8)
    return (sign << 3) + index + on_odd_bound


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes (uint8 0..15) to float32 values."""
    return _on_device(E2M1_VALUES, codes.device)[codes.long()]


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Two codes per byte along the last dim: even element low nibble, odd element high."""
    if codes.shape[-1] % 2:
        raise ValueError(f"cannot pack an odd last dimension ({codes.shape[-1]})")
    return (codes[..., 1::2] << 4) | codes[..., 0::2]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_nibbles``: uint8 ``[..., n]`` to codes ``[..., 2n]``."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)


def quantize_weight(
    weight: torch.Tensor,
    *,
    weight_scale_2: torch.Tensor | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    name: str = "weight",
) -> NVFP4Weight:
    """Quantize a 2-D Linear weight ``[out, in]`` or a 3-D expert stack ``[E, out, in]``.

    ``weight_scale_2`` may be given because fused projections share one
    (q/k/v, gate/up: the maximum of their own); otherwise it is this weight's
    amax / 2688 (per expert for 3-D input).
    """
    check_finite(weight, name)
    if weight.dim() not in (2, 3):
        raise UserError(name, f"NVFP4 weights must be 2-D or 3-D, got shape {tuple(weight.shape)}")
    if weight.shape[-1] % block_size:
        raise UserError(
            name,
            f"input dimension {weight.shape[-1]} is not a multiple of the NVFP4 block size {block_size}",
            "exclude this module from quantization (keep it in bf16)",
        )
    if weight_scale_2 is None:
        weight_scale_2 = global_scale(weight, per_expert=weight.dim() == 3)
    weight_scale_2 = weight_scale_2.to(device=weight.device, dtype=torch.float32)
    scales = block_scales(weight, weight_scale_2, block_size)
    divisor = scales.float() * _per_row_global(weight_scale_2, scales.dim())
    scaled = (weight.detach().float().unflatten(-1, (-1, block_size)) / divisor.unsqueeze(-1)).flatten(-2)
    return NVFP4Weight(pack_nibbles(encode_e2m1(scaled)), scales, weight_scale_2)


def dequantize_weight(quantized: NVFP4Weight, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``W = e2m1[code] * float(weight_scale) * weight_scale_2``, computed in float32, then cast."""
    values = decode_e2m1(unpack_nibbles(quantized.packed))
    scale_2 = quantized.weight_scale_2.to(device=values.device, dtype=torch.float32)
    per_block = quantized.weight_scale.to(values.device).float() * _per_row_global(
        scale_2, quantized.weight_scale.dim()
    )
    blocks = values.unflatten(-1, (-1, quantized.block_size)) * per_block.unsqueeze(-1)
    return blocks.flatten(-2).to(dtype)


def _round_to_e2m1_grid(magnitude: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 magnitude, ties to even (the thresholds ModelOpt's kernel uses)."""
    return decode_e2m1(encode_e2m1(magnitude))


def fake_quantize_activation(
    x: torch.Tensor, input_scale: torch.Tensor, block_size: int = DEFAULT_BLOCK_SIZE
) -> torch.Tensor:
    """Simulate NVFP4 activation quantization (W4A4) the way ModelOpt's CUDA forward does.

    Blocks of ``block_size`` along the last dim get a dynamic FP8 scale relative
    to the static per-tensor ``input_scale`` (= calibrated amax / 2688):
    ``s = e4m3(min(block_amax / (6 * input_scale), 448)) * input_scale``, blocks
    whose ``s < 1e-5`` use 1, then each value is rounded to the E2M1 grid times
    ``s``. Mirrors ``fp4_fake_quant_block`` so the simulation runs on a CPU.
    """
    shape, dtype = x.shape, x.dtype
    global_scale_safe = input_scale.float().to(x.device)
    global_scale_safe = torch.where(global_scale_safe > 0, global_scale_safe, torch.full_like(global_scale_safe, 1e-12))
    blocks = x.float().unflatten(-1, (-1, block_size))
    block_amax = blocks.abs().amax(dim=-1, keepdim=True)
    scale = (block_amax / (FP4_MAX * global_scale_safe)).clamp(max=FP8_E4M3_MAX)
    scale = scale.to(torch.float8_e4m3fn).float() * global_scale_safe
    scale = torch.where(scale >= 1e-5, scale, torch.ones_like(scale))
    magnitude = _round_to_e2m1_grid(blocks.abs() / scale) * scale
    return torch.where(blocks >= 0, magnitude, -magnitude).flatten(-2).reshape(shape).to(dtype)
