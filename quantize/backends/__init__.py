"""How a stage-1 backend calibrates and writes a checkpoint; everything around it is ``quantize.stage``'s.

A backend says where it wants the model loaded, calibrates it on the shared
calibration set with the shared skip list, and writes its checkpoint into a
directory it is given. Loading, the skip table, the atomic output, the
tokenizer copy, the manifest and the offload cleanup are done once, in
``stage.run_quantize``, for every backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from rich.console import Console

from quantize.settings import QuantizeSettings
from quantize.skip_layers import SkipMatch


class Backend(Protocol):
    name: str
    # False: load onto CPU (and disk); the backend onloads layers to the GPU itself.
    loads_on_gpu: bool

    def calibrate(self, model, tokenizer, calibration_set, skipped: list[SkipMatch], settings: QuantizeSettings,
                  console: Console) -> Any:
        """Quantize ``model`` in place (or return the quantized model)."""

    def export(self, model, staging: Path, settings: QuantizeSettings) -> dict[str, Any]:
        """Write the checkpoint into ``staging``; returns the manifest's ``quantization`` fields."""


def backend_for(name: str) -> Backend:
    if name == "llmcompressor":
        from quantize.backends.llmcompressor import LLMCompressorBackend

        return LLMCompressorBackend()
    from quantize.backends.modelopt import ModelOptBackend

    return ModelOptBackend()
