"""Which spelling a checkpoint uses for the model's module names, and the translation both ways.

transformers renames some families' tensors when it loads them (NemotronH:
``backbone.layers.0...`` on disk is ``model.layers.0...`` in memory), so a
loader that fills the model tensor by tensor, a merge that finds the trial's
edited parameters on disk, and an export that must write the checkpoint's own
names all need the same translation. It is decided once, from the names
themselves: an alias applies when the checkpoint uses its disk prefix and the
model (or, without a model, the checkpoint) never uses the in-memory one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from checkpoint_formats.layout import CHECKPOINT_PREFIX_ALIASES


@dataclass(frozen=True)
class CheckpointNaming:
    """``to_model`` / ``to_disk`` translate one name; identity when no alias applies."""

    disk_prefix: str = ""
    model_prefix: str = ""

    @property
    def renames(self) -> bool:
        return self.disk_prefix != self.model_prefix

    def to_model(self, name: str) -> str:
        if self.renames and name.startswith(self.disk_prefix):
            return self.model_prefix + name[len(self.disk_prefix):]
        return name

    def to_disk(self, name: str) -> str:
        if self.renames and name.startswith(self.model_prefix):
            return self.disk_prefix + name[len(self.model_prefix):]
        return name


IDENTITY = CheckpointNaming()


def naming_for(disk_names: Iterable[str], model_names: Iterable[str] | None = None) -> CheckpointNaming:
    """The alias that maps these checkpoint names onto the model's (``model_names``: its parameter names).

    Without ``model_names`` (a merge, an export) the checkpoint alone decides: it
    uses the disk prefix of an alias and never the model prefix.
    """
    disk = list(disk_names)
    model = list(model_names) if model_names is not None else None
    for disk_prefix, model_prefix in CHECKPOINT_PREFIX_ALIASES:
        if not any(name.startswith(disk_prefix) for name in disk) or any(n.startswith(model_prefix) for n in disk):
            continue
        if model is None or (any(n.startswith(model_prefix) for n in model)
                             and not any(n.startswith(disk_prefix) for n in model)):
            return CheckpointNaming(disk_prefix, model_prefix)
    return IDENTITY
