"""Lazy, shard-by-shard access to the tensors of a safetensors checkpoint.

Nothing is read until asked for, so the streaming merge and the loader hold
at most one tensor (plus the OS page cache of a memory map) at a time. Every
safetensors failure (corrupt header, truncated file) becomes a ``UserError``
naming the file. With a ``naming`` (``checkpoint_formats.naming``) tensors are
named as the transformers model names them (NemotronH's ``backbone.`` as
``model.``, Mixtral's ``block_sparse_moe`` as ``mlp``), which is what the
loader matches against; the merge and re-export read the names as stored.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from checkpoint_formats.detect import CheckpointFormat, detect_format
from checkpoint_formats.naming import IDENTITY, CheckpointNaming
from foundation.errors import UserError

_FIX = "the file is damaged or incomplete: copy it again from the original checkpoint"


class CheckpointReader:
    """``names()``, ``get(name)``, ``iter_shards()`` over a checkpoint's safetensors files.

    With a ``naming`` (``checkpoint_formats.naming``) every name is seen as the
    transformers model spells it (``model.`` for a NemotronH ``backbone.``), so the
    loader's lookups need no translation of their own.
    """

    def __init__(self, checkpoint: CheckpointFormat | str | Path, naming: CheckpointNaming = IDENTITY) -> None:
        self.format = checkpoint if isinstance(checkpoint, CheckpointFormat) else detect_format(checkpoint)
        self.naming = naming
        self._handles: dict[Path, object] = {}
        self._location: dict[str, Path] = {}
        self._disk_name: dict[str, str] = {}
        for shard in self.format.weight_files:
            for disk_name in self._open(shard).keys():
                name = naming.to_model(disk_name)
                self._location[name] = shard
                self._disk_name[name] = disk_name
        if self.format.weight_map is not None:
            missing = [name for name in self.format.weight_map if naming.to_model(name) not in self._location]
            if missing:
                raise UserError(
                    str(self.format.path),
                    f"{len(missing)} tensor(s) listed in the index are in no shard, e.g. {missing[0]}",
                    _FIX,
                )

    def _open(self, shard: Path):
        if shard not in self._handles:
            try:
                self._handles[shard] = safe_open(str(shard), framework="pt", device="cpu")
            except (SafetensorError, OSError, ValueError) as error:
                raise UserError(str(shard), f"cannot be opened as safetensors ({error})", _FIX) from error
        return self._handles[shard]

    def names(self) -> list[str]:
        return list(self._location)

    def __contains__(self, name: str) -> bool:
        return name in self._location

    def shard_of(self, name: str) -> Path:
        return self._location[name]

    def metadata(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """dtype and shape without reading the data."""
        tensor_slice = self._open(self._location[name]).get_slice(self._disk_name[name])
        dtype_name = tensor_slice.get_dtype()
        return _SAFETENSORS_DTYPES.get(dtype_name, dtype_name), tuple(tensor_slice.get_shape())

    def get(self, name: str) -> torch.Tensor:
        if name not in self._location:
            raise UserError(str(self.format.path), f"has no tensor {name!r}", "check that the checkpoint is complete")
        shard = self._location[name]
        try:
            return self._open(shard).get_tensor(self._disk_name[name])
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise UserError(str(shard), f"tensor {name!r} cannot be read ({error})", _FIX) from error

    def iter_shards(self) -> Iterator[tuple[Path, list[str]]]:
        by_shard: dict[Path, list[str]] = {}
        for name, shard in self._location.items():
            by_shard.setdefault(shard, []).append(name)
        for shard in self.format.weight_files:
            yield shard, by_shard.get(shard, [])

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor once, shard by shard; each shard's handle is dropped after use."""
        for shard, names in self.iter_shards():
            for name in names:
                yield name, self.get(name)
            self._handles.pop(shard, None)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


_SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
