"""Zeroed fp32 sums and arrival counters that let a split-K matmul finish in its own launch.

Why: with K split, every split adds its partial product into fp32. Done naively that needs a zero-filled
fp32 output before the matmul and a cast to the output dtype after it: two extra kernels per matmul, about
320 of the ~1,100 kernels of an 8B model's decode step (bench/stage2_trial_profile_kernels_step_kernels.txt).
Instead the kernels add into a workspace that is zero between launches; the split that arrives last at an
output tile (an arrival counter per tile) writes the sum in the output dtype and zeroes its workspace tile and
counter again, so the next launch finds them clean.

One workspace per (device, stream): launches on one stream never overlap, so they can share it. A workspace is
never freed once handed out, because a captured CUDA graph keeps its address; growing one allocates a larger
pair and keeps the old one alive. A launch that needs more than is there while a graph is being captured gets
None (allocating inside a capture would tie the memory to that graph), and so does one over ``MAX_VALUES``:
the caller then takes the zero-fill-and-cast path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_VALUES = 16 << 20  # fp32 sums: 64 MiB, e.g. 128 tokens x 131072 outputs
MIN_VALUES = 1 << 20  # the first allocation per stream (4 MiB): an 8B model's decode step fits
MIN_TILES = 4096


@dataclass(frozen=True)
class SplitWorkspace:
    sums: torch.Tensor  # float32 [values], zero between launches
    arrivals: torch.Tensor  # int32 [tiles], zero between launches


_current: dict[tuple[torch.device, int], SplitWorkspace] = {}
_retired: list[SplitWorkspace] = []  # outgrown workspaces a captured graph may still address


def workspace_for(device: torch.device, values: int, tiles: int) -> SplitWorkspace | None:
    """A clean workspace holding ``values`` fp32 sums and ``tiles`` counters on the current stream, or None."""
    if values > MAX_VALUES:
        return None
    key = (device, _stream_id(device))
    workspace = _current.get(key)
    if workspace is not None and workspace.sums.numel() >= values and workspace.arrivals.numel() >= tiles:
        return workspace
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    size = workspace.sums.numel() if workspace is not None else MIN_VALUES
    counters = workspace.arrivals.numel() if workspace is not None else MIN_TILES
    while size < values:
        size *= 2
    while counters < tiles:
        counters *= 2
    if workspace is not None:
        _retired.append(workspace)
    workspace = SplitWorkspace(
        torch.zeros(min(size, MAX_VALUES), device=device, dtype=torch.float32),
        torch.zeros(counters, device=device, dtype=torch.int32),
    )
    _current[key] = workspace
    return workspace


def _stream_id(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
