"""Fused MoE expert parameters (transformers 5) from per-expert checkpoint tensors.

transformers 5 stores the experts of Qwen-MoE, Mixtral and many others as 3-D
parameters: ``experts.gate_up_proj`` [E, 2I, H] (gate rows, then up rows) and
``experts.down_proj`` [E, H, I]. ModelOpt exports them split per expert,
``experts.{e}.gate_proj|up_proj|down_proj`` (``w1|w3|w2`` in older layouts),
each with its own ``weight_scale_2``. Dequantizing every expert with its own
global scale is what the seed's compressed-tensors loading got wrong.
"""

from __future__ import annotations

import torch

from checkpoint_formats.layout import FUSED_EXPERT_PARTS
from checkpoint_formats.quantized_tensors import find_quantized, read_dequantized
from checkpoint_formats.reader import CheckpointReader
from foundation.errors import UserError


def is_fused_expert_param(name: str, tensor: torch.Tensor) -> bool:
    return tensor.dim() == 3 and name.rpartition(".")[2] in FUSED_EXPERT_PARTS


def _expert_part(reader: CheckpointReader, prefix: str, expert: int, alternatives: tuple[str, ...]) -> str | None:
    for part in alternatives:
        module = f"{prefix}.{expert}.{part}"
        if f"{module}.weight" in reader or f"{module}.weight_packed" in reader:
            return module
    return None


def _read_part(reader: CheckpointReader, module: str, dtype: torch.dtype, consumed: set[str], device) -> torch.Tensor:
    source = find_quantized(reader, module)
    if source is None:
        consumed.add(f"{module}.weight")
        return reader.get(f"{module}.weight").to(device=device, dtype=dtype)
    consumed.update(name for name in source.names() if name in reader)
    return read_dequantized(reader, source, dtype, device=device)


def assemble_check(reader: CheckpointReader, prefix: str, expert: int, param: str, modules: list[str | None]) -> None:
    if any(module is None for module in modules):
        raise UserError(
            f"{reader.format.path}: {prefix}.{expert}",
            f"expert {expert} has no tensors for {param} (looked for {FUSED_EXPERT_PARTS[param]})",
            "the checkpoint is incomplete or num_experts in config.json is wrong",
        )


def assemble(
    reader: CheckpointReader,
    name: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    consumed: set[str],
    device: torch.device | str = "cpu",
) -> torch.Tensor | None:
    """The dequantized 3-D parameter ``name``, or None if the checkpoint has no per-expert tensors for it."""
    prefix, _, param = name.rpartition(".")
    experts = []
    for expert in range(shape[0]):
        modules = [_expert_part(reader, prefix, expert, alternatives) for alternatives in FUSED_EXPERT_PARTS[param]]
        if expert == 0 and all(module is None for module in modules):
            return None
        assemble_check(reader, prefix, expert, param, modules)
        experts.append(torch.cat([_read_part(reader, module, dtype, consumed, device) for module in modules], dim=0))
    value = torch.stack(experts)
    if tuple(value.shape) != tuple(shape):
        raise UserError(
            f"{reader.format.path}: {prefix}.*.{'/'.join(alt[0] for alt in FUSED_EXPERT_PARTS[param])}",
            f"per-expert tensors stack to {tuple(value.shape)}, but {name} has shape {tuple(shape)}",
            "this expert layout (e.g. transposed or interleaved gate/up) is not supported yet; report the model",
        )
    return value


def split_fused(prefix: str, param: str, fused: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Inverse of ``assemble`` for export: a fused 3-D parameter as per-expert 2-D weights,
    named the way ModelOpt exports them (``{prefix}.{e}.gate_proj`` ...), which vLLM expects.
    ``prefix`` is the experts module (``model.layers.3.mlp.experts``)."""
    if param not in FUSED_EXPERT_PARTS or fused.dim() != 3:
        raise ValueError(f"{prefix}.{param}: not a fused expert parameter")
    names = [alternatives[0] for alternatives in FUSED_EXPERT_PARTS[param]]
    rows = fused.shape[1] // len(names)
    return [
        (f"{prefix}.{expert}.{part}", fused[expert, i * rows : (i + 1) * rows])
        for expert in range(fused.shape[0])
        for i, part in enumerate(names)
    ]
