"""The parameter ranges the search explores (those of the reference abliteration search).

``L`` is the number of decoder layers. Residual indices run 0..L (0 = the
embeddings, i = the output of layer i - 1); layer indices 0..L-1.

* ``direction_scope``: one global direction or each layer's own (unless fixed by the settings)
* ``direction_index`` in [0.4 L, 0.9 L] (residual index, fractional, interpolated)
* per component group (attn, mlp):
  ``max_weight`` in [0.8, 1.5]; ``max_weight_position`` in [0.6 L, L - 1];
  ``min_weight`` = ``min_weight_fraction`` x ``max_weight`` with the fraction in [0, 1];
  ``min_weight_distance`` in [1, 0.6 L]

That is the ``late`` depth (the default, the reference's): a kernel edits at most the later ~half of
the model. ``full`` depth lets the peak sit at any layer, [0, L - 1], and the reach grow to [1, L], so
one kernel can edit every layer: for models whose refusal is spread over the whole depth (the hard
testbed, where no edit of the later layers alone removes a refusal).

``direction_index`` is always sampled (and ignored for the per-layer scope)
so that every trial has the same parameters and multivariate TPE models them
jointly.
"""

from __future__ import annotations

from collections.abc import Iterable

import optuna

from abliterate.edits.kernel import KernelParameters
from abliterate.edits.plan import GLOBAL, PER_LAYER, AbliterationParameters
from foundation.errors import UserError

DEPTHS = ("late", "full")


def kernel_bounds(num_layers: int, depth: str = "late") -> dict[str, tuple[float, float]]:
    """The ranges of a kernel's peak position and reach (in layers) for this depth."""
    if depth not in DEPTHS:
        raise UserError("--search_depth", f"unknown search depth {depth!r}", f"choose one of {', '.join(DEPTHS)}")
    last = num_layers - 1.0
    position = (0.6 * num_layers, last) if depth == "late" else (0.0, last)
    distance = (1.0, 0.6 * num_layers) if depth == "late" else (1.0, float(num_layers))
    return {"max_weight_position": _bounds(*position, 0.0, last),
            "min_weight_distance": _bounds(*distance, 1.0, float(max(num_layers, 2)))}


def _bounds(low: float, high: float, floor: float, ceiling: float) -> tuple[float, float]:
    low, high = max(low, floor), min(high, ceiling)
    return (low, high) if high > low else (min(low, ceiling), max(low, ceiling) + 1e-6)


def suggest_parameters(
    trial: optuna.Trial, num_layers: int, groups: Iterable[str], scope: str = "search", depth: str = "late"
) -> AbliterationParameters:
    """Draw (or, for a trial being resumed, read back) one trial's parameters."""
    bounds = kernel_bounds(num_layers, depth)
    if scope == "search":
        scope = trial.suggest_categorical("direction_scope", [GLOBAL, PER_LAYER])
    index_low, index_high = _bounds(0.4 * num_layers, 0.9 * num_layers, 0.0, float(num_layers))
    direction_index = trial.suggest_float("direction_index", index_low, index_high)
    kernels = {}
    for group in sorted(groups):
        position_low, position_high = bounds["max_weight_position"]
        distance_low, distance_high = bounds["min_weight_distance"]
        max_weight = trial.suggest_float(f"{group}.max_weight", 0.8, 1.5)
        kernels[group] = KernelParameters(
            max_weight=max_weight,
            max_weight_position=trial.suggest_float(f"{group}.max_weight_position", position_low, position_high),
            min_weight=trial.suggest_float(f"{group}.min_weight_fraction", 0.0, 1.0) * max_weight,
            min_weight_distance=trial.suggest_float(f"{group}.min_weight_distance", distance_low, distance_high),
        )
    return AbliterationParameters(
        direction_scope=scope,
        direction_index=direction_index if scope == GLOBAL else None,
        kernels=kernels,
    )
