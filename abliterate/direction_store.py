"""The study's refusal directions: computed once from the train prompts' residuals, then kept beside its journal.

Why its own module: a resumed run (or another host of a shared search) must edit with exactly the directions
the first run computed, so they are written once, atomically, and read back from then on.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors.torch import load_file, save_file

from abliterate.architectures import Architecture
from abliterate.directions import refusal_directions, refusal_subspaces
from abliterate.prompts import PromptSets
from abliterate.residuals import prompt_residuals
from abliterate.search.journal import no_space_left
from abliterate.settings import AbliterateSettings
from foundation.atomic_output import make_readable


def load_or_compute_directions(path: Path, model, architecture: Architecture, tokenizer, prompts: PromptSets,
                               settings: AbliterateSettings, batch_size: int, console: Console) -> torch.Tensor:
    """Directions are computed once per study and kept next to its journal, so a resumed run edits identically."""
    if path.is_file():
        console.print(f"directions: reusing {path}")
        return load_file(str(path))["refusal_directions"]
    directions = compute_directions(model, architecture, tokenizer, prompts, settings, batch_size, console)
    with no_space_left(path):
        save_directions_atomically(directions, path)
    return directions


def compute_directions(model, architecture: Architecture, tokenizer, prompts: PromptSets, settings: AbliterateSettings,
                       batch_size: int, console: Console) -> torch.Tensor:
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as progress:
        harmful = prompt_residuals(model, architecture.layers, tokenizer, prompts.harmful_train, batch_size=batch_size,
                                   system_prompt=settings.system_prompt, progress=progress, description="harmful residuals")
        harmless = prompt_residuals(model, architecture.layers, tokenizer, prompts.harmless_train, batch_size=batch_size,
                                    system_prompt=settings.system_prompt, progress=progress, description="harmless residuals")
    for label, residuals in (("harmful", harmful), ("harmless", harmless)):
        for index, count in residuals.nonfinite_layers().items():
            console.print(f"[yellow]warning:[/] {label} residual index {index} (after layer {index - 1}) is NaN/inf "
                          f"for {count} prompts; its direction is zeroed and edits using it do nothing")
    if settings.directions == "subspace":  # [layers + 1, k, hidden] orthonormal bases
        return refusal_subspaces(harmful.values, harmless.values, settings.direction_rank,
                                 projected=settings.direction_projected)
    return refusal_directions(harmful.values, harmless.values, projected=settings.direction_projected)


def save_directions_atomically(directions: torch.Tensor, path: Path) -> None:
    """Write to a hidden sibling, then rename: the file is reused by every later run of the study, so a run
    killed mid-write must leave either no file (recomputed next time) or a whole one, never a truncated one
    that would make every resume fail to load it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # unique per process (S14)
    try:
        save_file({"refusal_directions": directions.contiguous()}, str(temporary))
        make_readable(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
