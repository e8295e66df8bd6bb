"""``quant-abliterate inspect PATH``: format, producer, and what each kind of module costs.

Reads only safetensors headers, so it is instant on any size of checkpoint.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict, dataclass

import torch

from checkpoint_formats.detect import detect_format
from checkpoint_formats.health import (
    describe_names,
    expert_scale_sanity,
    missing_activation_scales,
)
from checkpoint_formats.layout import QUANTIZATION_STATE_SUFFIXES
from checkpoint_formats.reader import CheckpointReader
from foundation.dtypes import SHORT_NAMES


@dataclass
class ModuleTypeRow:
    module_type: str  # e.g. "layers.*.self_attn.q_proj"
    count: int
    format: str  # "nvfp4", "fp8", "bf16", ... (joined when mixed)
    bytes: int
    bf16_bytes: int  # what the same weights cost in bf16


def _split(name: str) -> tuple[str, str]:
    prefix, _, suffix = name.rpartition(".")
    return (prefix, suffix) if prefix else (name, "")


def _module_type(prefix: str) -> str:
    return re.sub(r"\.\d+(?=\.|$)", ".*", prefix.removeprefix("model."))


def _tensor_format(reader: CheckpointReader, prefix: str, dtype: torch.dtype) -> str:
    if f"{prefix}.weight_packed" in reader or (dtype == torch.uint8 and f"{prefix}.weight_scale_2" in reader):
        return "nvfp4"
    return SHORT_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def summarize(reader: CheckpointReader) -> list[ModuleTypeRow]:
    """One row per module type; quantization scales count towards their module's bytes."""
    rows: dict[str, dict] = {}
    modules_seen: dict[str, set[str]] = {}
    for name in reader.names():
        dtype, shape = reader.metadata(name)
        prefix, suffix = _split(name)
        numel = 1
        for dim in shape:
            numel *= dim
        size = numel * (torch.empty((), dtype=dtype).element_size() if isinstance(dtype, torch.dtype) else 1)
        key = _module_type(prefix)
        row = rows.setdefault(key, {"formats": set(), "bytes": 0, "bf16_bytes": 0})
        row["bytes"] += size
        if suffix in QUANTIZATION_STATE_SUFFIXES:
            continue
        fmt = _tensor_format(reader, prefix, dtype)
        row["formats"].add(fmt)
        row["bf16_bytes"] += numel * 2 * (2 if fmt == "nvfp4" else 1)
        modules_seen.setdefault(key, set()).add(prefix)
    return [
        ModuleTypeRow(
            key,
            len(modules_seen.get(key, ())),
            "+".join(sorted(row["formats"])) or "-",
            row["bytes"],
            row["bf16_bytes"],
        )
        for key, row in sorted(rows.items())
    ]


def _human(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    raise AssertionError


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="quant-abliterate inspect", description="Show a checkpoint's format and size per module type."
    )
    parser.add_argument("path", help="checkpoint directory")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    fmt = detect_format(args.path)
    with CheckpointReader(fmt) as reader:
        rows = summarize(reader)
        missing_scales = missing_activation_scales(fmt, reader)
        expert_scales = expert_scale_sanity(fmt, reader)
    total, bf16_total = sum(r.bytes for r in rows), sum(r.bf16_bytes for r in rows)
    if args.json:
        print(
            json.dumps(
                {
                    "format": fmt.kind.value,
                    "producer": fmt.producer,
                    "quant_algo": fmt.quant_algo,
                    "total_bytes": total,
                    "bf16_bytes": bf16_total,
                    "module_types": [asdict(r) for r in rows],
                    "missing_input_scales": missing_scales,
                    "expert_scales": expert_scales,
                },
                indent=2,
            )
        )
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]{fmt.path}[/]: {fmt.describe()}; {len(fmt.weight_files)} safetensors file(s)")
    table = Table("module type", "count", "format", "bytes", "bf16 bytes")
    for r in rows:
        table.add_row(r.module_type, str(r.count), r.format, _human(r.bytes), _human(r.bf16_bytes))
    console.print(table)
    ratio = bf16_total / total if total else 0.0
    console.print(f"total {_human(total)} vs {_human(bf16_total)} in bf16 ({ratio:.2f}x smaller)")
    if expert_scales is not None:
        unmeasured = expert_scales["zero_or_default_input_scale"] or expert_scales["zero_or_default_weight_scale_2"]
        examples = expert_scales["examples"]["input_scale"] or expert_scales["examples"]["weight_scale_2"]
        console.print(f"{'[yellow]experts:[/]' if unmeasured else 'experts:'} {expert_scales['experts']} quantized; "
                      f"{expert_scales['zero_or_default_input_scale']} with a zero or default input_scale, "
                      f"{expert_scales['zero_or_default_weight_scale_2']} with a zero weight_scale_2"
                      + (f" (e.g. {', '.join(examples)}): re-quantize with --calib_all_experts" if unmeasured else ""))
    if missing_scales:  # inspect describes; verify fails such a checkpoint
        console.print(f"[red]broken:[/] {len(missing_scales)} quantized Linear(s) lack the input_scale their format needs "
                      f"({describe_names(missing_scales)}); run quant-abliterate verify {fmt.path}")
    return 0
