"""FP8 E4M3 with one float32 scale per tensor (ModelOpt ``FP8``; compressed-tensors ``float-quantized``).

The expressions mirror ModelOpt's export (``(weight / scale).to(e4m3)`` with
``scale = amax / 448``) and its eager fake-quant, so results match it bit for bit
on the same device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from checkpoint_formats.nvfp4 import FP8_E4M3_MAX, check_finite


@dataclass
class FP8Weight:
    weight: torch.Tensor  # float8_e4m3fn [out, in] (or [E, out, in])
    weight_scale: torch.Tensor  # float32 [] per tensor; [out, 1] per channel (compressed-tensors)

    def to(self, device: torch.device | str) -> FP8Weight:
        return FP8Weight(self.weight.to(device), self.weight_scale.to(device))


def quantize_weight(
    weight: torch.Tensor, *, name: str = "weight", weight_scale: torch.Tensor | None = None
) -> FP8Weight:
    check_finite(weight, name)
    if weight_scale is None:
        amax = weight.detach().abs().amax().float()
        weight_scale = torch.where(amax > 0, amax, torch.ones_like(amax)) / FP8_E4M3_MAX
    weight_scale = weight_scale.to(device=weight.device, dtype=torch.float32)
    return FP8Weight((weight.detach() / weight_scale).to(torch.float8_e4m3fn), weight_scale)


def dequantize_weight(quantized: FP8Weight, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """FP8 arithmetic is not defined on most devices: convert to float32 first, then scale."""
    scale = quantized.weight_scale.to(device=quantized.weight.device, dtype=torch.float32)
    return (quantized.weight.float() * scale).to(dtype)


def fake_quantize_activation(x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """Static per-tensor FP8 activation rounding as ModelOpt's eager kernel does it
    (``amax = input_scale * 448``; scale ``448 / amax`` then its reciprocal)."""
    amax = (input_scale.float() * FP8_E4M3_MAX).to(x.device)
    safe_amax = torch.where(amax <= 1.0 / (1 << 24), torch.ones_like(amax), amax)
    scale = FP8_E4M3_MAX / safe_amax
    rounded = (x.float() * scale).clamp(min=-FP8_E4M3_MAX, max=FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return (rounded.float() * (1 / scale)).to(x.dtype)
