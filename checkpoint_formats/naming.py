"""Translate tensor names between a checkpoint's spelling and the transformers model's, both ways.

transformers 5 renames some families' tensors when it loads them (Mixtral's
``block_sparse_moe`` is its ``mlp``), and writes the old names back when it
saves; ModelOpt's export writes the old names too, and vLLM reads them. Our
loader builds the model from its config and so must apply the same renaming
on the way in, and the export must find the checkpoint's own tensor for a
model parameter on the way out, so untouched tensors keep their names and
bytes. The pairs live in ``layout.CHECKPOINT_RENAMES``; this module only
applies them.
"""

from __future__ import annotations

from checkpoint_formats.layout import CHECKPOINT_RENAMES, UNSUPPORTED_FAMILIES
from foundation.errors import UserError


def _family(config: dict | None) -> str | None:
    return (config or {}).get("model_type")


def _rename(name: str, pairs, *, to_model: bool) -> str:
    for module_fragment, checkpoint_fragment in pairs:
        old, new = (checkpoint_fragment, module_fragment) if to_model else (module_fragment, checkpoint_fragment)
        if old in name:
            return name.replace(old, new, 1)
    return name


def to_model_name(stored: str, config: dict | None) -> str:
    """The model's name for the stored tensor ``stored`` of a checkpoint with this ``config.json``."""
    pairs = CHECKPOINT_RENAMES.get(_family(config), ())
    return _rename(stored, pairs, to_model=True) if pairs else stored


def checkpoint_candidates(model_name: str, config: dict | None) -> list[str]:
    """Where a model name may be stored: as is (checkpoints saved in the module layout), then the family's spelling."""
    pairs = CHECKPOINT_RENAMES.get(_family(config), ())
    renamed = _rename(model_name, pairs, to_model=False) if pairs else model_name
    return [model_name] if renamed == model_name else [model_name, renamed]


def check_family_supported(config: dict | None, where: str) -> None:
    """Refuse a family whose quantized checkpoint stage 2 cannot read, before any weight is loaded or calibrated."""
    family = _family(config)
    if family in UNSUPPORTED_FAMILIES:
        raise UserError(
            where,
            f"model family {family!r} is not supported for NVFP4: {UNSUPPORTED_FAMILIES[family]}",
            "abliterate the bf16 model and quantize it afterwards, or pick a supported family (README, model families)",
        )
