"""Is a checkpoint whole? Two checks that logits on one prompt cannot make.

* ``missing_activation_scales``: a ModelOpt checkpoint that quantizes
  activations (NVFP4 W4A4, W4A8, FP8) stores a calibrated ``input_scale`` per
  quantized Linear; one calibrated on no data has none, and servers then run
  with an uninitialized scale. Weight-only W4A16 needs none (decided from the
  ``quant_algo`` of hf_quant_config.json / config.json).
* ``nonfinite_tensors``: NaN / inf anywhere in the weights, also where the
  prompt at hand never looks (an embedding row of a token it does not use).
* ``expert_scale_sanity``: MoE experts whose ``input_scale`` is zero or
  ModelOpt's stand-in for a missing amax (0.5, written by its export for an
  expert that got no calibration token), or whose ``weight_scale_2`` is zero:
  scales that were never measured.

Both read tensors by name only (headers, then one tensor at a time), so they
work on a checkpoint of any size, and on a loaded model's parameters alike.
"""

from __future__ import annotations

import re
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


_EXPERT_MODULE = re.compile(r"^(?P<expert>.*\.experts\.\d+)\.[^.]+$")
MODELOPT_FALLBACK_AMAX = 0.5  # modelopt/torch/export/layer_utils.py set_expert_quantizer_amax(fallback_value=0.5)
_ACTIVATION_MAXBOUND = {FormatKind.MODELOPT_NVFP4: 6.0 * 448.0, FormatKind.MODELOPT_W4A8: 448.0,
                        FormatKind.MODELOPT_FP8: 448.0}


def _unmeasured(value: torch.Tensor, stand_in: float | None) -> bool:
    value = value.float().reshape(-1)
    if not bool(torch.isfinite(value).all()) or bool((value <= 0).any()):
        return True
    return stand_in is not None and bool(torch.isclose(value, torch.tensor(stand_in), rtol=1e-5, atol=0).any())


def expert_scale_sanity(fmt: CheckpointFormat, reader: CheckpointReader, limit: int = 5) -> dict | None:
    """Per-expert scale check of a ModelOpt checkpoint; None when it has no quantized experts."""
    if fmt.kind not in _STATIC_ACTIVATION_KINDS and fmt.kind != FormatKind.MODELOPT_W4A16_NVFP4:
        return None
    experts: dict[str, list[str]] = {}
    for module in quantized_modules(reader):
        match = _EXPERT_MODULE.match(module)
        if match is not None:
            experts.setdefault(match["expert"], []).append(module)
    if not experts:
        return None
    maxbound = _ACTIVATION_MAXBOUND.get(fmt.kind)
    stand_in = MODELOPT_FALLBACK_AMAX / maxbound if maxbound else None
    bad_input = [expert for expert, modules in experts.items()
                 if any(f"{m}.input_scale" in reader and _unmeasured(reader.get(f"{m}.input_scale"), stand_in) for m in modules)]
    bad_weight = [expert for expert, modules in experts.items()
                  if any(f"{m}.weight_scale_2" in reader and _unmeasured(reader.get(f"{m}.weight_scale_2"), None)
                         for m in modules)]
    return {"experts": len(experts), "zero_or_default_input_scale": len(bad_input),
            "zero_or_default_weight_scale_2": len(bad_weight),
            "examples": {"input_scale": bad_input[:limit], "weight_scale_2": bad_weight[:limit]}}
