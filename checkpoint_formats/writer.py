"""Write a checkpoint shard by shard while its tensors are still being produced.

Stage 2's re-export merges and re-quantizes one module at a time; this writer
keeps only the current shard in memory and flushes it when it would exceed
``max_shard_bytes``. Shard names follow Hugging Face (``model-00001-of-00003``)
and are fixed at ``close`` when the count is known; a single shard is written
as ``model.safetensors`` without an index, as ModelOpt does. Write into a
directory from ``foundation.atomic_output.atomic_output_dir`` so an interrupted
export leaves nothing behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from checkpoint_formats.detect import INDEX_FILE, SINGLE_FILE

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class StreamingCheckpointWriter:
    def __init__(self, out_dir: str | Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._seen: set[str] = set()
        self.total_bytes = 0
        self._closed = False

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._closed:
            raise RuntimeError("writer is closed")
        if name in self._seen:
            raise ValueError(f"tensor {name!r} was added twice")
        self._seen.add(name)
        size = tensor_bytes(tensor)
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        # contiguous CPU copy that owns its storage: views of a larger tensor
        # would make safetensors write the whole base tensor
        self._pending[name] = tensor.detach().to("cpu").contiguous().clone()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        if not self._pending:
            return
        path = self.out_dir / f".shard-{len(self._shards) + 1:05d}.safetensors"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        self._shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self, metadata: dict[str, str] | None = None) -> list[Path]:
        """Flush, name the shards, write the index; returns the shard paths."""
        self._flush()
        self._closed = True
        count = len(self._shards)
        if count == 0:
            raise ValueError("no tensors were added")
        if count == 1:
            final = self.out_dir / SINGLE_FILE
            self._shards[0][0].rename(final)
            return [final]
        weight_map: dict[str, str] = {}
        finals = []
        for number, (path, names) in enumerate(self._shards, start=1):
            final = self.out_dir / f"model-{number:05d}-of-{count:05d}.safetensors"
            path.rename(final)
            finals.append(final)
            weight_map.update(dict.fromkeys(names, final.name))
        index = {
            "metadata": {"total_size": self.total_bytes, **(metadata or {})},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return finals
