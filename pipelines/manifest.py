"""``manifest.json``: what a pipeline run produced, from what, how, and how well.

The manifest is also the runner's memory between runs: a stage whose
fingerprint (its full validated settings + the hashes of its inputs) matches a completed record
is skipped; a record left ``running`` or ``failed`` is redone. It is rewritten
atomically after every change so a killed run never leaves it half-written.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from foundation.provenance import library_versions  # noqa: F401 - one list of tracked libraries for all manifests

MANIFEST_NAME = "manifest.json"


def file_sha256(path: Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def directory_hashes(directory: Path) -> dict[str, str]:
    """sha256 of every regular file below ``directory``, keyed by relative path."""
    directory = Path(directory)
    return {
        str(path.relative_to(directory)): file_sha256(path)
        for path in sorted(directory.rglob("*"))
        if path.is_file() and not path.name.startswith(".")
    }


def combined_hash(hashes: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()


OUTPUT_DIR = "$OUTPUT_DIR"


def settings_used(settings: Any, output_dir: Path) -> dict[str, Any]:
    """A stage's full validated settings as JSON (defaults included), as the manifest records and hashes them.

    Paths the pipeline wired under its own output directory are written relative to it
    (``$OUTPUT_DIR/quantize/checkpoint``), so a moved output directory is still up to date.
    """
    data = settings.model_dump(mode="json") if hasattr(settings, "model_dump") else dict(settings)
    root = str(Path(output_dir))

    def relative(value: Any) -> Any:
        if isinstance(value, str) and (value == root or value.startswith(root + os.sep)):
            return OUTPUT_DIR + value[len(root):]
        if isinstance(value, dict):
            return {key: relative(item) for key, item in value.items()}
        if isinstance(value, list):
            return [relative(item) for item in value]
        return value

    return relative(data)


def fingerprint(stage: str, settings: dict[str, Any], input_hash: str) -> str:
    """Hash of the settings actually used (``settings_used``) and the stage's input."""
    payload = json.dumps({"stage": stage, "settings": settings, "input": input_hash}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


class Manifest:
    """A JSON document on disk, saved atomically after each update."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        self.data = data

    @classmethod
    def open(cls, output_dir: Path) -> "Manifest":
        path = Path(output_dir) / MANIFEST_NAME
        data = json.loads(path.read_text()) if path.is_file() else {}
        data.setdefault("stages", {})
        return cls(path, data)

    @property
    def stages(self) -> dict[str, dict[str, Any]]:
        return self.data["stages"]

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(f".json.{os.getpid()}.tmp")  # unique per process (S14)
        temporary.write_text(json.dumps(self.data, indent=2, sort_keys=False, default=str) + "\n")
        os.replace(temporary, self.path)

    def is_complete(self, stage: str, stage_fingerprint: str, stage_dir: Path) -> bool:
        record = self.stages.get(stage)
        return bool(
            record
            and record.get("status") == "complete"
            and record.get("fingerprint") == stage_fingerprint
            and stage_dir.is_dir()
        )


def command_line() -> str:
    return " ".join([Path(sys.executable).name, *sys.argv])
