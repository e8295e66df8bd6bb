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
    below, above, weight = _neighbours(directions.shape[0], index)
    return normalize(torch.lerp(directions[below], directions[above], weight))


def _neighbours(count: int, index: float) -> tuple[int, int, float]:
    """The two residual indices around a fractional ``index`` of ``count`` and the weight of the upper one."""
    last = count - 1
    if not 0.0 <= index <= last:
        raise ValueError(f"direction index {index} outside [0, {last}]")
    below = math.floor(index)
    return below, min(below + 1, last), index - below


def layer_direction(directions: torch.Tensor, layer: int) -> torch.Tensor:
    """Per-layer scope: layer ``i`` writes the residual at index ``i + 1``, so it uses that direction."""
    return directions[layer + 1]


def refusal_subspaces(
    harmful: torch.Tensor, harmless: torch.Tensor, rank: int, *, projected: bool = False
) -> torch.Tensor:
    """[layers + 1, rank, hidden] orthonormal bases of a rank-``rank`` refusal subspace per residual index.

    Row 0 is exactly :func:`refusal_directions` (so ``rank=1`` is today's single direction, bit for bit).
    Rows 1.. are the top right singular vectors of the **per-prompt** differences
    ``harmful_i - mean_harmless``, after removing row 0 (and, if ``projected``, the harmless-mean
    direction) from them: the directions along which individual harmful prompts still stand apart from
    the harmless ones once the shared mean difference is gone. Why per-prompt and not per-cluster
    means: the train prompts carry no category label, and clustering adds a choice (k, seeds) the SVD
    does not need; a category whose refusal uses its own direction shows up as a large singular value
    of these residual differences, because all its prompts share that offset. Singular values of zero
    (fewer prompts than ``rank``) leave zero rows, which edit nothing; a layer whose mean difference is
    zeroed (NaN/inf residuals) gets an all-zero basis, as the single direction does.
    """
    if rank < 1:
        raise ValueError(f"subspace rank must be >= 1, got {rank}")
    first = refusal_directions(harmful, harmless, projected=projected)  # [L+1, h]
    bases = torch.zeros(first.shape[0], rank, first.shape[1], dtype=torch.float32)
    bases[:, 0] = first
    if rank == 1:
        return bases
    harmless_mean = harmless.float().mean(dim=0)
    differences = torch.nan_to_num(harmful.float() - harmless_mean, nan=0.0, posinf=0.0, neginf=0.0)  # [n, L+1, h]
    for index in range(first.shape[0]):
        if not bool(first[index].any()):  # a NaN/inf (or degenerate) layer: no direction, so no subspace either
            continue
        removed = [first[index]]
        if projected:
            removed.append(normalize(torch.nan_to_num(harmless_mean[index], nan=0.0)))
        rows = differences[:, index]
        for vector in removed:
            rows = rows - (rows @ vector).unsqueeze(-1) * vector
        _, singular, vh = torch.linalg.svd(rows, full_matrices=False)
        scale = singular[0] if singular.numel() else torch.tensor(0.0)
        kept = [vh[j] for j in range(min(rank - 1, vh.shape[0])) if singular[j] > 1e-6 * max(float(scale), EPSILON)]
        for j, vector in enumerate(kept, start=1):
            bases[index, j] = normalize(vector)
    return bases


def interpolated_subspace(bases: torch.Tensor, index: float) -> torch.Tensor:
    """[rank, hidden] orthonormal basis at a fractional residual index.

    Row 0 is :func:`interpolated_direction` of the rows 0 (the single-direction edit at rank 1); the
    other rows are interpolated after flipping the upper neighbour's sign to agree with the lower one
    (singular vectors have no sign), then re-orthonormalized against the rows before them.
    """
    below, above, weight = _neighbours(bases.shape[0], index)
    lower, upper = bases[below], bases[above].clone()
    signs = torch.where((lower * upper).sum(dim=-1, keepdim=True) < 0, -1.0, 1.0)
    signs[0] = 1.0  # row 0 is a mean difference: its sign is meaningful
    mixed = torch.lerp(lower, upper * signs, weight)
    basis = torch.zeros_like(mixed)
    basis[0] = normalize(mixed[0])
    for j in range(1, mixed.shape[0]):
        vector = mixed[j] - basis[:j].T @ (basis[:j] @ mixed[j])
        basis[j] = normalize(vector) if vector.norm() > 1e-4 * max(float(mixed[j].norm()), EPSILON) else 0.0
    return basis
