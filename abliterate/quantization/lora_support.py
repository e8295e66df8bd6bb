"""What the LoRA edits need from a quantized Linear: its weight in full precision, and an adapter that fits.

PEFT wraps torchao Linears (``TorchaoLoraLinear``) and bitsandbytes Linears
(``lora.bnb.Linear4bit``) itself; the base forward stays quantized and the
adapter adds the edit on the side. Our ``NVFP4Linear`` is not an ``nn.Linear``,
so it is registered with PEFT's custom-module hook and wrapped by ``PackedLoraLinear``,
PEFT's plain ``lora.Linear`` with its side path in one fused multiply-add. The edit's factors
are computed from the dequantized weight, i.e. from what the quantized model
actually computes with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.utils.integrations import dequantize_module_weight
from torch import nn

from checkpoint_formats.modules import NVFP4Linear


class PackedLoraLinear(LoraLinear):
    """PEFT's LoRA Linear around an NVFP4Linear, whose side path ``B (A x) * scaling`` is added by one ``addmm``.

    Why: PEFT's forward adds it in four kernels (A, B, the scaling's multiply, the add); at a decode step of
    batch 100 each is a few microseconds, over the 64 edited modules of an 8B model and ~100 steps a trial.
    ``addmm`` does B, the scaling and the add in one cuBLAS call. Anything else (several active adapters,
    dropout, a LoRA variant, merged or disabled adapters, mixed-adapter batches) takes PEFT's own forward.
    """

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self._plain_adapter(args, kwargs)
        if name is None:
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x)
        lora_a, lora_b = self.lora_A[name].weight, self.lora_B[name].weight
        down = F.linear(self._cast_input_dtype(x, lora_a.dtype), lora_a).to(result.dtype)
        flat = torch.addmm(result.reshape(-1, result.shape[-1]), down.reshape(-1, down.shape[-1]),
                           lora_b.to(result.dtype).T, alpha=self.scaling[name])
        return flat.view(result.shape)

    def _plain_adapter(self, args, kwargs) -> str | None:
        """The one active plain LoRA adapter (no dropout, no variant), or None where PEFT's forward is needed."""
        if args or kwargs or self.disable_adapters or self.merged:
            return None
        active = [name for name in self.active_adapters if name in self.lora_A]
        if len(active) != 1 or active[0] in self.lora_variant:
            return None
        return active[0] if isinstance(self.lora_dropout[active[0]], torch.nn.Identity) else None


def register_quantized_lora_layers(config: LoraConfig) -> LoraConfig:
    """Let ``config`` wrap NVFP4Linear (PEFT's experimental custom-module API) in ``PackedLoraLinear``."""
    config._register_custom_module({NVFP4Linear: PackedLoraLinear})
    return config


def is_quantized_linear(module: nn.Module) -> bool:
    """True for NVFP4Linear, torchao tensor-subclass weights and bitsandbytes packed weights."""
    if isinstance(module, NVFP4Linear):
        return True
    weight = getattr(module, "weight", None)
    return weight is not None and (type(weight).__module__.startswith(("torchao.", "bitsandbytes.")))


def _bnb_repacked_for_cpu(module: nn.Module) -> bool:
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


@torch.no_grad()
def _weight_through_forward(module: nn.Module) -> torch.Tensor:
    """W from the layer's own forward of the identity: W^T = layer(I) - bias."""
    dtype = getattr(module, "compute_dtype", None) or torch.bfloat16
    eye = torch.eye(module.in_features, dtype=dtype, device=module.weight.device)
    output = module(eye)
    if getattr(module, "bias", None) is not None:
        output = output - module.bias.to(output.dtype)
    return output.T.contiguous()


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The weight a quantized (or plain) Linear computes with, as a plain tensor [out, in]."""
    if isinstance(module, NVFP4Linear):
        return module.dequantized_weight(torch.float32)
    if _bnb_repacked_for_cpu(module):
        # bitsandbytes 0.50 repacks a 4-bit weight for its CPU kernel on the first forward
        # (AVX512-BF16 machines); dequantize_4bit (and PEFT's helper) then read the wrong
        # layout and return garbage (measured). The layer's own forward reads it right.
        return _weight_through_forward(module)
    if is_quantized_linear(module):
        try:
            return dequantize_module_weight(module)
        except NotImplementedError:
            # torchao's CUDA int4 layout (Int4TilePackedTo4dTensor) implements no
            # dequantize (measured on an H200); its matmul is the ground truth.
            return _weight_through_forward(module)
    return module.weight
