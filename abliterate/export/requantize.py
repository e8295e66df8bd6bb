"""NVFP4 re-export: the stage-1 checkpoint with only the edited weights re-quantized.

The output mirrors the stage-1 checkpoint shard for shard and name for name:
- every tensor the edit does not touch is copied bit for bit (embeddings,
  norms, untouched Linears, activation ``input_scale``s, KV-cache scales);
- an edited Linear is re-quantized with our ModelOpt-exact codec from its
  merged full-precision value (edited bf16 base weight, or the edited
  dequantized weight), giving ``weight`` / ``weight_scale`` / ``weight_scale_2``
  exactly as a fresh ModelOpt quantization of that weight would; its
  calibrated ``input_scale`` is kept (the edit changes what a layer writes, not
  what it reads);
- projections that share one ``weight_scale_2`` in ModelOpt's export (q/k/v,
  gate/up: ``preprocess_linear_fusion`` takes the group's maximum) stay
  consistent: if one member is edited the shared scale is recomputed as the
  maximum over the group, and any member whose stored scale then differs is
  re-quantized too.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from rich.progress import Progress

from abliterate.export.source import FullPrecisionSource
from abliterate.export.streaming_merge import StreamingMerger, tensor_task
from checkpoint_formats.layout import NVFP4_WEIGHT_PARTS, scale_sharing_group
from checkpoint_formats.nvfp4 import NVFP4Weight, global_scale, quantize_weight
from foundation.errors import UserError


def fused_siblings(weight_name: str, stage1: FullPrecisionSource) -> list[str]:
    """Weight names of the quantized projections sharing ``weight_name``'s scale (itself included)."""
    module, _ = weight_name.rsplit(".", 1)
    parent, _, leaf = module.rpartition(".")
    group = scale_sharing_group(leaf)
    if group is not None:
        names = [f"{parent}.{sibling}.weight" if parent else f"{sibling}.weight" for sibling in group]
        return [name for name in names if _is_modelopt_nvfp4(stage1, name)]
    return [weight_name]


@dataclass
class RequantizePlan:
    """Which quantized weights get new codes, and with which shared ``weight_scale_2``."""

    # weight name -> shared weight_scale_2 to use, or None: its own (amax / 2688), computed when it is quantized
    requantized: dict[str, torch.Tensor | None] = field(default_factory=dict)
    edited_full_precision: set[str] = field(default_factory=set)  # edited tensors stage 1 kept unquantized


def plan_requantization(merger: StreamingMerger, stage1: FullPrecisionSource) -> RequantizePlan:
    """Decide the shared scales up front.

    Only a fused group with an edited member needs a pass before the merge (its
    members' merged values, one at a time); a lone projection (o_proj,
    down_proj: every edit abliteration makes) takes its own scale when written.
    """
    plan = RequantizePlan()
    for name in merger.plan.edits:
        if name not in stage1.reader:
            raise UserError(str(stage1.directory), f"edited tensor {name} is not in the stage-1 checkpoint",
                            "pass the stage-1 checkpoint made from this --base_model")
        if merger.source.logical_shape(name) != stage1.logical_shape(name):
            raise UserError(str(merger.source.directory), f"{name} has shape {merger.source.logical_shape(name)}, "
                            f"the stage-1 checkpoint's has {stage1.logical_shape(name)}",
                            "pass the --base_model the stage-1 checkpoint was made from")
        if not _is_modelopt_nvfp4(stage1, name):
            plan.edited_full_precision.add(name)
            continue
        if name in plan.requantized:
            continue
        group = fused_siblings(name, stage1)
        if len(group) == 1:
            plan.requantized[name] = None
            continue
        # Each member's own scale from its merged value, as ModelOpt computes it before taking the group max.
        scales = {member: _own_scale(merger.merged(member)) for member in group}
        shared = torch.stack(list(scales.values())).amax(dim=0)
        for member in group:
            stored = stage1.raw(f"{member}_scale_2").float()
            if member in merger.plan.edits or not torch.equal(stored, shared):
                plan.requantized[member] = shared
    merger.edited_names.clear()  # the scale pass is not the merge; count edits once
    return plan


def _is_modelopt_nvfp4(stage1: FullPrecisionSource, weight_name: str) -> bool:
    source = stage1.quantized.get(weight_name.removesuffix(".weight")) if weight_name.endswith(".weight") else None
    return source is not None and source.scheme == "nvfp4" and source.dialect == "modelopt"


def _own_scale(weight: torch.Tensor) -> torch.Tensor:
    return global_scale(weight, per_expert=weight.dim() == 3)


def requantized_shards(
    merger: StreamingMerger,
    stage1: FullPrecisionSource,
    plan: RequantizePlan,
    progress: Progress | None = None,
) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """The stage-1 shards with the planned weights re-quantized and everything else copied as stored."""
    pending: dict[str, NVFP4Weight] = {}  # module weight name -> new quantization, until all parts are written
    emitted: dict[str, int] = {}
    shards = stage1.shards
    task = progress.add_task("re-export nvfp4", total=len(shards), unit="shards") if progress else None
    for shard in shards:
        tensors: dict[str, torch.Tensor] = {}
        names = stage1.stored_names(shard)
        with stage1.shard(shard), tensor_task(progress, shard.name, len(names)) as advance:
            for name in names:
                advance()
                weight_name, part = _quantized_part(name)
                if weight_name in plan.requantized:
                    if weight_name not in pending:
                        full = merger.merged(weight_name)
                        pending[weight_name] = quantize_weight(full, weight_scale_2=plan.requantized[weight_name],
                                                               name=weight_name)
                    quantized = pending[weight_name]
                    tensors[name] = {"weight": quantized.packed, "weight_scale": quantized.weight_scale,
                                     "weight_scale_2": quantized.weight_scale_2.clone()}[part]  # shared in a group
                    emitted[weight_name] = emitted.get(weight_name, 0) + 1
                    if emitted[weight_name] == len(NVFP4_WEIGHT_PARTS):
                        del pending[weight_name]
                elif name in plan.edited_full_precision:
                    tensors[name] = merger.merged(name).to(stage1.reader.metadata(name)[0])
                else:
                    tensors[name] = stage1.raw(name)
        merger.source.reader.close()  # release the base model's shards read for this one
        yield shard.name, tensors
        del tensors
        if progress is not None:
            progress.advance(task)


def _quantized_part(name: str) -> tuple[str, str]:
    """``x.weight_scale_2`` -> (``x.weight``, ``weight_scale_2``); other names map to themselves."""
    for part in NVFP4_WEIGHT_PARTS:
        if name.endswith("." + part):
            return name[: -len(part)] + "weight", part
    return name, ""
