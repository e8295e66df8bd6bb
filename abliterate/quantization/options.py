"""The ``--quantization`` choices and the torchao config object each one means.

torchao 0.18 takes config objects only (string names raise), and several of
its default layouts need CUDA kernels. The mapping from an option name to a
config is therefore a pure function of the option, the group size and the
device type, so that a test can check what a GPU would get without a GPU.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

NONE = "none"
BNB_4BIT = "bnb_4bit"
NVFP4 = "nvfp4"
TORCHAO_INT4_WEIGHT_ONLY = "torchao_int4_weight_only"
TORCHAO_INT8_WEIGHT_ONLY = "torchao_int8_weight_only"
TORCHAO_INT8_DYNAMIC = "torchao_int8_dynamic"
TORCHAO_FLOAT8_WEIGHT_ONLY = "torchao_float8_weight_only"
TORCHAO_FLOAT8_DYNAMIC = "torchao_float8_dynamic"
TORCHAO_AUTOQUANT = "torchao_autoquant"

TORCHAO_OPTIONS = (
    TORCHAO_INT4_WEIGHT_ONLY,
    TORCHAO_INT8_WEIGHT_ONLY,
    TORCHAO_INT8_DYNAMIC,
    TORCHAO_FLOAT8_WEIGHT_ONLY,
    TORCHAO_FLOAT8_DYNAMIC,
    TORCHAO_AUTOQUANT,
)
OPTIONS = (NONE, BNB_4BIT, NVFP4, *TORCHAO_OPTIONS)
DEFAULT_GROUP_SIZE = 128
# what torchao int4 packs (tinygemm on CUDA, IntxWeightOnly PerGroup on CPU): 100 fails per layer, inside from_pretrained
TORCHAO_GROUP_SIZES = (32, 64, 128, 256)
# int4 on CPU: torchao's Int4WeightOnlyConfig layouts need CUDA (tinygemm) or the
# mslk kernels; IntxWeightOnlyConfig stores int4 values unpacked in int8 and runs anywhere.
CPU_INT4_NOTE = "IntxWeightOnlyConfig(int4, PerGroup)"


@dataclass(frozen=True)
class QuantizationRequest:
    """What the user asked for, validated; ``overrides`` maps a module-name regex to another option (or 'none')."""

    option: str = NONE
    group_size: int = DEFAULT_GROUP_SIZE
    include_embedding: bool = False
    overrides: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    @property
    def enabled(self) -> bool:
        return self.option != NONE

    @property
    def is_torchao(self) -> bool:
        return self.option in TORCHAO_OPTIONS

    def options_used(self) -> set[str]:
        return {self.option, *(option for _, option in self.overrides)} - {NONE}

    def override_for(self, module_name: str) -> str | None:
        """The option of the first override whose regex matches the whole module name, else None."""
        for pattern, option in self.overrides:
            if re.fullmatch(pattern, module_name):
                return option
        return None

    def option_for(self, module_name: str) -> str:
        override = self.override_for(module_name)
        return self.option if override is None else override

    def describe(self) -> str:
        parts = [self.option]
        if self.option == TORCHAO_INT4_WEIGHT_ONLY or any(o == TORCHAO_INT4_WEIGHT_ONLY for _, o in self.overrides):
            parts.append(f"group {self.group_size}")
        if self.include_embedding:
            parts.append("embeddings included")
        parts += [f"{pattern} -> {option}" for pattern, option in self.overrides]
        return ", ".join(parts)


def check_overrides(option: str, overrides: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """Validate ``{regex: option}`` against ``option``; raises ValueError with the reason.

    torchao applies a different config per module, so a torchao option may be
    overridden by any torchao option; bitsandbytes and our NVFP4 transform
    quantize every Linear the same way, so there an override can only say 'none'.
    """
    checked = []
    for pattern, target in overrides.items():
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"override pattern {pattern!r} is not a valid regular expression: {error}") from None
        if target not in OPTIONS:
            raise ValueError(f"override {pattern!r}: unknown option {target!r}; choose from {list(OPTIONS)}")
        allowed = {NONE, *TORCHAO_OPTIONS} - {TORCHAO_AUTOQUANT} if option in TORCHAO_OPTIONS else {NONE}
        if option != NONE and target not in allowed:
            raise ValueError(f"override {pattern!r} -> {target!r} cannot be combined with --quantization {option}; "
                             f"allowed: {sorted(allowed)}")
        if option == NONE and target != NONE:
            raise ValueError(f"override {pattern!r} -> {target!r} needs a --quantization other than 'none'")
        checked.append((pattern, target))
    return tuple(checked)


def torchao_config(option: str, *, group_size: int, device_type: str):
    """The torchao 0.18 config object for one option on one device type ('cpu' or 'cuda')."""
    import torch
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8WeightOnlyConfig,
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
    )
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quantize_.workflows.int4.int4_packing_format import (
        Int4PackingFormat,
    )

    if option == TORCHAO_INT4_WEIGHT_ONLY:
        if device_type == "cuda":
            # tinygemm layout: built into torch's CUDA build, unlike the default 'plain' layout (needs mslk)
            return Int4WeightOnlyConfig(group_size=group_size, int4_packing_format=Int4PackingFormat.TILE_PACKED_TO_4D)
        return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size))
    if option == TORCHAO_INT8_WEIGHT_ONLY:
        return Int8WeightOnlyConfig()
    if option == TORCHAO_INT8_DYNAMIC:
        return Int8DynamicActivationInt8WeightConfig()
    if option == TORCHAO_FLOAT8_WEIGHT_ONLY:
        return Float8WeightOnlyConfig()
    if option == TORCHAO_FLOAT8_DYNAMIC:
        return Float8DynamicActivationFloat8WeightConfig()
    raise ValueError(f"{option!r} has no torchao config object in torchao 0.18")


def torchao_quant_type(request: QuantizationRequest, device_type: str):
    """One config, or an ``FqnToConfig`` when overrides give some modules another config (or none).

    Embeddings need ``FqnToConfig`` too: transformers quantizes a module
    through it with an accept-all filter, whereas a bare config goes through
    torchao's default filter, which only accepts ``nn.Linear``.
    """
    default = torchao_config(request.option, group_size=request.group_size, device_type=device_type)
    if not request.overrides and not request.include_embedding:
        return default
    from torchao.quantization import FqnToConfig

    per_module = {
        f"re:{pattern}": None if target == NONE else torchao_config(target, group_size=request.group_size, device_type=device_type)
        for pattern, target in request.overrides
    }
    return FqnToConfig({**per_module, "_default": default})
