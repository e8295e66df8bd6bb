"""Which spelling a checkpoint uses for the model's module names, and the translation both ways.

transformers renames some families' tensors when it loads them and writes the
old names back when it saves: NemotronH's ``backbone.*`` on disk is
``model.*`` in memory (a prefix alias, ``layout.CHECKPOINT_PREFIX_ALIASES``),
Mixtral's ``block_sparse_moe`` is its ``mlp`` (a fragment rename keyed by
``model_type``, ``layout.CHECKPOINT_RENAMES``). ModelOpt's export writes the
on-disk names and vLLM reads them. A loader that fills the model tensor by
tensor, a merge that finds the trial's edited parameters on disk, and an
export that must keep the checkpoint's own names all need the same
translation; it is decided once, here. A prefix alias applies when the
checkpoint uses its disk prefix and the model (or, without a model, the
checkpoint) never uses the in-memory one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from checkpoint_formats.layout import (
    CHECKPOINT_PREFIX_ALIASES,
    CHECKPOINT_RENAMES,
    UNSUPPORTED_FAMILIES,
)
from foundation.errors import UserError

Pairs = tuple[tuple[str, str], ...]  # (fragment in the model's name, fragment in the checkpoint's)


def _family(config: dict | None) -> str | None:
    return (config or {}).get("model_type")


def _rename(name: str, pairs: Pairs, *, to_model: bool) -> str:
    for module_fragment, checkpoint_fragment in pairs:
        old, new = (checkpoint_fragment, module_fragment) if to_model else (module_fragment, checkpoint_fragment)
        if old in name:
            return name.replace(old, new, 1)
    return name


@dataclass(frozen=True)
class CheckpointNaming:
    """``to_model`` translates a stored name; ``disk_candidates`` lists where a model name may be stored."""

    disk_prefix: str = ""
    model_prefix: str = ""
    family_renames: Pairs = ()

    @property
    def renames(self) -> bool:
        return self.disk_prefix != self.model_prefix

    def to_model(self, name: str) -> str:
        if self.renames and name.startswith(self.disk_prefix):
            name = self.model_prefix + name[len(self.disk_prefix):]
        return _rename(name, self.family_renames, to_model=True) if self.family_renames else name

    def to_disk(self, name: str) -> str:
        """The prefix alias only (module names of exclusion lists carry no family fragment)."""
        if self.renames and name.startswith(self.model_prefix):
            return self.disk_prefix + name[len(self.model_prefix):]
        return name

    def disk_candidates(self, model_name: str) -> list[str]:
        """As is (checkpoints saved in the module layout), then in the family's spelling."""
        renamed = _rename(model_name, self.family_renames, to_model=False) if self.family_renames else model_name
        names = [model_name] if renamed == model_name else [model_name, renamed]
        return [self.to_disk(name) for name in names]


IDENTITY = CheckpointNaming()


def naming_for(disk_names: Iterable[str], model_names: Iterable[str] | None = None,
               config: dict | None = None) -> CheckpointNaming:
    """The translation that maps these checkpoint names onto the model's (``model_names``: its parameter names).

    Without ``model_names`` (a merge, an export) the checkpoint alone decides the prefix alias: it uses the
    disk prefix of an alias and never the model prefix. ``config`` (config.json) gives the family's renames.
    """
    disk = list(disk_names)
    model = list(model_names) if model_names is not None else None
    family = CHECKPOINT_RENAMES.get(_family(config), ())
    for disk_prefix, model_prefix in CHECKPOINT_PREFIX_ALIASES:
        if not any(name.startswith(disk_prefix) for name in disk) or any(n.startswith(model_prefix) for n in disk):
            continue
        if model is None or (any(n.startswith(model_prefix) for n in model)
                             and not any(n.startswith(disk_prefix) for n in model)):
            return CheckpointNaming(disk_prefix, model_prefix, family)
    return CheckpointNaming(family_renames=family)


def to_model_name(stored: str, config: dict | None) -> str:
    """The model's name for the stored tensor ``stored`` of a checkpoint with this ``config.json`` (family renames)."""
    return CheckpointNaming(family_renames=CHECKPOINT_RENAMES.get(_family(config), ())).to_model(stored)


def checkpoint_candidates(model_name: str, config: dict | None) -> list[str]:
    """Where a model name may be stored in a checkpoint with this ``config.json`` (family renames)."""
    return CheckpointNaming(family_renames=CHECKPOINT_RENAMES.get(_family(config), ())).disk_candidates(model_name)


def check_family_supported(config: dict | None, where: str) -> None:
    """Refuse a family whose quantized checkpoint stage 2 cannot read, before any weight is loaded or calibrated."""
    family = _family(config)
    if family in UNSUPPORTED_FAMILIES:
        raise UserError(
            where,
            f"model family {family!r} is not supported for NVFP4: {UNSUPPORTED_FAMILIES[family]}",
            "abliterate the bf16 model and quantize it afterwards, or pick a supported family (README, model families)",
        )
