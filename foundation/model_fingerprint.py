"""What a model folder holds, cheaply: the key that resumable state (studies, directions, layerwise
calibration checkpoints) is kept under, so that a model replaced at the same path never resumes stale work.

Per file (config.json, the safetensors index, every weights file): its size,
its modification time and a SHA-256 of its content where that is cheap
(config and index files, the JSON header of a safetensors file: names,
dtypes, shapes, offsets). Hashing every weight byte would cost minutes on a
400B model; a replaced file gets a new modification time (``cp -p`` or
``rsync -a`` of different weights of the same shapes is the one blind spot),
and a copy made without preserving times merely starts over, never resumes
stale state. A Hub id has no folder to look at: ``None``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
HASHED_FILES = ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


def _safetensors_header_sha256(path: Path) -> str:
    with path.open("rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if not 0 < length <= _MAX_HEADER:
            return "unreadable-header"
        return hashlib.sha256(handle.read(length)).hexdigest()


def _describe(path: Path) -> str:
    stat = path.stat()
    parts = [f"size {stat.st_size}", f"mtime_ns {stat.st_mtime_ns}"]
    if path.name in HASHED_FILES:
        parts.append("sha256 " + hashlib.sha256(path.read_bytes()).hexdigest())
    elif path.suffix == ".safetensors":
        parts.append("header sha256 " + _safetensors_header_sha256(path))
    return ", ".join(parts)


def model_fingerprint(model: str | Path) -> dict[str, str] | None:
    """``file name -> description`` for a local model folder; None for anything else (a Hub id)."""
    folder = Path(model).expanduser()
    if not folder.is_dir():
        return None
    files = sorted(p for p in folder.iterdir() if p.is_file() and (p.name in HASHED_FILES or p.suffix in WEIGHT_SUFFIXES))
    return {path.name: _describe(path) for path in files}


def fingerprint_digest(fingerprint: dict[str, str] | None) -> str | None:
    if fingerprint is None:
        return None
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


def changed_files(recorded: dict[str, str], current: dict[str, str]) -> list[str]:
    """Files added, removed or changed between two fingerprints, each with what changed."""
    changes = []
    for name in sorted(set(recorded) | set(current)):
        if name not in current:
            changes.append(f"{name} removed")
        elif name not in recorded:
            changes.append(f"{name} added")
        elif recorded[name] != current[name]:
            before = dict(part.rsplit(" ", 1) for part in recorded[name].split(", ") if " " in part)
            after = dict(part.rsplit(" ", 1) for part in current[name].split(", ") if " " in part)
            differ = [key for key in after if before.get(key) != after[key]] or ["content"]
            changes.append(f"{name} changed ({', '.join(differ)})")
    return changes
