"""Which quantization format a checkpoint directory holds, from its JSON files alone.

Reads ``config.json`` (``quantization_config``), ModelOpt's
``hf_quant_config.json`` and the safetensors index; opens no tensor data, so
it is instant on a 400B checkpoint and can fail early with a precise message.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from foundation.errors import UserError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class FormatKind(str, enum.Enum):
    MODELOPT_NVFP4 = "modelopt_nvfp4"  # W4A4: NVFP4 weights and activations
    MODELOPT_W4A16_NVFP4 = "modelopt_w4a16_nvfp4"  # NVFP4 weights only
    MODELOPT_W4A8 = "modelopt_w4a8"  # NVFP4 weights (group 32), FP8 activations
    MODELOPT_FP8 = "modelopt_fp8"
    CT_NVFP4 = "ct_nvfp4"  # compressed-tensors nvfp4-pack-quantized
    CT_FP8 = "ct_fp8"  # compressed-tensors float-quantized
    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"

    @property
    def is_nvfp4(self) -> bool:
        return self in {
            FormatKind.MODELOPT_NVFP4,
            FormatKind.MODELOPT_W4A16_NVFP4,
            FormatKind.MODELOPT_W4A8,
            FormatKind.CT_NVFP4,
        }

    @property
    def is_fp8(self) -> bool:
        return self in {FormatKind.MODELOPT_FP8, FormatKind.CT_FP8}

    @property
    def is_quantized(self) -> bool:
        return self.is_nvfp4 or self.is_fp8

    @property
    def is_compressed_tensors(self) -> bool:
        return self in {FormatKind.CT_NVFP4, FormatKind.CT_FP8}


_MODELOPT_ALGOS = {
    "NVFP4": FormatKind.MODELOPT_NVFP4,
    "NVFP4_AWQ": FormatKind.MODELOPT_NVFP4,
    "W4A16_NVFP4": FormatKind.MODELOPT_W4A16_NVFP4,
    "W4A8_NVFP4_FP8": FormatKind.MODELOPT_W4A8,
    "FP8": FormatKind.MODELOPT_FP8,
}
_CT_FORMATS = {"nvfp4-pack-quantized": FormatKind.CT_NVFP4, "float-quantized": FormatKind.CT_FP8}
_PLAIN_DTYPES = {"bfloat16": FormatKind.BF16, "float16": FormatKind.FP16, "float32": FormatKind.FP32}


@dataclass
class CheckpointFormat:
    kind: FormatKind
    path: Path
    config: dict[str, Any]
    weight_files: list[Path]  # shards in index order (one entry for a single file)
    weight_map: dict[str, str] | None = None  # tensor name -> shard file name, when sharded
    producer: str | None = None  # e.g. "modelopt 0.47.0"
    quant_algo: str | None = None
    group_size: int | None = None
    exclude_modules: list[str] = field(default_factory=list)

    @property
    def activations_quantized(self) -> bool:
        if self.kind in {FormatKind.MODELOPT_NVFP4, FormatKind.MODELOPT_W4A8, FormatKind.MODELOPT_FP8}:
            return True
        if self.kind.is_compressed_tensors:
            groups = self.config.get("quantization_config", {}).get("config_groups", {})
            return any(group.get("input_activations") for group in groups.values())
        return False

    def describe(self) -> str:
        parts = [self.kind.value]
        if self.quant_algo:
            parts.append(f"algo {self.quant_algo}")
        if self.group_size:
            parts.append(f"group {self.group_size}")
        if self.producer:
            parts.append(f"by {self.producer}")
        return ", ".join(parts)


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path) as handle:
            data = json.load(handle)
    except json.JSONDecodeError as error:
        raise UserError(
            str(path), f"is not valid JSON ({error})", "restore the file from the original checkpoint"
        ) from error
    except OSError as error:
        raise UserError(str(path), f"cannot be read ({error.strerror})") from error
    if not isinstance(data, dict):
        raise UserError(str(path), "must hold a JSON object")
    return data


def _weight_files(path: Path) -> tuple[list[Path], dict[str, str] | None]:
    index_path = path / INDEX_FILE
    if index_path.exists():
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserError(str(index_path), "has no 'weight_map'", "restore the index from the original checkpoint")
        shard_names = list(dict.fromkeys(weight_map.values()))
        missing = [name for name in shard_names if not (path / name).is_file()]
        if missing:
            raise UserError(
                str(path),
                f"{len(missing)} shard(s) named in {INDEX_FILE} are missing: {', '.join(missing[:5])}",
                "copy the complete checkpoint (every shard listed in the index)",
            )
        return [path / name for name in shard_names], weight_map
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE], None
    others = sorted(path.glob("*.safetensors"))
    if len(others) == 1:
        return others, None
    raise UserError(
        str(path),
        f"has no {SINGLE_FILE} and no {INDEX_FILE}" + (f" ({len(others)} loose .safetensors files)" if others else ""),
        "point to a Hugging Face checkpoint directory with safetensors weights",
    )


def _modelopt_format(path: Path, config: dict[str, Any], quant_config: dict[str, Any]) -> CheckpointFormat:
    hf_quant_path = path / "hf_quant_config.json"
    hf_quant = read_json(hf_quant_path) if hf_quant_path.exists() else {}
    details = hf_quant.get("quantization") or quant_config  # the JSON file is what TensorRT-LLM/vLLM read first
    producer_info = hf_quant.get("producer") or quant_config.get("producer") or {}
    algo = details.get("quant_algo")
    if algo not in _MODELOPT_ALGOS:
        raise UserError(
            str(hf_quant_path if hf_quant_path.exists() else path / "config.json"),
            f"ModelOpt quant_algo {algo!r} is not supported",
            f"use one of {', '.join(_MODELOPT_ALGOS)} (or load it with ModelOpt/TensorRT-LLM directly)",
        )
    files, weight_map = _weight_files(path)
    producer = " ".join(str(v) for v in (producer_info.get("name"), producer_info.get("version")) if v) or "modelopt"
    return CheckpointFormat(
        kind=_MODELOPT_ALGOS[algo],
        path=path,
        config=config,
        weight_files=files,
        weight_map=weight_map,
        producer=producer,
        quant_algo=algo,
        group_size=details.get("group_size"),
        exclude_modules=list(details.get("exclude_modules") or quant_config.get("ignore") or []),
    )


def _compressed_tensors_format(path: Path, config: dict[str, Any], quant_config: dict[str, Any]) -> CheckpointFormat:
    groups = quant_config.get("config_groups") or {}
    formats = {quant_config.get("format")} | {group.get("format") for group in groups.values()}
    formats.discard(None)
    known = [_CT_FORMATS[name] for name in formats if name in _CT_FORMATS]
    if len(formats) != 1 or not known:
        raise UserError(
            str(path / "config.json"),
            f"compressed-tensors format(s) {sorted(formats) or 'none'} not supported",
            "supported: a single 'nvfp4-pack-quantized' or 'float-quantized' format",
        )
    group_sizes = [g.get("weights", {}).get("group_size") for g in groups.values()]
    files, weight_map = _weight_files(path)
    return CheckpointFormat(
        kind=known[0],
        path=path,
        config=config,
        weight_files=files,
        weight_map=weight_map,
        producer=f"compressed-tensors {quant_config.get('version', '')}".strip(),
        quant_algo=next(iter(formats)),
        group_size=next((size for size in group_sizes if size), None),
        exclude_modules=list(quant_config.get("ignore") or []),
    )


def detect_format(path: str | Path) -> CheckpointFormat:
    path = Path(path)
    if not path.is_dir():
        raise UserError(str(path), "is not a directory", "pass the checkpoint directory (the one holding config.json)")
    if not (path / "config.json").is_file():
        raise UserError(str(path), "has no config.json", "pass a Hugging Face checkpoint directory")
    config = read_json(path / "config.json")
    quant_config = config.get("quantization_config") or {}
    method = quant_config.get("quant_method")
    if method == "modelopt" or (not quant_config and (path / "hf_quant_config.json").exists()):
        return _modelopt_format(path, config, quant_config)
    if method == "compressed-tensors":
        return _compressed_tensors_format(path, config, quant_config)
    if method:
        raise UserError(
            str(path / "config.json"),
            f"quantization method {method!r} is not supported by this loader",
            "use a ModelOpt (NVFP4/FP8), compressed-tensors (NVFP4/FP8) or unquantized checkpoint",
        )
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32").replace("torch.", "")
    files, weight_map = _weight_files(path)
    return CheckpointFormat(_PLAIN_DTYPES.get(dtype, FormatKind.BF16), path, config, files, weight_map)
