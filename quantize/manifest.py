"""``quantize_manifest.json``: what went into a checkpoint, so it can be reproduced.

Two runs with the same manifest fields (source revision, mix hash, token-id
hash, format, library versions) produce the same checkpoint; the timings and
peak memory are there to size the next run.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from foundation.provenance import library_versions, peak_memory_bytes

MANIFEST_NAME = "quantize_manifest.json"
def source_description(input_model: str, revision: str | None, model_config) -> dict[str, Any]:
    local = Path(input_model).exists()
    return {
        "model": str(Path(input_model).resolve()) if local else input_model,
        "local": local,
        "revision": revision,
        "commit_hash": getattr(model_config, "_commit_hash", None),
        "architectures": list(getattr(model_config, "architectures", None) or []),
    }


def calibration_description(calibration_set, batch_size: int) -> dict[str, Any]:
    return {
        "mix_sha256": calibration_set.mix_sha256,
        "token_ids_sha256": calibration_set.token_ids_sha256,
        "samples": len(calibration_set.samples),
        "tokens": sum(len(sample) for sample in calibration_set.samples),
        "batch_size": batch_size,
        "settings": _jsonable(getattr(calibration_set, "settings", None)),
        "per_dataset": _jsonable(getattr(calibration_set, "per_dataset", None)),
    }


def build_manifest(
    *,
    source: dict[str, Any],
    mix_path: str,
    calibration: dict[str, Any],
    quantization: dict[str, Any],
    timings_s: dict[str, float],
    placement: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "producer": "quant-abliterate quantize",
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "calibration": {"mix_file": str(mix_path), **calibration},
        "quantization": quantization,
        "libraries": library_versions(),
        "timings_s": {name: round(seconds, 3) for name, seconds in timings_s.items()},
        "peak_memory_bytes": peak_memory_bytes(),
        "placement": placement,
    }


def write_manifest(directory: Path, manifest: dict[str, Any]) -> Path:
    path = Path(directory) / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return path


def _jsonable(value: Any) -> Any:
    """Best effort: pydantic models, dataclasses and mappings become plain JSON."""
    if value is None:
        return None
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if hasattr(value, "__dataclass_fields__"):
        import dataclasses

        return _jsonable(dataclasses.asdict(value))
    try:
        return json.loads(json.dumps(value, default=str))
    except (TypeError, ValueError):
        return str(value)
