"""Merge the chosen edit into full-precision weights one shard at a time, never building the model.

For each shard of the source: read its tensors, replace the ones the plan
touches by their edited value (every expert of fused expert tensors
included), hand the shard to a writer, drop it. Peak memory is one shard plus
the fp32 work tensors of one module, independent of the model's size.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from safetensors.torch import save_file

from abliterate.artifacts import ChosenTrial
from abliterate.export.apply_edit import edit_tensor
from abliterate.export.plan import MergePlan, plan_merge
from abliterate.export.source import FullPrecisionSource
from checkpoint_formats.detect import INDEX_FILE, SINGLE_FILE


def shard_progress(transient: bool = False) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[unit]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=transient,
    )


@contextmanager
def tensor_task(progress: Progress | None, shard_name: str, total: int) -> Iterator[Callable[[], None]]:
    """A bar for the tensors of one shard, removed when the shard is done; a no-op without progress."""
    if progress is None:
        yield lambda: None
        return
    task = progress.add_task(f"  {shard_name}", total=total, unit="tensors")
    try:
        yield lambda: progress.advance(task)
    finally:
        progress.remove_task(task)


class StreamingMerger:
    """The merged full-precision checkpoint, produced shard by shard."""

    def __init__(self, source: FullPrecisionSource, trial: ChosenTrial, plan: MergePlan) -> None:
        self.source = source
        self.trial = trial
        self.plan = plan
        self.edited_names: list[str] = []

    @classmethod
    def from_directory(
        cls,
        source_dir: str | Path,
        trial: ChosenTrial,
        *,
        dtype: torch.dtype = torch.bfloat16,
    ):
        """``dtype`` is what quantized weights are dequantized to: bf16 for a bf16
        export, float32 when they are re-quantized (no rounding in between).
        """
        source = FullPrecisionSource(source_dir, dtype=dtype)
        return cls(source, trial, plan_merge(trial, source.names, str(source_dir), source.format.config))

    def merged(self, name: str) -> torch.Tensor:
        """One tensor of the merged model: edited if the plan touches it, else the source's value."""
        tensor = self.source.get(name)
        tensor_edit = self.plan.edits.get(name)
        if tensor_edit is None:
            return tensor
        self.edited_names.append(name)
        return edit_tensor(tensor, tensor_edit, self.trial)

    def shards(self, progress: Progress | None = None) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        shards = self.source.shards
        task = progress.add_task("merge", total=len(shards), unit="shards") if progress else None
        for shard in shards:
            names = self.source.names_in(shard)
            with self.source.shard(shard), tensor_task(progress, shard.name, len(names)) as advance:
                tensors = {}
                for name in names:
                    tensors[name] = self.merged(name)
                    advance()
            yield shard.name, tensors
            del tensors
            if progress is not None:
                progress.advance(task)


def write_shards(shards: Iterator[tuple[str, dict[str, torch.Tensor]]], out_dir: Path) -> dict[str, str]:
    """Write each shard under its source's file name, then the index; returns the weight map.

    Unlike ``checkpoint_formats.writer.StreamingCheckpointWriter`` (which cuts
    shards by size), the output mirrors the source one shard for one shard:
    the memory bound is exactly one source shard, and an NVFP4 re-export keeps
    the stage-1 index, so unchanged tensors are unchanged down to their file.
    """
    weight_map: dict[str, str] = {}
    total_size = 0
    names: list[str] = []
    for shard_name, tensors in shards:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / shard_name), metadata={"format": "pt"})
        for name, tensor in tensors.items():
            weight_map[name] = shard_name
            total_size += tensor.numel() * tensor.element_size()
        names.append(shard_name)
        del tensors  # before the generator builds the next shard: one shard in memory, not two
    if names != [SINGLE_FILE]:
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return weight_map
