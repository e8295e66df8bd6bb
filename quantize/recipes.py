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
    fp4_weights: bool = True  # NVFP4 (E2M1) weights: ModelOpt fake-quantizes them on CUDA only
    experts_only: bool = False  # quantizes MoE experts and nothing else
    algorithm: str = "max"  # the calibration algorithm its ModelOpt preset uses


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
            algorithm="awq_lite",
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
            fp4_weights=False,
        ),
        FormatRecipe(
            "nvfp4_mlp_only",
            "NVFP4_MLP_ONLY_CFG",
            "NVFP4 W4A4 on the MLP / MoE layers only; attention stays bf16",
            needs_gpu=False,
        ),
        FormatRecipe(
            "nvfp4_omlp_only",
            "NVFP4_OMLP_ONLY_CFG",
            "NVFP4 W4A4 on the attention output projection and the MLP / MoE layers; q/k/v stay bf16",
            needs_gpu=False,
        ),
        FormatRecipe(
            "nvfp4_experts_only",
            "NVFP4_EXPERTS_ONLY_CFG",
            "NVFP4 W4A4 on the routed MoE experts only (MoE models); everything else stays bf16",
            needs_gpu=False,
            experts_only=True,
        ),
    )
}

# The formats whose quant_cfg is NVFP4 W4A4 everywhere it applies: ModelOpt's AWQ presets are of this kind.
_W4A4_NVFP4 = ("nvfp4", "nvfp4_mlp_only", "nvfp4_omlp_only", "nvfp4_experts_only")


@dataclass(frozen=True)
class AlgorithmRecipe:
    """A calibration method (``--algorithm``): ModelOpt's ``algorithm`` field, taken from ``source``
    (a ModelOpt preset whose ``algorithm`` holds ModelOpt's tuned settings) or ``config``."""

    name: str
    what: str
    source: str | None = None  # mtq.<source>["algorithm"]
    config: tuple[tuple[str, Any], ...] = ()  # used when ModelOpt ships no preset for it
    formats: tuple[str, ...] | None = None  # None: every format
    static_fp4_weights: bool = False  # NVFP4 weights as static blocks (the FP8 scale sweep), as ModelOpt's presets do
    refused: str = ""  # offered by ModelOpt 0.47 but not by us, and why
    # Calibration only reads the weights (sets amax / scales): the offload path may skip ModelOpt's writeback of
    # offloaded weights into accelerate's weights_map (quantize/calibrate.py: offload_writeback_skipped).
    keeps_weights: bool = False


ALGORITHMS: dict[str, AlgorithmRecipe] = {
    recipe.name: recipe
    for recipe in (
        AlgorithmRecipe("max", "per-tensor / per-block max of weights and activations", source="NVFP4_DEFAULT_CFG",
                        keeps_weights=True),
        AlgorithmRecipe("mse", "weight scales by MSE search (NVFP4: sweep of the FP8 block scales)",
                        source="NVFP4_W4A4_WEIGHT_MSE_FP8_SWEEP_CFG", static_fp4_weights=True),
        AlgorithmRecipe("local_hessian", "weight scales by local-Hessian-weighted error (NVFP4: FP8 scale sweep)",
                        source="NVFP4_W4A4_WEIGHT_LOCAL_HESSIAN_CFG", static_fp4_weights=True),
        AlgorithmRecipe("awq_lite", "AWQ scale search, one alpha per layer", source="NVFP4_AWQ_LITE_CFG", formats=_W4A4_NVFP4),
        AlgorithmRecipe("awq_full", "AWQ scale search + weight clipping search", source="NVFP4_AWQ_FULL_CFG",
                        formats=_W4A4_NVFP4),
        AlgorithmRecipe("awq_clip", "AWQ weight clipping search only", source="NVFP4_AWQ_CLIP_CFG", formats=_W4A4_NVFP4),
        AlgorithmRecipe("gptq", "GPTQ: weights updated column by column against the calibration Hessian",
                        config=(("method", "gptq"),)),
        AlgorithmRecipe("svdquant", "SVDQuant low-rank branch + NVFP4", source="NVFP4_SVDQUANT_DEFAULT_CFG",
                        formats=_W4A4_NVFP4,
                        refused="ModelOpt exports it as quant_algo NVFP4_SVD (an extra low-rank branch per layer), "
                                "which vLLM / TensorRT-LLM's ModelOpt NVFP4 loaders and our stage 2 do not read"),
    )
}


DEFAULT_FORMAT = "nvfp4"

KV_CACHE_FORMATS: dict[str, str | None] = {"none": None, "fp8": "FP8_KV_CFG"}


