"""Quantized checkpoint formats: bit-exact NVFP4 / FP8 codecs, readers, writers and a loader.

Pure torch (no ModelOpt import), usable on CPU and GPU. Entry points:

- ``load_checkpoint(path, dequantize=..., device_map=...)`` -> ``(model, CheckpointFormat)``
- ``detect_format(path)``, ``CheckpointReader(path)``, ``StreamingCheckpointWriter(dir)``
- ``nvfp4.quantize_weight`` / ``nvfp4.dequantize_weight`` / ``nvfp4.fake_quantize_activation``
- ``convert_checkpoint(src, dst, to="compressed-tensors" | "modelopt")``

Submodules are imported lazily so ``import quantize.formats.nvfp4`` stays light.
"""

from __future__ import annotations

_EXPORTS = {
    "load_checkpoint": "quantize.formats.loader",
    "detect_format": "quantize.formats.detect",
    "CheckpointFormat": "quantize.formats.detect",
    "FormatKind": "quantize.formats.detect",
    "CheckpointReader": "quantize.formats.reader",
    "StreamingCheckpointWriter": "quantize.formats.writer",
    "convert_checkpoint": "quantize.formats.convert",
    "NVFP4Linear": "quantize.formats.modules",
    "FP8Linear": "quantize.formats.modules",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(name)
