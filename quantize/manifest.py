"""``quantize_manifest.json``: what went into a checkpoint, so it can be reproduced.

Two runs with the same manifest fields (source revision, mix hash, token-id
hash, format, library versions) produce the same checkpoint; the timings and
peak memory are there to size the next run.

``schema_version`` is the layout of this file: a manifest without it (written
before the field existed) is version 1; one newer than this code knows is
refused. ``read_manifest`` is its one reader (the export's ``--recalibrate``
reuses the recorded settings through it).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from foundation.errors import UserError
from foundation.provenance import library_versions, peak_memory_bytes
from foundation.validation import user_error_from_validation

MANIFEST_NAME = "quantize_manifest.json"
SCHEMA_VERSION = 1  # the version this code writes and the newest it reads


class _Section(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class RecordedCalibration(_Section):
    mix_file: str | None = None
    batch_size: int | None = None
    settings: dict[str, Any] | None = None


class RecordedQuantization(_Section):
    format: str | None = None
    kv_cache: str | None = None
    skipped: dict[str, list[str]] | list[str] | None = None  # glob -> modules it matched


class QuantizeManifest(BaseModel):
    """The fields of ``quantize_manifest.json`` that are read back; the rest (timings, libraries) is for people."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    schema_version: int = 1
    producer: str | None = None
    source: dict[str, Any] = {}
    calibration: RecordedCalibration = RecordedCalibration()
    quantization: RecordedQuantization = RecordedQuantization()


def read_manifest(directory: str | Path) -> QuantizeManifest | None:
    """The manifest of a stage-1 checkpoint, typed; None when the directory has none (not made by stage 1)."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        where = f"{path}:{error.lineno}:{error.colno}" if isinstance(error, json.JSONDecodeError) else str(path)
        raise UserError(where, f"not valid JSON ({getattr(error, 'msg', error)})",
                        "restore the file, or re-run the quantize stage to rewrite it") from None
    if not isinstance(data, dict):
        raise UserError(str(path), "not a quantize manifest (not a JSON object)", "re-run the quantize stage to rewrite it")
    version = data.get("schema_version", 1)
    if not isinstance(version, int) or version < 1:
        raise UserError(str(path), f"unreadable schema_version {version!r}", "re-run the quantize stage to rewrite it")
    if version > SCHEMA_VERSION:
        raise UserError(str(path), f"schema_version {version} is newer than this quant-abliterate reads (up to {SCHEMA_VERSION})",
                        "upgrade quant-abliterate, or re-run the quantize stage with this version")
    try:
        return QuantizeManifest.model_validate(data)
    except ValidationError as error:
        raise user_error_from_validation(error, lambda problem: (
            f"{path}: {problem.field}", f"{problem.message} (got {problem.input!r})",
            "restore the file, or re-run the quantize stage to rewrite it")) from None

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
        "schema_version": SCHEMA_VERSION,
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
