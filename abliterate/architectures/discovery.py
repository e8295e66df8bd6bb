"""Find the decoder layers and, in each, the projections that write into the residual stream.

Abliteration removes a direction from what each layer *adds* to the residual
stream, so the components are the output projections of every token mixer
(attention ``o_proj``, linear-attention / Mamba ``out_proj``) and channel mixer
(MLP ``down_proj``, each expert's down-projection, shared experts). MoE
experts stored as one 3-D parameter ([experts, out, in], or [experts, in, out]
where the experts module says ``is_transposed``) are components too, edited per
expert: the reference skips them silently, which leaves such models refusing.

All layers are scanned and the union is kept, because hybrid models mix layer
kinds (Mamba, attention, MLP, MoE) and no single layer shows them all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from abliterate.architectures.families import (
    CHANNEL_MIXER_PARENTS,
    CHANNEL_MIXER_SUFFIXES,
    FUSED_EXPERT_PARAMETERS,
    GENERIC_LAYER_PATHS,
    TOKEN_MIXER_PARENTS,
    TOKEN_MIXER_SUFFIXES,
    FamilyRule,
    family_rule,
)
from checkpoint_formats import packed_experts
from foundation.errors import UserError

ATTN = "attn"  # token-mixer output projections share one weight kernel
MLP = "mlp"  # channel-mixer output projections share the other
GROUPS = (ATTN, MLP)

_UNAMBIGUOUS = {"down_proj": MLP, "w2": MLP, "fc2": MLP, "dense_4h_to_h": MLP, "o_proj": ATTN, "out_proj": ATTN}


@dataclass(frozen=True)
class Component:
    """One weight to edit: a 2-D Linear weight, or a 3-D fused-experts parameter."""

    layer: int
    group: str  # ATTN or MLP: which weight kernel applies
    module_name: str  # dotted path in the unwrapped model
    parameter_name: str  # "weight" for a Linear, the parameter's name for fused experts
    pattern: str  # path inside the layer with indices as "*", for the summary table
    num_experts: int | None = None  # set for a fused 3-D parameter
    transposed: bool = False  # True when the residual dimension is the LAST axis
    weight_level: bool = False  # edit the weight itself (parametrization), not through a LoRA forward

    @property
    def parameter_path(self) -> str:
        return f"{self.module_name}.{self.parameter_name}"


@dataclass
class Architecture:
    layers_path: str
    layers: list[nn.Module]
    components: list[Component]
    unrecognised_layers: list[tuple[int, str, list[str]]]  # (index, class name, child names)
    hidden_size: int

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def component_counts(self) -> dict[str, int]:
        """Component pattern -> number of layers that have it."""
        layers_by_pattern: dict[str, set[int]] = {}
        for component in self.components:
            layers_by_pattern.setdefault(component.pattern, set()).add(component.layer)
        return {pattern: len(layers) for pattern, layers in layers_by_pattern.items()}


def text_config(config):
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder layers: a known path first, else the longest ModuleList of config.num_hidden_layers blocks."""
    rule = family_rule(getattr(model.config, "model_type", None))
    for path in rule.layer_paths + GENERIC_LAYER_PATHS:
        try:
            candidate = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(candidate, nn.ModuleList) and len(candidate) > 0:
            return path, candidate
    wanted = getattr(text_config(model.config), "num_hidden_layers", None)
    lists = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (wanted is None or len(module) == wanted)
    ]
    if lists:
        return max(lists, key=lambda item: len(item[1]))
    raise UserError(
        type(model).__name__,
        f"no decoder layers found (tried {', '.join(GENERIC_LAYER_PATHS)})",
        "add the model family's layer path to abliterate/architectures/families.py",
    )


def _group_of(relative_name: str) -> str | None:
    parts = relative_name.split(".")
    suffix = parts[-1]
    if suffix in _UNAMBIGUOUS:
        return _UNAMBIGUOUS[suffix]
    parents = set(parts[:-1])
    if suffix in CHANNEL_MIXER_SUFFIXES and parents & set(CHANNEL_MIXER_PARENTS):
        return MLP
    if suffix in TOKEN_MIXER_SUFFIXES and parents & set(TOKEN_MIXER_PARENTS):
        return ATTN
    return None


def _pattern(relative_name: str) -> str:
    return re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", relative_name)


def _linear_out_features(module: nn.Module) -> int | None:
    out_features = getattr(module, "out_features", None)
    if isinstance(out_features, int):
        return out_features
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.ndim == 2:
        return int(weight.shape[0])
    return None


def _fused_layout(module: nn.Module, parameter: torch.Tensor, hidden: int, forced: bool | None) -> bool | None:
    """True if the residual axis is last, False if it is the middle one, None if neither is the residual."""
    if forced is not None:
        transposed = forced
    elif isinstance(getattr(module, "is_transposed", None), bool):
        transposed = module.is_transposed
    else:
        transposed = parameter.shape[2] == hidden and parameter.shape[1] != hidden
    residual_size = parameter.shape[2] if transposed else parameter.shape[1]
    return transposed if residual_size == hidden else None


def _layer_components(index: int, prefix: str, layer: nn.Module, hidden: int, rule: FamilyRule) -> list[Component]:
    found: list[Component] = []
    for relative, module in layer.named_modules():
        if not relative:
            continue
        if isinstance(module, nn.Linear) or hasattr(module, "out_features") and hasattr(module, "in_features"):
            group = _group_of(relative)
            if group is not None and _linear_out_features(module) == hidden:
                weight_level = relative.split(".")[-1] in rule.weight_level_suffixes
                found.append(Component(index, group, f"{prefix}.{relative}", "weight", _pattern(relative), weight_level=weight_level))
            continue
        fused = [(name, parameter, False) for name, parameter in module.named_parameters(recurse=False)]
        # Experts kept packed (checkpoint_formats.packed_experts) exist only during their forward: edited there.
        fused += [(name, torch.empty(packed_experts.logical_shape(module, name), device="meta"), True)
                  for name in getattr(module, "_packed_expert_params", ())]
        for name, parameter, packed in fused:
            if parameter.ndim != 3 or name not in FUSED_EXPERT_PARAMETERS:
                continue
            transposed = _fused_layout(module, parameter, hidden, rule.experts_transposed)
            if transposed is None:
                continue
            found.append(
                Component(
                    index,
                    MLP,
                    f"{prefix}.{relative}",
                    name,
                    _pattern(f"{relative}.{name}") + (" [fused, packed]" if packed else " [fused]"),
                    num_experts=int(parameter.shape[0]),
                    transposed=transposed,
                    weight_level=packed,
                )
            )
    return found


def discover(model: nn.Module) -> Architecture:
    """Layers and abliterable components of ``model`` (the unwrapped transformers model)."""
    layers_path, layers = find_decoder_layers(model)
    hidden = int(getattr(text_config(model.config), "hidden_size"))
    rule = family_rule(getattr(model.config, "model_type", None))
    components: list[Component] = []
    unrecognised: list[tuple[int, str, list[str]]] = []
    for index, layer in enumerate(layers):
        found = _layer_components(index, f"{layers_path}.{index}", layer, hidden, rule)
        if not found:
            unrecognised.append((index, type(layer).__name__, [name for name, _ in layer.named_children()]))
        components.extend(found)
    if not components:
        raise UserError(
            type(model).__name__,
            f"no abliterable module (attention/Mamba out-projection, MLP or expert down-projection "
            f"writing {hidden} features) in any of the {len(layers)} layers at {layers_path}",
            "add the family's projection names to abliterate/architectures/families.py",
        )
    return Architecture(layers_path, list(layers), components, unrecognised, hidden)
