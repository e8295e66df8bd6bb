"""Refusal directions: difference of class means of the residual stream, per layer.

``r_l = normalize(mean_harmful_l - mean_harmless_l)``. Optionally projected:
the component along the harmless mean is removed first, so that the edit does
not also shrink what every answer shares (the reference's "projected"
variant). The search then uses either one global direction, interpolated
between neighbouring layers at a fractional index, or each layer's own.
"""

from __future__ import annotations

import math

import torch

EPSILON = 1e-8


def normalize(vectors: torch.Tensor) -> torch.Tensor:
    """Unit vectors along the last axis; a zero (or NaN) vector stays zero."""
    vectors = torch.nan_to_num(vectors, nan=0.0, posinf=0.0, neginf=0.0)
    norms = vectors.norm(dim=-1, keepdim=True)
    return torch.where(norms > EPSILON, vectors / norms.clamp_min(EPSILON), torch.zeros_like(vectors))


def refusal_directions(harmful: torch.Tensor, harmless: torch.Tensor, *, projected: bool = False) -> torch.Tensor:
    """[layers + 1, hidden] unit directions from [prompts, layers + 1, hidden] residuals (fp32)."""
    harmful_mean = harmful.float().mean(dim=0)
    harmless_mean = harmless.float().mean(dim=0)
    difference = harmful_mean - harmless_mean
    if projected:
        harmless_unit = normalize(harmless_mean)
        difference = difference - (difference * harmless_unit).sum(dim=-1, keepdim=True) * harmless_unit
    return normalize(difference)


def interpolated_direction(directions: torch.Tensor, index: float) -> torch.Tensor:
    """The unit direction at a fractional residual index, linear between its two neighbours."""
    last = directions.shape[0] - 1
    if not 0.0 <= index <= last:
        raise ValueError(f"direction index {index} outside [0, {last}]")
    below = math.floor(index)
    above = min(below + 1, last)
    weight = index - below
    return normalize(torch.lerp(directions[below], directions[above], weight))


def layer_direction(directions: torch.Tensor, layer: int) -> torch.Tensor:
    """Per-layer scope: layer ``i`` writes the residual at index ``i + 1``, so it uses that direction."""
    return directions[layer + 1]
