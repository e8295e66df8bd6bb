"""What a produced artifact records about the software and machine that made it."""

from __future__ import annotations

import platform
import resource
import sys
from importlib import metadata

LIBRARIES = ("torch", "transformers", "nvidia-modelopt", "accelerate", "safetensors", "llmcompressor",
             "compressed-tensors", "quant-abliterate", "peft", "optuna", "datasets", "torchao")


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def peak_memory_bytes() -> dict[str, int]:
    """Peak resident CPU memory of this process, and peak allocated CUDA memory per GPU."""
    import torch

    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peaks = {"cpu_rss": max_rss if sys.platform == "darwin" else max_rss * 1024}
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            peaks[f"cuda:{index}"] = int(torch.cuda.max_memory_allocated(index))
    return peaks
