"""ModelOpt NVFP4 <-> compressed-tensors NVFP4, shard by shard, so either vLLM backend can serve it.

Only names, the reciprocal per-tensor scales and the config change; codes and
block scales are copied byte for byte. compressed-tensors global scales are
written with shape [1]: compressed-tensors' compressed-mode loader rejects the
0-d scalars its own converter writes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from checkpoint_formats import compressed_tensors as ct
from checkpoint_formats.detect import (
    INDEX_FILE,
    CheckpointFormat,
    FormatKind,
    detect_format,
)
from checkpoint_formats.reader import CheckpointReader
from checkpoint_formats.writer import StreamingCheckpointWriter
from foundation.atomic_output import atomic_output_dir
from foundation.errors import UserError
from foundation.output_guard import check_output_location

TARGETS = ("compressed-tensors", "modelopt")
PRODUCER = {"name": "quant-abliterate convert", "version": "0.1.0"}
_WEIGHTS_FILES = {INDEX_FILE, "config.json", "hf_quant_config.json"}


def _nvfp4_args(dynamic, observer) -> dict:
    return {
        "num_bits": 4,
        "type": "float",
        "symmetric": True,
        "group_size": 16,
        "strategy": "tensor_group",
        "block_structure": None,
        "dynamic": dynamic,
        "actorder": None,
        "scale_dtype": "torch.float8_e4m3fn",
        "zp_dtype": None,
        "observer": observer,
        "observer_kwargs": {},
    }


def ct_quantization_config(ignore: list[str], activations: bool) -> dict:
    """The ``quantization_config`` compressed-tensors writes for NVFP4 (or NVFP4A16)."""
    group = {
        "targets": ["Linear"],
        "weights": _nvfp4_args(False, None),
        "input_activations": _nvfp4_args("local", "static_minmax") if activations else None,
        "output_activations": None,
        "format": ct.NVFP4_FORMAT,
    }
    return {
        "config_groups": {"config_group_0": group},
        "quant_method": "compressed-tensors",
        "kv_cache_scheme": None,
        "format": ct.NVFP4_FORMAT,
        "quantization_status": "compressed",
        "global_compression_ratio": None,
        "ignore": list(ignore),
    }


def modelopt_quantization_configs(ignore: list[str], activations: bool) -> tuple[dict, dict]:
    """(``hf_quant_config.json``, ``config.json``'s ``quantization_config``) as ModelOpt writes them."""
    algo = "NVFP4" if activations else "W4A16_NVFP4"
    hf_quant = {
        "producer": PRODUCER,
        "quantization": {
            "quant_algo": algo,
            "kv_cache_quant_algo": None,
            "group_size": 16,
            "exclude_modules": list(ignore),
        },
    }
    args = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}
    group = {"weights": args, "targets": ["Linear"]}
    if activations:
        group = {"input_activations": args, **group}
    in_config = {
        "config_groups": {"group_0": group},
        "ignore": list(ignore),
        "quant_algo": algo,
        "producer": PRODUCER,
        "quant_method": "modelopt",
    }
    return hf_quant, in_config


def _converted_tensors(reader: CheckpointReader, name: str, to_ct: bool) -> list[tuple[str, torch.Tensor]]:
    prefix, _, suffix = name.rpartition(".")
    nvfp4_module = f"{prefix}.weight_scale_2" in reader if to_ct else f"{prefix}.weight_packed" in reader
    tensor = reader.get(name)
    if not nvfp4_module:
        return [(name, tensor)]
    table = ct.MODELOPT_TO_CT if to_ct else ct.CT_TO_MODELOPT
    if suffix not in table:
        return [(name, tensor)]
    new_suffix, inverted = table[suffix]
    if inverted:
        tensor = ct.reciprocal(tensor).reshape(1 if to_ct else ())
    return [(f"{prefix}.{new_suffix}", tensor)]


def _check_source(fmt: CheckpointFormat, to: str) -> bool:
    """Returns whether activations are quantized (NVFP4 W4A4 vs weight-only)."""
    allowed = (
        {FormatKind.MODELOPT_NVFP4, FormatKind.MODELOPT_W4A16_NVFP4}
        if to == "compressed-tensors"
        else {FormatKind.CT_NVFP4}
    )
    if fmt.kind not in allowed:
        raise UserError(
            str(fmt.path),
            f"is {fmt.kind.value}; converting to {to} needs {' or '.join(k.value for k in sorted(allowed, key=str))}",
            "only NVFP4 (W4A4 or weight-only, group 16) converts between ModelOpt and compressed-tensors",
        )
    if (fmt.group_size or 16) != 16:
        raise UserError(str(fmt.path), f"has NVFP4 group size {fmt.group_size}; only 16 converts")
    return fmt.activations_quantized


def convert_checkpoint(src: str | Path, dst: str | Path, *, to: str, overwrite: bool = False) -> Path:
    """Convert ``src`` into a new directory ``dst``; ``to`` is "compressed-tensors" or "modelopt"."""
    if to not in TARGETS:
        raise UserError("--to", f"unknown target {to!r}", f"use one of {', '.join(TARGETS)}")
    check_output_location(dst, {"SRC": src}, output_flag="DST")  # --overwrite must never delete the source
    fmt = detect_format(src)
    activations = _check_source(fmt, to)
    to_ct = to == "compressed-tensors"
    shard_bytes = max(path.stat().st_size for path in fmt.weight_files) + 1024
    with atomic_output_dir(dst, overwrite) as out, CheckpointReader(fmt) as reader:
        writer = StreamingCheckpointWriter(out, max_shard_bytes=shard_bytes)
        for _, names in reader.iter_shards():
            for name in names:
                for new_name, tensor in _converted_tensors(reader, name, to_ct):
                    writer.add(new_name, tensor)
        writer.close({"converted_by": PRODUCER["name"]})
        for item in Path(fmt.path).iterdir():
            if item.is_file() and item.suffix != ".safetensors" and item.name not in _WEIGHTS_FILES:
                shutil.copy2(item, out / item.name)
        config = dict(fmt.config)
        if to_ct:
            config["quantization_config"] = ct_quantization_config(fmt.exclude_modules, activations)
        else:
            hf_quant, config["quantization_config"] = modelopt_quantization_configs(fmt.exclude_modules, activations)
            (out / "hf_quant_config.json").write_text(json.dumps(hf_quant, indent=4) + "\n")
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return Path(dst)
