"""Quantized checkpoint formats: bit-exact NVFP4 / FP8 codecs, readers, writers and a loader.

Pure torch (no ModelOpt import), usable on CPU and GPU. Entry points:

- ``load_checkpoint(path, dequantize=..., device_map=...)`` -> ``(model, CheckpointFormat)``
- ``detect_format(path)``, ``CheckpointReader(path)``, ``StreamingCheckpointWriter(dir)``
- ``nvfp4.quantize_weight`` / ``nvfp4.dequantize_weight`` / ``nvfp4.fake_quantize_activation``
- ``convert_checkpoint(src, dst, to="compressed-tensors" | "modelopt")``

Submodules are imported lazily so ``import checkpoint_formats.nvfp4`` stays light.
"""

from __future__ import annotations

_EXPORTS = {
    "load_checkpoint": "checkpoint_formats.loader",
    "detect_format": "checkpoint_formats.detect",
    "CheckpointFormat": "checkpoint_formats.detect",
    "FormatKind": "checkpoint_formats.detect",
    "CheckpointReader": "checkpoint_formats.reader",
    "StreamingCheckpointWriter": "checkpoint_formats.writer",
    "convert_checkpoint": "checkpoint_formats.convert",
    "NVFP4Linear": "checkpoint_formats.modules",
    "FP8Linear": "checkpoint_formats.modules",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(name)
