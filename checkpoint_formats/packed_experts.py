"""Keep fused MoE expert weights packed in NVFP4 and dequantize them one layer at a time.

Experts are most of a MoE model's bytes, so ``dequantize=False`` should keep
them at 4 bits too. transformers 5's experts modules read their 3-D
parameters (``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]) inside
``forward``, in ways that differ between implementations, so instead of
replacing the module we replace each parameter by packed buffers
(``{param}_packed``, ``{param}_weight_scale``, ``{param}_weight_scale_2`` with
one global scale per expert and per fused part) and materialize the bf16
parameter in a forward pre-hook, dropping it after the forward: one layer's
experts in bf16 at a time. Activation rounding is not simulated inside
experts (their intermediate activation never leaves ``forward``).
"""

from __future__ import annotations

import torch
from torch import nn

from checkpoint_formats import nvfp4
from checkpoint_formats.experts import _expert_part, assemble_check
from checkpoint_formats.layout import FUSED_EXPERT_PARTS
from checkpoint_formats.quantized_tensors import find_quantized, read_nvfp4
from checkpoint_formats.reader import CheckpointReader

SUFFIXES = ("packed", "weight_scale", "weight_scale_2")


def packable_parts(reader: CheckpointReader, name: str) -> list[str] | None:
    """Expert-0 module names of fused parameter ``name`` if every part is stored as NVFP4."""
    prefix, _, param = name.rpartition(".")
    parts = [_expert_part(reader, prefix, 0, alternatives) for alternatives in FUSED_EXPERT_PARTS[param]]
    if any(part is None for part in parts):
        return None
    sources = [find_quantized(reader, part) for part in parts]
    if any(
        source is None or source.scheme != "nvfp4" or f"{part}.pre_quant_scale" in reader
        for source, part in zip(sources, parts, strict=True)
    ):
        return None  # mixed, FP8 or AWQ-smoothed experts: dequantized instead
    return parts


def replace_with_meta_buffers(model: nn.Module, reader: CheckpointReader, name: str, parts: list[str]) -> None:
    """Swap the meta 3-D parameter for meta packed buffers of the right sizes (placement needs them)."""
    module_name, _, param = name.rpartition(".")
    module = model.get_submodule(module_name)
    experts, rows, columns = module._parameters[param].shape
    _, scale_shape = reader.metadata(find_quantized(reader, parts[0]).names()[1])
    blocks = scale_shape[-1]
    del module._parameters[param]
    module.register_buffer(
        f"{param}_packed", torch.empty(experts, rows, columns // 2, dtype=torch.uint8, device="meta")
    )
    module.register_buffer(
        f"{param}_weight_scale", torch.empty(experts, rows, blocks, dtype=torch.float8_e4m3fn, device="meta")
    )
    module.register_buffer(
        f"{param}_weight_scale_2", torch.empty(experts, len(parts), dtype=torch.float32, device="meta")
    )
    setattr(module, param, None)
    if not getattr(module, "_packed_expert_params", None):
        module._packed_expert_params = []
        module.register_forward_pre_hook(_materialize)
        module.register_forward_hook(_release)
    module._packed_expert_params.append(param)


def read_packed(reader: CheckpointReader, name: str, consumed: set[str]) -> dict[str, torch.Tensor]:
    """The packed buffers of fused parameter ``name``: per-expert parts concatenated along rows."""
    prefix, _, param = name.rpartition(".")
    packed, scales, scales_2 = [], [], []
    expert = 0
    while True:
        parts = [_expert_part(reader, prefix, expert, alternatives) for alternatives in FUSED_EXPERT_PARTS[param]]
        if all(part is None for part in parts):
            break
        assemble_check(reader, prefix, expert, param, parts)
        quantized = [read_nvfp4(reader, find_quantized(reader, part)) for part in parts]
        for part in parts:
            consumed.update(n for n in find_quantized(reader, part).names() if n in reader)
        packed.append(torch.cat([q.packed for q in quantized]))
        scales.append(torch.cat([q.weight_scale for q in quantized]))
        scales_2.append(torch.stack([q.weight_scale_2.reshape(()) for q in quantized]))
        expert += 1
    return {"packed": torch.stack(packed), "weight_scale": torch.stack(scales), "weight_scale_2": torch.stack(scales_2)}


def logical_shape(module: nn.Module, param: str) -> tuple[int, int, int]:
    """The [experts, rows, columns] shape the packed parameter has when materialized."""
    experts, rows, packed_columns = getattr(module, f"{param}_packed").shape
    return experts, rows, packed_columns * 2


def dequantize_packed(module: nn.Module, param: str, dtype: torch.dtype) -> torch.Tensor:
    packed, scale = getattr(module, f"{param}_packed"), getattr(module, f"{param}_weight_scale")
    scale_2 = getattr(module, f"{param}_weight_scale_2")
    rows = packed.shape[1] // scale_2.shape[1]
    pieces = [
        nvfp4.dequantize_weight(
            nvfp4.NVFP4Weight(packed[:, i * rows : (i + 1) * rows], scale[:, i * rows : (i + 1) * rows], scale_2[:, i]),
            dtype,
        )
        for i in range(scale_2.shape[1])
    ]
    return torch.cat(pieces, dim=1)


def _materialize(module: nn.Module, args) -> None:
    dtype = getattr(module, "_packed_dtype", torch.bfloat16)
    for param in module._packed_expert_params:
        setattr(module, param, dequantize_packed(module, param, dtype))


def _release(module: nn.Module, args, output) -> None:
    for param in module._packed_expert_params:
        setattr(module, param, None)
