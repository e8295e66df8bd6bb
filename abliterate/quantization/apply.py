"""Turning a QuantizationRequest into what the loader does.

torchao and bitsandbytes quantize inside ``from_pretrained`` (one
``quantization_config`` argument), tensor by tensor as the checkpoint is read.
Our NVFP4 codec is not a transformers quantizer, so ``nvfp4`` loads on the
CPU, packs every Linear with ``checkpoint_formats.nvfp4`` (the stage-1 format,
weight-only, no calibration) into the formats package's ``NVFP4Linear``, and
only then places the packed model on the requested devices: the GPUs hold
~3.5x less than bf16, the CPU holds the bf16 model once, briefly.
"""

from __future__ import annotations

import torch
from torch import nn

from abliterate.quantization.options import (
    BNB_4BIT,
    NONE,
    NVFP4,
    QuantizationRequest,
    torchao_quant_type,
)
from checkpoint_formats import nvfp4
from checkpoint_formats.modules import NVFP4Linear
from checkpoint_formats.placement import dispatch, resolve
from foundation.load_report import require_complete_load

# Output embeddings stay in the compute dtype, as in the stage-1 NVFP4 format.
NEVER_QUANTIZED = ("lm_head",)


def compute_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """The dtype quantized layers compute in: the loaded dtype, with 'auto' meaning bf16."""
    return torch.bfloat16 if dtype == "auto" else dtype


def _module_pattern(pattern: str) -> str:
    """A full-match regex for transformers' skip lists, which test module names and parameter names with re.match."""
    return f"(?:{pattern})(?:\\.[^.]+)?$"


def quantization_config(request: QuantizationRequest, dtype: torch.dtype | str, device_type: str):
    """The ``quantization_config`` for ``from_pretrained``; None for 'none' and for 'nvfp4' (applied after loading)."""
    if request.option in (NONE, NVFP4):
        return None
    if request.option == BNB_4BIT:
        from transformers import BitsAndBytesConfig

        skipped = [pattern for pattern, target in request.overrides if target == NONE]
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype(dtype),
            llm_int8_skip_modules=[*NEVER_QUANTIZED, *(_module_pattern(p) for p in skipped)],
        )
    from transformers import TorchAoConfig

    return TorchAoConfig(
        torchao_quant_type(request, device_type),
        include_input_output_embeddings=request.include_embedding,
        untie_embedding_weights=request.include_embedding,
    )


def nvfp4_linear(linear: nn.Linear, dtype: torch.dtype) -> NVFP4Linear:
    """The formats package's packed Linear holding ``linear``'s weight in NVFP4 (weight-only: no input_scale)."""
    packed = nvfp4.quantize_weight(linear.weight.detach())
    module = NVFP4Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, dtype=dtype)
    module.weight, module.weight_scale, module.weight_scale_2 = packed.packed, packed.weight_scale, packed.weight_scale_2
    if linear.bias is not None:
        module.bias = nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)
    return module


def nvfp4_targets(model: nn.Module, request: QuantizationRequest) -> list[str]:
    """Linears to pack: all but the output embeddings, overrides set to 'none', and inputs not a multiple of 16."""
    names = []
    for name, module in model.named_modules():
        leaf = name.rpartition(".")[2]
        if (type(module) is nn.Linear and leaf not in NEVER_QUANTIZED and request.option_for(name) != NONE
                and module.in_features % nvfp4.DEFAULT_BLOCK_SIZE == 0):
            names.append(name)
    return names


@torch.no_grad()
def quantize_to_nvfp4(model: nn.Module, request: QuantizationRequest, dtype: torch.dtype) -> int:
    """Replace the target Linears in place, one at a time (peak: one extra bf16 weight); returns how many."""
    targets = nvfp4_targets(model, request)
    for name in targets:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, nvfp4_linear(getattr(parent, leaf), dtype))
    return len(targets)


def load_nvfp4(path: str, request: QuantizationRequest, dtype: torch.dtype | str, device_map, max_memory,
               trust_remote_code: bool) -> nn.Module:
    """Load on the CPU, pack, then place the packed model where ``device_map`` says."""
    from transformers import AutoModelForCausalLM

    dtype = compute_dtype(dtype)
    model, loading_info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="cpu",
                                                               trust_remote_code=trust_remote_code, output_loading_info=True, use_safetensors=True)
    require_complete_load(loading_info, str(path), "--model")
    quantize_to_nvfp4(model, request, dtype)
    plan = resolve(model, device_map, max_memory)
    if len(plan.devices) == 1:
        model.to(next(iter(plan.devices)))
    else:
        dispatch(model, plan)
    return model
