"""Settings of one quantization run, from the command line (and ``.env``).

Flag names are the seed's (``--input_model``, ``--dataset_yaml``, ...), so old
scripts keep working. argparse reads the flags; a pydantic model validates the
values; every problem becomes a ``UserError`` naming the offending flag.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from foundation.errors import UserError
from foundation.package_data import resolve_data_path
from quantize.recipes import DEFAULT_FORMAT, FORMATS, KV_CACHE_FORMATS
from quantize.skip_layers import parse_skip_patterns

DEFAULT_MIX = Path("datasets_yaml/offline_mix.yaml")

DTYPE_ALIASES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
                 "half": "float16", "fp32": "float32", "float32": "float32", "auto": "auto"}
MEMORY_SIZE = re.compile(r"^\s*\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?\s*$", re.IGNORECASE)


class QuantizeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    input_model: str
    output_model: Path
    dataset_yaml: Path = DEFAULT_MIX
    format: str = DEFAULT_FORMAT
    kv_cache: Literal["none", "fp8"] = "none"
    backend: Literal["modelopt", "llmcompressor"] = "modelopt"
    max_samples: int | None = Field(default=None, ge=1)
    max_seq_len: int | None = Field(default=None, ge=8)
    oversample_ratio: float | None = Field(default=None, ge=1.0)
    min_token_length: int | None = Field(default=None, ge=1)
    seed: int | None = None
    batch_size: int = Field(default=4, ge=1)
    dtype: Literal["bfloat16", "float16", "float32", "auto"] = "bfloat16"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    trust_remote_code: bool = False
    revision: str | None = None
    skip_layers: tuple[str, ...] = ()
    overwrite: bool = False
    offload_folder: Path | None = None
    max_gpu_memory: str | None = None
    max_cpu_memory: str | None = None
    clean_offload: bool = False
    layerwise: bool = False

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        if value not in FORMATS:
            raise ValueError(f"unknown format {value!r}; choose one of: {', '.join(FORMATS)}")
        return value

    @field_validator("max_gpu_memory", "max_cpu_memory")
    @classmethod
    def _memory_size(cls, value: str | None) -> str | None:
        if value is not None and not MEMORY_SIZE.match(value):
            raise ValueError(f"{value!r} is not a size; write e.g. 80GiB, 200GB or 0")
        return value

    @property
    def offload(self) -> bool:
        return self.offload_folder is not None


def build_parser(prog: str = "quant-abliterate quantize", offload: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Calibrate a Hugging Face causal LM and export a quantized checkpoint.")
    add = parser.add_argument
    add("--input_model", "--model", default=os.environ.get("INPUT_MODEL"), help="local model directory or Hub id (env INPUT_MODEL)")
    add("--output_model", "--output", default=os.environ.get("OUTPUT_MODEL"),
        help="output directory (env OUTPUT_MODEL; default <input>-<FORMAT>)")
    add("--dataset_yaml", "--mix", default=str(DEFAULT_MIX), help="calibration mix YAML (default: the offline mix)")
    add("--format", default=DEFAULT_FORMAT, help=f"one of {', '.join(FORMATS)} (see --list_configs)")
    add("--w4a8", action="store_true", help="seed alias for --format w4a8")
    add("--kv_cache", default="none", choices=list(KV_CACHE_FORMATS), help="also quantize the KV cache")
    add("--backend", default="modelopt", choices=["modelopt", "llmcompressor"],
        help="llmcompressor: compressed-tensors NVFP4 via its sequential pipeline")
    add("--max_samples", type=int, help="calibration samples (default: the mix's)")
    add("--max_seq_len", type=int, help="tokens per sample (default: the mix's)")
    add("--oversample_ratio", type=float, help="draw this many times max_samples before length filtering")
    add("--min_token_length", type=int, help="drop samples shorter than this")
    add("--seed", type=int, help="sampling seed (default: the mix's)")
    add("--batch_size", type=int, default=4, help="calibration batch size")
    add("--dtype", default="bfloat16", help="load dtype: bfloat16 (bf16), float16 (fp16), float32 (fp32) or auto")
    add("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to calibrate (auto: first GPU if any)")
    add("--trust_remote_code", action="store_true")
    add("--revision", help="Hub revision (branch, tag or commit) of --input_model")
    add("--skip_layers", nargs="+", action="extend", default=[],
        help="module-name globs to keep in full precision (space or comma separated)")
    add("--overwrite", action="store_true", help="replace an existing output directory")
    add("--list_configs", action="store_true", help="print the formats and the ModelOpt config each maps to, then exit")
    group = parser.add_argument_group("offload (70B-405B models)")
    group.add_argument("--offload_folder", required=offload, help="folder for weights that fit neither GPU nor CPU memory")
    group.add_argument("--max_gpu_memory", help="per-GPU budget, e.g. 80GiB (default: what is free)")
    group.add_argument("--max_cpu_memory", help="CPU budget, e.g. 200GiB; 0 sends every decoder layer to disk")
    group.add_argument("--clean_offload", action="store_true",
                       help="delete OFFLOAD_FOLDER/quant_abliterate_offload (our offloaded weights, layerwise checkpoints) "
                            "before and after")
    group.add_argument("--layerwise", action="store_true", help="ModelOpt layerwise calibration (one decoder layer at a time)")
    return parser


FIELD_TO_FLAG = {"input_model": "--input_model", "output_model": "--output_model", "dataset_yaml": "--dataset_yaml"}


def default_output_dir(input_model: str, format_name: str) -> Path:
    return Path(f"{Path(input_model.rstrip('/')).name}-{format_name.upper()}")


def settings_from_args(args: argparse.Namespace) -> QuantizeSettings:
    """Validate parsed flags; any bad value raises UserError naming its flag."""
    if not args.input_model:
        raise UserError("--input_model", "no model given", "pass --input_model DIR_OR_HUB_ID (or set INPUT_MODEL in .env)")
    format_name = "w4a8" if args.w4a8 else args.format
    dtype = DTYPE_ALIASES.get(str(args.dtype).lower())
    if dtype is None:
        raise UserError("--dtype", f"unknown dtype {args.dtype!r}", f"choose one of: {', '.join(sorted(DTYPE_ALIASES))}")
    input_model = os.path.expanduser(args.input_model)
    values = dict(
        input_model=input_model,
        output_model=Path(args.output_model).expanduser() if args.output_model else default_output_dir(input_model, format_name),
        dataset_yaml=args.dataset_yaml, format=format_name, kv_cache=args.kv_cache, backend=args.backend,
        max_samples=args.max_samples, max_seq_len=args.max_seq_len, oversample_ratio=args.oversample_ratio,
        min_token_length=args.min_token_length, seed=args.seed, batch_size=args.batch_size, dtype=dtype,
        device=args.device, trust_remote_code=args.trust_remote_code, revision=args.revision,
        skip_layers=tuple(parse_skip_patterns(args.skip_layers)), overwrite=args.overwrite,
        offload_folder=args.offload_folder, max_gpu_memory=args.max_gpu_memory, max_cpu_memory=args.max_cpu_memory,
        clean_offload=args.clean_offload, layerwise=args.layerwise,
    )
    try:
        settings = QuantizeSettings(**values)
    except ValidationError as error:
        first = error.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "arguments"
        raise UserError(FIELD_TO_FLAG.get(field, f"--{field}"), first["msg"], "see --help for the accepted values") from None
    check_paths(settings)
    return settings


def looks_like_local_path(name: str) -> bool:
    """Hub ids are ``name`` or ``owner/name``; anything else is meant as a path."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1


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
    if not resolve_data_path(settings.dataset_yaml).is_file():
        raise UserError("--dataset_yaml", f"no such file: {settings.dataset_yaml}",
                        "pass a calibration mix YAML, e.g. datasets_yaml/offline_mix.yaml")
    if settings.layerwise and settings.backend != "modelopt":
        raise UserError("--layerwise", "layerwise calibration is a ModelOpt option (llm-compressor is always sequential)",
                        "drop --layerwise or use --backend modelopt")
    if settings.backend == "llmcompressor" and settings.format not in {"nvfp4", "w4a16_nvfp4"}:
        raise UserError("--format", f"--backend llmcompressor supports nvfp4 and w4a16_nvfp4, not {settings.format!r}",
                        "pick one of those or use --backend modelopt")
    if settings.offload_folder is not None and settings.offload_folder.exists() and not settings.offload_folder.is_dir():
        raise UserError("--offload_folder", f"{settings.offload_folder} exists and is not a directory", "pass a directory path")
