"""The full-precision weights a merge starts from, one tensor at a time.

Either the original model (``--base_model``, the better source: no
quantization error under the edit) or, when only the searched checkpoint is at
hand, its dequantized weights. Reading goes through the formats package
(``CheckpointReader``, ``find_quantized``, ``read_dequantized``), so every
checkpoint our loader reads (ModelOpt NVFP4 / W4A16 / FP8, compressed-tensors
NVFP4 / FP8, plain) can be a merge source. Seen through this class, a quantized
Linear ``P`` is one full-precision tensor ``P.weight``; its scales, and
KV-cache scales, are not weights of the full-precision model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from checkpoint_formats.detect import detect_format
from checkpoint_formats.layout import KV_CACHE_SUFFIXES, PRIMARY_WEIGHT_SUFFIXES
from checkpoint_formats.quantized_tensors import (
    QuantizedSource,
    find_quantized,
    read_dequantized,
)
from checkpoint_formats.reader import CheckpointReader


class FullPrecisionSource:
    def __init__(self, directory: str | Path, *, dtype: torch.dtype = torch.bfloat16) -> None:
        self.directory = Path(directory)
        self.format = detect_format(self.directory)
        self.reader = CheckpointReader(self.format)
        self.dtype = dtype  # of dequantized weights
        self.quantized: dict[str, QuantizedSource] = {}  # module prefix -> how it is stored
        if self.format.kind.is_quantized:
            for name in self.reader.names():
                if name.endswith(PRIMARY_WEIGHT_SUFFIXES):
                    prefix = name.rpartition(".")[0]
                    source = find_quantized(self.reader, prefix)
                    if source is not None:
                        self.quantized[prefix] = source
        primaries = {f"{prefix}.weight_packed" if s.dialect == "compressed-tensors" and s.scheme == "nvfp4"
                     else f"{prefix}.weight" for prefix, s in self.quantized.items()}
        self._hidden = {name for s in self.quantized.values() for name in s.names()} - primaries

    @property
    def is_dequantized(self) -> bool:
        return self.format.kind.is_quantized

    @property
    def description(self) -> str:
        if not self.is_dequantized:
            return f"full-precision weights of {self.directory}"
        dtype = str(self.dtype).removeprefix("torch.")
        return f"weights of the {self.format.describe()} checkpoint {self.directory}, dequantized to {dtype}"

    @property
    def shards(self) -> list[Path]:
        return list(self.format.weight_files)

    def stored_names(self, shard: Path) -> list[str]:
        return next(names for path, names in self.reader.iter_shards() if path == shard)

    def names_in(self, shard: Path) -> list[str]:
        """Full-precision tensor names stored in one shard (quantization scales left out)."""
        names = []
        for name in self.stored_names(shard):
            if name in self._hidden or name.endswith(KV_CACHE_SUFFIXES):
                continue
            names.append(name.removesuffix("_packed") if name.endswith(".weight_packed") else name)
        return names

    @property
    def names(self) -> set[str]:
        return {name for shard in self.shards for name in self.names_in(shard)}

    def logical_shape(self, name: str) -> tuple[int, ...]:
        """Shape of the full-precision tensor (an NVFP4 weight stores two values per byte)."""
        source = self.quantized.get(name.removesuffix(".weight")) if name.endswith(".weight") else None
        if source is None:
            return self.reader.metadata(name)[1]
        stored = self.reader.metadata(source.names()[0])[1]
        return (*stored[:-1], stored[-1] * 2) if source.scheme == "nvfp4" else stored

    @contextlib.contextmanager
    def shard(self, shard: Path) -> Iterator[None]:
        """Read one shard's tensors inside this block; its memory map is released on exit."""
        try:
            yield
        finally:
            self.reader.close()

    def raw(self, name: str) -> torch.Tensor:
        """A tensor exactly as stored."""
        return self.reader.get(name)

    def get(self, name: str) -> torch.Tensor:
        """The full-precision value: as stored, or dequantized."""
        source = self.quantized.get(name.removesuffix(".weight")) if name.endswith(".weight") else None
        if source is None:
            return self.reader.get(name)
        return read_dequantized(self.reader, source, self.dtype)
