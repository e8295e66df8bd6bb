"""A trial's parameters, and which strength and direction each component gets from them.

This is the whole definition of an edit: given the same parameters, the same
directions and the same component list, the search (LoRA) and the merge
(streaming, on full-precision weights) compute the same deltas.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from abliterate.architectures import Component
from abliterate.directions import interpolated_direction, interpolated_subspace, layer_direction
from abliterate.edits.kernel import KernelParameters, layer_strength

GLOBAL = "global"
PER_LAYER = "per_layer"
SCOPES = (GLOBAL, PER_LAYER)


@dataclass(frozen=True)
class AbliterationParameters:
    direction_scope: str  # GLOBAL or PER_LAYER
    direction_index: float | None  # fractional residual index, GLOBAL scope only
    kernels: dict[str, KernelParameters] = field(default_factory=dict)  # component group -> kernel

    def to_dict(self) -> dict[str, Any]:
        return {
            "direction_scope": self.direction_scope,
            "direction_index": self.direction_index,
            "kernels": {group: kernel.to_dict() for group, kernel in sorted(self.kernels.items())},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AbliterationParameters:
        return cls(
            direction_scope=data["direction_scope"],
            direction_index=data.get("direction_index"),
            kernels={group: KernelParameters(**kernel) for group, kernel in data["kernels"].items()},
        )


@dataclass(frozen=True)
class ComponentEdit:
    component: Component
    strength: float
    direction_key: str  # "global" or "layer.<residual index>": a key of the saved directions file


def direction_key(parameters: AbliterationParameters, component: Component) -> str:
    return GLOBAL if parameters.direction_scope == GLOBAL else f"layer.{component.layer + 1}"


def edit_directions(parameters: AbliterationParameters, directions: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every direction an edit may use, by key: the interpolated global one, or each layer's.

    ``directions`` is [layers + 1, hidden] (one direction per residual index) or [layers + 1, k, hidden]
    (a subspace basis per index, ``--directions subspace``): the values are then [k, hidden] bases.
    """
    if parameters.direction_scope == GLOBAL:
        if parameters.direction_index is None:
            raise ValueError("a global direction scope needs direction_index")
        interpolate = interpolated_subspace if directions.ndim == 3 else interpolated_direction
        return {GLOBAL: interpolate(directions, parameters.direction_index)}
    return {f"layer.{index + 1}": layer_direction(directions, index) for index in range(directions.shape[0] - 1)}


def plan_edits(parameters: AbliterationParameters, components: list[Component]) -> list[ComponentEdit]:
    """Strength and direction per component; components with zero strength are left out."""
    edits = []
    for component in components:
        kernel = parameters.kernels.get(component.group)
        strength = layer_strength(component.layer, kernel) if kernel else 0.0
        if strength != 0.0:
            edits.append(ComponentEdit(component, strength, direction_key(parameters, component)))
    return edits