def get_recipe(name: str, flag: str = "--format") -> FormatRecipe:
    try:
        return FORMATS[name]
    except KeyError:
        raise UserError(flag, f"unknown format {name!r}", f"choose one of: {', '.join(FORMATS)} (see --list_configs)") from None


def get_algorithm(name: str, flag: str = "--algorithm") -> AlgorithmRecipe:
    try:
        algorithm = ALGORITHMS[name]
    except KeyError:
        raise UserError(flag, f"unknown algorithm {name!r}", f"choose one of: {', '.join(offered_algorithms())} "
                        "(see --list_configs)") from None
    if algorithm.refused:
        raise UserError(flag, f"algorithm {name!r} is not offered: {algorithm.refused}",
                        f"choose one of: {', '.join(offered_algorithms())}")
    return algorithm


def offered_algorithms() -> list[str]:
    return [name for name, algorithm in ALGORITHMS.items() if not algorithm.refused]


def check_algorithm_fits(recipe: FormatRecipe, algorithm_name: str | None, flag: str = "--algorithm") -> None:
    """Refuse an algorithm the format's ModelOpt presets do not pair it with."""
    if algorithm_name is None:
        return
    algorithm = get_algorithm(algorithm_name, flag)
    if recipe.name == "nvfp4_awq" and algorithm.name != "awq_lite":
        raise UserError(flag, f"--format nvfp4_awq is NVFP4 with awq_lite already; it does not combine with {algorithm.name!r}",
                        f"use --format nvfp4 --algorithm {algorithm.name}")
    if algorithm.formats is not None and recipe.name not in algorithm.formats and recipe.name != "nvfp4_awq":
        raise UserError(flag, f"algorithm {algorithm.name!r} applies to NVFP4 W4A4 formats ({', '.join(algorithm.formats)}), "
                        f"not to --format {recipe.name}",
                        f"pick one of those formats, or an algorithm for every format: "
                        f"{', '.join(name for name in offered_algorithms() if ALGORITHMS[name].formats is None)}")


def config_has_experts(config: dict[str, Any]) -> bool:
    """A model config (``config.json`` as a dict) that declares routed experts, also under ``text_config``."""
    keys = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
    nested = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    return any(isinstance(source.get(key), int) and source[key] > 1 for source in (config, nested) for key in keys)


def check_format_fits_model(recipe: FormatRecipe, config: dict[str, Any], where: str = "--format") -> None:
    if recipe.experts_only and not config_has_experts(config):
        raise UserError(where, f"format {recipe.name!r} quantizes MoE experts only, and this model has none "
                        "(no num_experts / num_local_experts / n_routed_experts in its config.json)",
                        "use --format nvfp4 (or nvfp4_mlp_only) for a dense model")


def needs_gpu(recipe: FormatRecipe, algorithm_name: str | None = None) -> str | None:
    """Why this format + algorithm cannot run on the CPU, or None when it can."""
    if recipe.needs_gpu:
        return f"format {recipe.name!r} needs a CUDA GPU ({recipe.why_gpu})"
    if algorithm_name not in (None, "max") and recipe.fp4_weights:
        return (f"algorithm {algorithm_name!r} with format {recipe.name!r} needs a CUDA GPU (it runs NVFP4 fake-quantized "
                "weights or forward passes, which ModelOpt implements only with CUDA / Triton kernels)")
    return None


def check_device_supports(recipe: FormatRecipe, cuda_available: bool, flag: str = "--format",
                          algorithm: str | None = None) -> None:
    """Refuse GPU-only formats and format + algorithm pairs up front, before a long model load."""
    reason = needs_gpu(recipe, algorithm)
    if reason is not None and not cuda_available:
        raise UserError(
            flag if recipe.needs_gpu or algorithm is None else "--algorithm",
            f"{reason} and none is visible",
            "run on a machine with an NVIDIA GPU, or pick what runs on CPU: --algorithm max with any format, "
            "or any algorithm with --format fp8 (see --list_configs)",
        )


def algorithm_config(algorithm: AlgorithmRecipe) -> dict[str, Any]:
    """ModelOpt's ``algorithm`` dict for it (its preset's settings), always in dict form."""
    import modelopt.torch.quantization as mtq

    if algorithm.source is None:
        return dict(algorithm.config)
    value = copy.deepcopy(getattr(mtq, algorithm.source)["algorithm"])
    return {"method": value} if isinstance(value, str) else value


