"""How strongly each layer is edited: a triangular kernel over the layer index.

Per component group (token-mixer out-projections, channel-mixer
down-projections) the strength peaks at ``max_weight`` on layer
``max_weight_position``, falls linearly to ``min_weight`` at
``min_weight_distance`` layers away, and is zero beyond:

    lambda(i) = max_weight + (|i - position| / distance) * (min_weight - max_weight)   if |i - position| <= distance
    lambda(i) = 0                                                                      otherwise
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class KernelParameters:
    max_weight: float
    max_weight_position: float
    min_weight: float
    min_weight_distance: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def layer_strength(layer: int, kernel: KernelParameters) -> float:
    """lambda for decoder layer ``layer`` (0-based)."""
    distance = abs(layer - kernel.max_weight_position)
    if distance > kernel.min_weight_distance:
        return 0.0
    return kernel.max_weight + (distance / kernel.min_weight_distance) * (kernel.min_weight - kernel.max_weight)
