"""Is a checkpoint whole? Two checks that logits on one prompt cannot make.

* ``missing_activation_scales``: a ModelOpt checkpoint that quantizes
  activations (NVFP4 W4A4, W4A8, FP8) stores a calibrated ``input_scale`` per
  quantized Linear; one calibrated on no data has none, and servers then run
  with an uninitialized scale. Weight-only W4A16 needs none (decided from the
  ``quant_algo`` of hf_quant_config.json / config.json).
* ``nonfinite_tensors``: NaN / inf anywhere in the weights, also where the
  prompt at hand never looks (an embedding row of a token it does not use).

Both read tensors by name only (headers, then one tensor at a time), so they
work on a checkpoint of any size, and on a loaded model's parameters alike.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from checkpoint_formats.detect import CheckpointFormat, FormatKind
from checkpoint_formats.reader import CheckpointReader

_STATIC_ACTIVATION_KINDS = (FormatKind.MODELOPT_NVFP4, FormatKind.MODELOPT_W4A8, FormatKind.MODELOPT_FP8)
_CHUNK = 1 << 24  # elements checked at a time: a 2 GB embedding needs no 2 GB boolean mask


def quantized_modules(reader: CheckpointReader) -> list[str]:
    """Modules whose ``weight`` is stored quantized (NVFP4 uint8 codes, or FP8 with a ``weight_scale``)."""
    names = set(reader.names())
    modules = []
    for name in sorted(names):
        module, _, leaf = name.rpartition(".")
        if leaf != "weight":
            continue
        dtype, _ = reader.metadata(name)
        if dtype == torch.uint8 or (dtype == torch.float8_e4m3fn and f"{module}.weight_scale" in names):
            modules.append(module)
    return modules


def missing_activation_scales(fmt: CheckpointFormat, reader: CheckpointReader) -> list[str]:
    """``<module>.input_scale`` names a checkpoint with static activation quantization should hold but lacks."""
    if fmt.kind not in _STATIC_ACTIVATION_KINDS:
        return []
    return [f"{module}.input_scale" for module in quantized_modules(reader) if f"{module}.input_scale" not in reader]


def is_finite(tensor: torch.Tensor) -> bool:
    """No NaN / inf; integer tensors (packed codes, ids) always are. Checked in chunks to bound memory."""
    if not (tensor.dtype.is_floating_point or tensor.is_complex()) or tensor.device.type == "meta":
        return True
    flat = tensor.detach().reshape(-1)
    for start in range(0, flat.numel(), _CHUNK):
        if not torch.isfinite(flat[start:start + _CHUNK].float()).all():
            return False
    return True


def nonfinite_tensors(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the tensors holding NaN or inf, in the order given."""
    return [name for name, tensor in named_tensors if not is_finite(tensor)]


def describe_names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
