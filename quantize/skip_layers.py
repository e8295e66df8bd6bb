"""Which layers stay in full precision, and why.

Users name layers with globs over *module* names (``*layers.0.*``,
``*down_proj``); ModelOpt matches its ``quant_cfg`` entries against
*quantizer* names (``model.layers.0.mlp.down_proj.weight_quantizer``). A module
glob ``P`` becomes the quantizer glob ``P.*``, which matches exactly the
quantizers that live directly or indirectly under the modules ``P`` matches,
so a parent name (``model.layers.0``) skips the whole block.

The architecture-aware defaults are the layers that break or gain nothing
when quantized (output head, MoE routers, Mamba convolutions, vision towers).
ModelOpt's presets already exclude most of them; we add them explicitly too so
the table shown to the user is the truth, not a guess about ModelOpt internals.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from checkpoint_formats.layout import (
    MOE_ROUTERS,
    SHARED_EXPERT_GATES,
    scale_sharing_group,
)
from foundation.errors import UserError


@dataclass(frozen=True)
class SkipRule:
    module_glob: str
    reason: str


DEFAULT_SKIP_RULES: tuple[SkipRule, ...] = (
    SkipRule("*lm_head", "output head: logits are precision-critical; often tied to the embeddings"),
    SkipRule("*output_layer", "output head: logits are precision-critical"),
    *(SkipRule(glob, f"{label}: tiny, and quantization noise changes expert choice") for glob, label in MOE_ROUTERS),
    *(SkipRule(glob, "MoE shared-expert gate: a 1-wide projection") for glob in SHARED_EXPERT_GATES),
    SkipRule("*conv1d", "Mamba / linear-attention short convolution: not a matmul kernel target"),
    SkipRule("*vision_tower*", "vision tower: calibrated on text only, so its ranges would be wrong"),
    SkipRule("*vision_model*", "vision tower: calibrated on text only, so its ranges would be wrong"),
    SkipRule("*visual*", "vision tower: calibrated on text only, so its ranges would be wrong"),
    SkipRule("*embed_vision*", "vision embedding: calibrated on text only"),
    SkipRule("*multi_modal_projector*", "multimodal projector: calibrated on text only"),
    SkipRule("*audio_tower*", "audio tower: calibrated on text only"),
)


@dataclass(frozen=True)
class SkipMatch:
    module_glob: str
    reason: str
    modules: tuple[str, ...] = field(default=())


def quantizer_pattern(module_glob: str) -> str:
    """ModelOpt quantizer-name glob disabling every quantizer under the matched modules."""
    return f"{module_glob}.*"


def matching_modules(module_glob: str, module_names: list[str]) -> tuple[str, ...]:
    """Leaf modules matched by the glob themselves or through a parent (``model.layers.0``)."""
    return tuple(name for name in module_names if any(fnmatch.fnmatchcase(prefix, module_glob) for prefix in _prefixes(name)))


def _prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:end]) for end in range(len(parts), 0, -1)]


def detect_default_skips(module_names: list[str]) -> list[SkipMatch]:
    """Default rules that apply to this model (those matching at least one module)."""
    matches = []
    for rule in DEFAULT_SKIP_RULES:
        modules = matching_modules(rule.module_glob, module_names)
        if modules:
            matches.append(SkipMatch(rule.module_glob, rule.reason, modules))
    return matches


def parse_skip_patterns(values: list[str] | None) -> list[str]:
    """Accept both ``--skip_layers a b`` and the seed's ``--skip_layers a,b``."""
    patterns: list[str] = []
    for value in values or []:
        patterns.extend(part.strip() for part in value.split(",") if part.strip())
    return patterns


def resolve_user_skips(patterns: list[str], module_names: list[str], flag: str = "--skip_layers") -> list[SkipMatch]:
    """User globs with the modules they hit; a glob hitting nothing is a typo."""
    matches = []
    for pattern in patterns:
        modules = matching_modules(pattern, module_names)
        if not modules:
            examples = ", ".join(module_names[:3])
            raise UserError(
                flag,
                f"pattern {pattern!r} matches no quantizable module of this model",
                f"use a glob over module names, e.g. '*layers.0.*' or '*down_proj' (modules look like: {examples}, ...)",
            )
        matches.append(SkipMatch(pattern, "requested with --skip_layers", modules))
    check_fused_groups(matches, module_names, flag)
    return matches


def check_fused_groups(matches: list[SkipMatch], module_names: list[str], flag: str = "--skip_layers") -> None:
    """Refuse skips that split a fused group (q/k/v, gate/up): servers load such a group as one
    quantized or one unquantized matmul, and vLLM fails on "some but not all shards" quantized."""
    skipped = {module for match in matches for module in match.modules}
    present = set(module_names)
    for module in sorted(skipped):
        parent, _, leaf = module.rpartition(".")
        group = scale_sharing_group(leaf)
        if group is None:
            continue
        siblings = [f"{parent}.{other}" if parent else other for other in group if other != leaf]
        missing = [name for name in siblings if name in present and name not in skipped]
        if missing:
            pattern = next(match.module_glob for match in matches if module in match.modules)
            raise UserError(
                flag,
                f"pattern {pattern!r} keeps {module} in full precision but not its fused siblings "
                f"{', '.join(missing)}: servers run {'/'.join(group)} as one matmul, all quantized or none",
                f"skip them together, e.g. '{parent}.*' or add {', '.join(repr(name) for name in missing)}",
            )


def check_something_left(matches: list[SkipMatch], module_names: list[str], flag: str = "--skip_layers") -> None:
    """Skips that cover every quantizable module leave nothing to quantize: ModelOpt would stop with
    'no weight quantizer is enabled' after loading and wrapping the whole model."""
    skipped = {module for match in matches for module in match.modules}
    if module_names and skipped >= set(module_names):
        user = [match.module_glob for match in matches if match.reason.startswith("requested")]
        raise UserError(
            flag,
            f"{' '.join(repr(glob) for glob in user) or 'the skips'} keep all {len(module_names)} quantizable modules "
            "in full precision, so there is nothing left to quantize",
            "name only the layers to keep, e.g. --skip_layers '*layers.0.*' '*down_proj' (or leave the flag out)",
        )


def disabled_quantizer_patterns(matches: list[SkipMatch]) -> list[str]:
    return [quantizer_pattern(match.module_glob) for match in matches]


def quantizable_module_names(model) -> list[str]:
    """Names of the modules ModelOpt would wrap: Linear, Conv1d and friends (leaves with a 2-D+ weight)."""
    import torch

    names = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding):
            continue
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() >= 2 and not list(module.children()):
            names.append(name)
    return names


def print_skip_table(console, default_matches: list[SkipMatch], user_matches: list[SkipMatch]) -> None:
    from rich.table import Table

    table = Table(title="layers kept in full precision")
    table.add_column("pattern", style="bold")
    table.add_column("modules", justify="right")
    table.add_column("example")
    table.add_column("why")
    for match in [*default_matches, *user_matches]:
        table.add_row(match.module_glob, str(len(match.modules)), match.modules[0], match.reason)
    if not default_matches and not user_matches:
        table.add_row("-", "0", "-", "no architecture default applies; nothing requested")
    console.print(table)
