"""Quantization formats by name, and the ModelOpt config each one maps to.

A format name is what the user types (``--format nvfp4``); the recipe says
which ModelOpt preset implements it and what it costs to run, so the CLI can
refuse an impossible combination (AWQ on a CPU) before loading anything.
ModelOpt is imported lazily: listing formats must not pay its ~10 s import.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from foundation.errors import UserError


@dataclass(frozen=True)
class FormatRecipe:
    name: str
    modelopt_config: str
    quantizes: str
    needs_gpu: bool
    why_gpu: str = ""


FORMATS: dict[str, FormatRecipe] = {
    recipe.name: recipe
    for recipe in (
        FormatRecipe(
            "nvfp4",
            "NVFP4_DEFAULT_CFG",
            "weights + activations in NVFP4 (W4A4, block 16, FP8 scales), max calibration",
            needs_gpu=False,
        ),
        FormatRecipe(
            "nvfp4_awq",
            "NVFP4_AWQ_LITE_CFG",
            "NVFP4 W4A4 with AWQ-lite scale search (better accuracy, slower calibration)",
            needs_gpu=True,
            why_gpu="AWQ-lite runs quantized forward passes, which ModelOpt implements only on CUDA",
        ),
        FormatRecipe(
            "w4a16_nvfp4",
            "W4A16_NVFP4_CFG",
            "weights only in NVFP4; activations stay bf16",
            needs_gpu=False,
        ),
        FormatRecipe(
            "w4a8",
            "W4A8_NVFP4_FP8_CFG",
            "NVFP4 weights (block 32) + FP8 per-tensor activations",
            needs_gpu=False,
        ),
        FormatRecipe(
            "fp8",
            "FP8_DEFAULT_CFG",
            "weights + activations in FP8 E4M3, per-tensor scales",
            needs_gpu=False,
        ),
    )
}

DEFAULT_FORMAT = "nvfp4"

KV_CACHE_FORMATS: dict[str, str | None] = {"none": None, "fp8": "FP8_KV_CFG"}


def get_recipe(name: str, flag: str = "--format") -> FormatRecipe:
    try:
        return FORMATS[name]
    except KeyError:
        raise UserError(flag, f"unknown format {name!r}", f"choose one of: {', '.join(FORMATS)} (see --list_configs)") from None


def check_device_supports(recipe: FormatRecipe, cuda_available: bool, flag: str = "--format") -> None:
    """Refuse GPU-only formats up front, before a long model load."""
    if recipe.needs_gpu and not cuda_available:
        raise UserError(
            flag,
            f"format {recipe.name!r} needs a CUDA GPU ({recipe.why_gpu}) and none is visible",
            "run on a machine with an NVIDIA GPU, or pick a CPU-capable format such as 'nvfp4'",
        )


def build_quant_config(
    recipe: FormatRecipe,
    *,
    kv_cache: str = "none",
    disabled_quantizer_patterns: list[str] | tuple[str, ...] = (),
    layerwise_checkpoint_dir: str | None = None,
    layerwise: bool = False,
) -> dict[str, Any]:
    """The ModelOpt config for one run: preset + KV cache + exclusions (+ layerwise).

    ModelOpt 0.47 applies ``quant_cfg`` entries in list order, later ones
    winning, so the KV-cache entries are appended after the preset and the
    ``enable: False`` exclusions last of all.
    """
    import modelopt.torch.quantization as mtq

    config = copy.deepcopy(getattr(mtq, recipe.modelopt_config))
    quant_cfg: list[dict[str, Any]] = list(config["quant_cfg"])
    if kv_cache not in KV_CACHE_FORMATS:
        raise UserError("--kv_cache", f"unknown KV-cache format {kv_cache!r}", f"choose one of: {', '.join(KV_CACHE_FORMATS)}")
    kv_config_name = KV_CACHE_FORMATS[kv_cache]
    if kv_config_name is not None:
        quant_cfg.extend(copy.deepcopy(getattr(mtq, kv_config_name)["quant_cfg"]))
    quant_cfg.extend({"quantizer_name": pattern, "enable": False} for pattern in disabled_quantizer_patterns)
    config["quant_cfg"] = quant_cfg
    if layerwise:
        algorithm = config.get("algorithm", "max")
        method = algorithm if isinstance(algorithm, str) else algorithm.get("method")
        if method != "max":
            raise UserError(
                "--layerwise",
                f"layerwise calibration is wired for max calibration only; format {recipe.name!r} uses {method!r}",
                "drop --layerwise, or use nvfp4 / w4a16_nvfp4 / w4a8 / fp8",
            )
        config["algorithm"] = {
            "method": "max",
            "layerwise": {"enable": True, "calib_mutates_weights": False, "checkpoint_dir": layerwise_checkpoint_dir},
        }
    return config


def print_format_table(console) -> None:
    from rich.table import Table

    table = Table(title="quantization formats (--format)")
    table.add_column("name", style="bold", no_wrap=True)
    table.add_column("ModelOpt config", no_wrap=True, min_width=len("mtq.NVFP4_AWQ_LITE_CFG"))
    table.add_column("what it quantizes")
    table.add_column("needs GPU?")
    for recipe in FORMATS.values():
        default = " (default)" if recipe.name == DEFAULT_FORMAT else ""
        table.add_row(recipe.name + default, f"mtq.{recipe.modelopt_config}", recipe.quantizes, "yes" if recipe.needs_gpu else "no")
    console.print(table)
    console.print("KV cache (--kv_cache): none (default), fp8 -> mtq.FP8_KV_CFG merged into quant_cfg")
