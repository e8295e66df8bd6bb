"""compressed-tensors NVFP4 (``nvfp4-pack-quantized``) and FP8 (``float-quantized``) tensors.

Same codes and block scales as ModelOpt, different names, and the per-tensor
scales stored as reciprocals: ``weight_global_scale = 1 / weight_scale_2``,
``input_global_scale = 1 / input_scale``. Codes and block scales convert bit
for bit. The per-tensor scales cannot always: for about 14% of float32 values
``x`` no float32 ``y`` has ``fl(1/y) == x`` (measured on 10^6 random values; the
reciprocal map is not onto), so a round trip may move such a scale by one ulp
(a relative 6e-8 change of the whole tensor, invisible after bf16 rounding).
"""

from __future__ import annotations

import torch

from checkpoint_formats.nvfp4 import NVFP4Weight

NVFP4_FORMAT = "nvfp4-pack-quantized"
FP8_FORMAT = "float-quantized"

# modelopt tensor suffix -> compressed-tensors suffix, and whether the value is inverted
MODELOPT_TO_CT = {
    "weight": ("weight_packed", False),
    "weight_scale": ("weight_scale", False),
    "weight_scale_2": ("weight_global_scale", True),
    "input_scale": ("input_global_scale", True),
}
CT_TO_MODELOPT = {ct: (mo, inverted) for mo, (ct, inverted) in MODELOPT_TO_CT.items()}


def reciprocal(x: torch.Tensor) -> torch.Tensor:
    """float32 ``1/x``, as compressed-tensors' own converter computes it."""
    return 1.0 / x.float()


def nvfp4_from_ct(
    weight_packed: torch.Tensor, weight_scale: torch.Tensor, weight_global_scale: torch.Tensor
) -> NVFP4Weight:
    """CT tensors to our codec's form; CT stores global scales as shape [1], ModelOpt as []."""
    scale_2 = reciprocal(weight_global_scale)
    if scale_2.numel() == 1 and weight_packed.dim() == 2:
        scale_2 = scale_2.reshape(())
    return NVFP4Weight(weight_packed, weight_scale, scale_2)


def nvfp4_to_ct(quantized: NVFP4Weight) -> dict[str, torch.Tensor]:
    """Suffix -> tensor for one module in CT form (global scale as shape [1], as CT writes it)."""
    global_scale = reciprocal(quantized.weight_scale_2)
    if global_scale.dim() == 0:
        global_scale = global_scale.reshape(1)
    return {
        "weight_packed": quantized.packed,
        "weight_scale": quantized.weight_scale,
        "weight_global_scale": global_scale,
    }