def static_fp4_weight_entries(quant_cfg: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """NVFP4 (E2M1, FP8 block scales) weight quantizers made static-block, as ModelOpt's MSE / local-Hessian
    presets have them: the FP8 scale sweep searches static per-block scales."""
    entries = []
    for entry in quant_cfg:
        cfg = entry.get("cfg")
        blocks = cfg.get("block_sizes") if isinstance(cfg, dict) else None
        if ("weight_quantizer" in str(entry.get("quantizer_name")) and isinstance(blocks, dict)
                and tuple(cfg.get("num_bits", ())) == (2, 1) and tuple(blocks.get("scale_bits", ())) == (4, 3)
                and blocks.get("type") == "dynamic"):
            cfg = {key: value for key, value in cfg.items() if key != "effective_bits"}
            entry = {**entry, "cfg": {**cfg, "block_sizes": {**blocks, "type": "static"}}}
        entries.append(entry)
    return entries


def build_quant_config(
    recipe: FormatRecipe,
    *,
    kv_cache: str = "none",
    disabled_quantizer_patterns: list[str] | tuple[str, ...] = (),
    layerwise_checkpoint_dir: str | None = None,
    layerwise: bool = False,
    algorithm: str | None = None,
    calib_all_experts: bool = False,
) -> dict[str, Any]:
    """The ModelOpt config for one run: preset + algorithm + KV cache + exclusions (+ layerwise, all experts).

    ModelOpt 0.47 applies ``quant_cfg`` entries in list order, later ones
    winning, so the KV-cache entries are appended after the preset and the
    ``enable: False`` exclusions last of all. ``algorithm`` (``--algorithm``)
    replaces the preset's own; ``calib_all_experts`` sets ModelOpt's
    ``moe_calib_experts_ratio`` to 1 (``quantize.expert_coverage``).
    """
    import modelopt.torch.quantization as mtq

    config = copy.deepcopy(getattr(mtq, recipe.modelopt_config))
    quant_cfg: list[dict[str, Any]] = list(config["quant_cfg"])
    if algorithm is not None:
        check_algorithm_fits(recipe, algorithm)
        chosen = get_algorithm(algorithm)
        config["algorithm"] = algorithm_config(chosen)
        if chosen.static_fp4_weights:
            quant_cfg = static_fp4_weight_entries(quant_cfg)
    if kv_cache not in KV_CACHE_FORMATS:
        raise UserError("--kv_cache", f"unknown KV-cache format {kv_cache!r}", f"choose one of: {', '.join(KV_CACHE_FORMATS)}")
    kv_config_name = KV_CACHE_FORMATS[kv_cache]
    if kv_config_name is not None:
        quant_cfg.extend(copy.deepcopy(getattr(mtq, kv_config_name)["quant_cfg"]))
    quant_cfg.extend({"quantizer_name": pattern, "enable": False} for pattern in disabled_quantizer_patterns)
    config["quant_cfg"] = quant_cfg
    chosen_algorithm = config.get("algorithm", "max")
    chosen_algorithm = {"method": chosen_algorithm} if isinstance(chosen_algorithm, str) else dict(chosen_algorithm)
    if layerwise:
        if chosen_algorithm.get("method") != "max":
            raise UserError(
                "--layerwise",
                f"layerwise calibration is wired for max calibration only; this run uses {chosen_algorithm.get('method')!r} "
                f"(format {recipe.name!r}{f', --algorithm {algorithm}' if algorithm else ''})",
                "drop --layerwise, or use --algorithm max with nvfp4 / w4a16_nvfp4 / w4a8 / fp8",
            )
        chosen_algorithm["layerwise"] = {"enable": True, "calib_mutates_weights": False,
                                         "checkpoint_dir": layerwise_checkpoint_dir}
    if calib_all_experts:
        chosen_algorithm["moe_calib_experts_ratio"] = 1.0
    if layerwise or calib_all_experts:
        config["algorithm"] = chosen_algorithm
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
    print_algorithm_table(console)


def print_algorithm_table(console) -> None:
    from rich.table import Table

    table = Table(title="calibration algorithms (--algorithm; default: the format's own)")
    table.add_column("name", style="bold", no_wrap=True)
    table.add_column("settings from", no_wrap=True)
    table.add_column("what it does")
    table.add_column("formats")
    table.add_column("needs GPU?")
    for algorithm in ALGORITHMS.values():
        source = f"mtq.{algorithm.source}" if algorithm.source else str(dict(algorithm.config))
        formats = "not offered: " + algorithm.refused if algorithm.refused else ", ".join(algorithm.formats or ["all"])
        gpu = "no" if algorithm.name == "max" else "with NVFP4 weights (all but fp8)"
        table.add_row(algorithm.name, source, algorithm.what, formats, "-" if algorithm.refused else gpu)
    console.print(table)
