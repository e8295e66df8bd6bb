"""Settings of one quantization run: ``QuantizeSettings`` is their only definition.

The command line is generated from its fields (``foundation.settings_cli``): flag
name = field name, help = the field's description and default, with the seed's
aliases (``--model``, ``--output``, ``--mix``, ``--w4a8``) kept so old scripts keep
working. The pipeline's ``quantize:`` block validates against the same model, and
the calibration limits are the mix file's own (``quantize.calibration.schema``).
Every problem becomes a ``UserError`` naming the offending flag.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from checkpoint_formats.integrity import check_safetensors_folder
from foundation.dtypes import TORCH_DTYPES
from foundation.errors import UserError
from foundation.hub_ids import looks_like_local_path
from foundation.memory_size import MEMORY_SIZE
from foundation.output_guard import check_output_location
from foundation.package_data import resolve_data_path
from foundation.settings_cli import (
    add_model_arguments,
    cli,
    flags_table_markdown,
    given_values,
    validate,
)
from foundation.tokenizer_files import has_tokenizer
from foundation.weight_files import require_safetensors
from quantize.calibration.schema import (
    CalibrationSettings,
    MaxSamples,
    MaxSeqLen,
    MinTokenLength,
    OversampleRatio,
    Seed,
)
from quantize.recipes import (
    ALGORITHMS,
    DEFAULT_FORMAT,
    FORMATS,
    KV_CACHE_FORMATS,
    check_algorithm_fits,
    offered_algorithms,
)
from quantize.skip_layers import parse_skip_patterns

DEFAULT_MIX = Path("datasets_yaml/offline_mix.yaml")

# every spelling of the shared table, named by its long form (what the settings and the manifest record)
_LONG_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
DTYPE_ALIASES = {spelling: _LONG_NAMES.get(dtype, "auto") for spelling, dtype in TORCH_DTYPES.items()}
OFFLOAD = "offload (70B-405B models)"
# Seed compatibility: these come from the environment (or ./.env) when the flag is not given.
ENVIRONMENT = {"input_model": "INPUT_MODEL", "output_model": "OUTPUT_MODEL"}


def _mix_override(name: str) -> str:
    return f"{CalibrationSettings.model_fields[name].description} (default: the mix's)"


class QuantizeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    input_model: str = Field(description="local model directory or Hub id (env INPUT_MODEL)", json_schema_extra=cli(aliases=("--model",)))
    output_model: Path | None = Field(default=None, description="output directory (env OUTPUT_MODEL; default <input name>-<FORMAT>, in the working directory)",
                                      json_schema_extra=cli(aliases=("--output",)))
    dataset_yaml: Path = Field(default=DEFAULT_MIX, description="calibration mix YAML", json_schema_extra=cli(aliases=("--mix",)))
    format: str = Field(default=DEFAULT_FORMAT, description=f"one of {', '.join(FORMATS)} (see --list_configs; --w4a8 is the seed's alias for --format w4a8)")
    algorithm: str | None = Field(default=None, description=f"calibration algorithm: one of {', '.join(offered_algorithms())} "
                                  "(default: the format's own, max for all but nvfp4_awq; see --list_configs)")
    calib_all_experts: bool = Field(default=True, description="MoE models: route every calibration token through every expert "
                                    "(as llm-compressor does), so no expert is left with borrowed or default scales; "
                                    "--no_calib_all_experts calibrates with the real routing only",
                                    json_schema_extra=cli(aliases=("--no-calib_all_experts",)))
    allow_uncalibrated: bool = Field(default=False, description="export even when enabled quantizers got no calibration "
                                     "statistics (ModelOpt then fills their scales from a sibling or a fixed default)")
    kv_cache: Literal[tuple(KV_CACHE_FORMATS)] = Field(default="none", description="also quantize the KV cache")
    backend: Literal["modelopt", "llmcompressor"] = Field(default="modelopt", description="llmcompressor: compressed-tensors NVFP4 via its sequential pipeline")
    max_samples: MaxSamples | None = Field(default=None, description=_mix_override("max_samples"))
    max_seq_len: MaxSeqLen | None = Field(default=None, description=_mix_override("max_seq_len"))
    oversample_ratio: OversampleRatio | None = Field(default=None, description=_mix_override("oversample_ratio"))
    min_token_length: MinTokenLength | None = Field(default=None, description=_mix_override("min_token_length"))
    seed: Seed | None = Field(default=None, description=_mix_override("seed"))
    min_calibration_samples: int | None = Field(default=None, ge=1, description="stop when fewer calibration samples survive the filters (default: half of max_samples, rounded up)")
    batch_size: int = Field(default=4, ge=1, description="calibration batch size")
    dtype: Literal["bfloat16", "float16", "float32", "auto"] = Field(default="bfloat16", description="load dtype: bfloat16 (bf16), float16 (fp16, half), float32 (fp32) or auto",
                                                                     json_schema_extra=cli(metavar="DTYPE"))
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="where to calibrate (auto: first GPU if any)")
    trust_remote_code: bool = Field(default=False, description="run the model repository's own Python code (only for repositories you trust)")
    revision: str | None = Field(default=None, description="Hub revision (branch, tag or commit) of --input_model")
    skip_layers: tuple[str, ...] = Field(default=(), description="module-name globs to keep in full precision (space or comma separated)")
    overwrite: bool = Field(default=False, description="replace an existing output directory")
    offload_folder: Path | None = Field(default=None, description="folder for weights that fit neither GPU nor CPU memory", json_schema_extra=cli(group=OFFLOAD))
    max_gpu_memory: str | None = Field(default=None, description="per-GPU budget, e.g. 80GiB for every visible GPU, or one per GPU: 20GiB,80GiB (default: 90% of what is free on each)", json_schema_extra=cli(group=OFFLOAD))
    max_cpu_memory: str | None = Field(default=None, description="CPU budget, e.g. 200GiB; 0 sends every decoder layer to disk", json_schema_extra=cli(group=OFFLOAD))
    clean_offload: bool = Field(default=False, description="delete OFFLOAD_FOLDER/quant_abliterate_offload (our offloaded weights, layerwise checkpoints) before and after",
                                json_schema_extra=cli(group=OFFLOAD))
    layerwise: bool = Field(default=False, description="ModelOpt layerwise calibration (one decoder layer at a time)", json_schema_extra=cli(group=OFFLOAD))

    @model_validator(mode="before")
    @classmethod
    def _default_output(cls, data: Any) -> Any:
        """No output given: ``<input name>-<FORMAT>``, the seed's name (the Makefile relies on it too)."""
        if isinstance(data, dict) and data.get("output_model") is None and isinstance(data.get("input_model"), str):
            format_name = str(data.get("format") or cls.model_fields["format"].default)
            return {**data, "output_model": default_output_dir(os.path.expanduser(data["input_model"]), format_name)}
        return data

    @field_validator("input_model", "output_model", "offload_folder")
    @classmethod
    def _expand_home(cls, value: Any) -> Any:
        return type(value)(os.path.expanduser(value)) if value is not None else value

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        if value not in FORMATS:
            raise ValueError(f"unknown format {value!r}; choose one of: {', '.join(FORMATS)}")
        return value

    @field_validator("algorithm")
    @classmethod
    def _known_algorithm(cls, value: str | None) -> str | None:
        if value is not None and value not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {value!r}; choose one of: {', '.join(offered_algorithms())}")
        return value

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype_alias(cls, value: Any) -> Any:
        if not isinstance(value, str) or value.lower() not in DTYPE_ALIASES:
            raise ValueError(f"unknown dtype {value!r}; choose one of: {', '.join(sorted(DTYPE_ALIASES))}")
        return DTYPE_ALIASES[value.lower()]

    @field_validator("skip_layers", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        """``--skip_layers a b`` and the seed's ``--skip_layers a,b`` (and a YAML list or string) alike."""
        if isinstance(value, str):
            value = [value]
        return tuple(parse_skip_patterns(list(value))) if isinstance(value, (list, tuple)) else value

    @field_validator("max_gpu_memory", "max_cpu_memory")
    @classmethod
    def _memory_size(cls, value: str | None, info) -> str | None:
        sizes = value.split(",") if value is not None and info.field_name == "max_gpu_memory" else [value]
        if value is not None and not all(MEMORY_SIZE.match(size) for size in sizes):
            raise ValueError(f"{value!r} is not a size; write e.g. 80GiB, 200GB or 0"
                             + (" (or one per GPU: 20GiB,80GiB)" if info.field_name == "max_gpu_memory" else ""))
        return value

    @property
    def offload(self) -> bool:
        return self.offload_folder is not None


def build_parser(prog: str = "quant-abliterate quantize", offload: bool = False) -> argparse.ArgumentParser:
    """Every field of QuantizeSettings as a flag, plus the two flags that are not settings."""
    parser = argparse.ArgumentParser(prog=prog, description="Calibrate a Hugging Face causal LM and export a quantized checkpoint.")
    add_model_arguments(parser, QuantizeSettings, required=("offload_folder",) if offload else ())
    parser.add_argument("--w4a8", action="store_true", help="seed alias for --format w4a8")
    parser.add_argument("--list_configs", action="store_true", help="print the formats (with the ModelOpt config each maps to) and the calibration algorithms, then exit")
    return parser


def default_output_dir(input_model: str, format_name: str) -> Path:
    return Path(f"{Path(input_model.rstrip('/')).name}-{format_name.upper()}")


def settings_from_args(args: argparse.Namespace) -> QuantizeSettings:
    """Validate parsed flags (and INPUT_MODEL / OUTPUT_MODEL for flags not given); errors name the flag."""
    values = given_values(args, QuantizeSettings)
    for field, variable in ENVIRONMENT.items():
        if values.get(field) is None and os.environ.get(variable):
            values[field] = os.environ[variable]
    if not values.get("input_model"):
        raise UserError("--input_model", "no model given", "pass --input_model DIR_OR_HUB_ID (or set INPUT_MODEL in .env)")
    if getattr(args, "w4a8", False):
        values["format"] = "w4a8"
    settings = validate(QuantizeSettings, values, fix="see --help for the accepted values")
    check_paths(settings)
    return settings


def settings_table_markdown() -> str:
    """The README's table of stage 1's flags (``python -m quantize.settings``)."""
    return flags_table_markdown(QuantizeSettings)


def check_paths(settings: QuantizeSettings) -> None:
    """Cheap checks that must fail before a model load of many minutes."""
    if not Path(settings.input_model).exists() and looks_like_local_path(settings.input_model):
        raise UserError("--input_model", f"no such directory: {settings.input_model}",
                        "pass an existing model directory or a Hub id like org/name")
    if Path(settings.input_model).is_file():  # a weights or config file given instead of its folder
        raise UserError("--input_model", f"{settings.input_model} is a file, not a model directory",
                        "pass the directory that holds config.json and the weights")
    if Path(settings.input_model).exists() and not (Path(settings.input_model) / "config.json").is_file():
        raise UserError("--input_model", f"{settings.input_model} has no config.json",
                        "point at a Hugging Face model directory (the one holding config.json)")
    require_safetensors(settings.input_model, "--input_model")
    if Path(settings.input_model).is_dir() and not has_tokenizer(settings.input_model):
        raise UserError("--input_model", f"{settings.input_model} has no tokenizer (none of tokenizer.json, "
                        "tokenizer_config.json, tokenizer.model)",
                        "copy the tokenizer files of the model it came from into that folder: calibration tokenizes "
                        "with them and the exported checkpoint ships them")
    check_safetensors_folder(settings.input_model, "--input_model")  # a truncated shard: now, not inside from_pretrained
    if not resolve_data_path(settings.dataset_yaml).is_file():
        raise UserError("--dataset_yaml", f"no such file: {settings.dataset_yaml}",
                        "pass a calibration mix YAML, e.g. datasets_yaml/offline_mix.yaml")
    if settings.layerwise and settings.backend != "modelopt":
        raise UserError("--layerwise", "layerwise calibration is a ModelOpt option (llm-compressor is always sequential)",
                        "drop --layerwise or use --backend modelopt")
    if settings.format in FORMATS:
        check_algorithm_fits(FORMATS[settings.format], settings.algorithm)
        algorithm = settings.algorithm or FORMATS[settings.format].algorithm
        if settings.layerwise and algorithm != "max":
            raise UserError("--layerwise", f"layerwise calibration is wired for max calibration only; this run uses "
                            f"{algorithm!r}", "drop --layerwise, or use --algorithm max with a format other than nvfp4_awq")
    if settings.backend == "llmcompressor" and settings.algorithm not in (None, "max"):
        raise UserError("--algorithm", f"--algorithm {settings.algorithm} is a ModelOpt algorithm; --backend llmcompressor "
                        "calibrates with its own QuantizationModifier (min-max)", "drop --algorithm or use --backend modelopt")
    if settings.backend == "llmcompressor" and settings.format not in {"nvfp4", "w4a16_nvfp4"}:
        raise UserError("--format", f"--backend llmcompressor supports nvfp4 and w4a16_nvfp4, not {settings.format!r}",
                        "pick one of those or use --backend modelopt")
    if settings.offload_folder is not None and settings.offload_folder.exists() and not settings.offload_folder.is_dir():
        raise UserError("--offload_folder", f"{settings.offload_folder} exists and is not a directory", "pass a directory path")
    if settings.output_model is not None:  # --overwrite must never delete the model or the mix it reads
        check_output_location(settings.output_model, {"--input_model": settings.input_model,
                                                      "--dataset_yaml": resolve_data_path(settings.dataset_yaml)},
                              output_flag="--output_model")


if __name__ == "__main__":
    print(settings_table_markdown())
