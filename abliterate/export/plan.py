"""Which checkpoint tensors the chosen trial rewrites, found by name before any weight is read.

The trial names each edited parameter as the loaded transformers model names
it. On disk that is usually the same name (or the family's own prefix,
``checkpoint_formats.naming``: NemotronH's ``backbone.``); experts that transformers fuses
into one 3-D parameter at load time may be stored one tensor per expert
(``<experts>.<e>.<name>.weight``), and then each of those is edited with its
expert's slice of the edit. An edited parameter found nowhere on disk is an
error, never a silent skip (the reference's failure on fused experts).
Families whose checkpoints spell modules differently (Mixtral's
``block_sparse_moe`` for the model's ``mlp``) are looked up in the
checkpoint's own spelling (``checkpoint_formats.naming``), so the export
rewrites ``experts.E.w2`` and leaves every other name as it was.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from abliterate.artifacts import ChosenTrial, EditRecord
from checkpoint_formats.layout import FUSED_EXPERT_PARTS
from checkpoint_formats.naming import CheckpointNaming, naming_for
from foundation.errors import UserError


@dataclass(frozen=True)
class TensorEdit:
    tensor_name: str  # name on disk
    record: EditRecord  # the trial's edit of the whole parameter
    expert: int | None = None  # set when the file stores this expert of a fused parameter alone


@dataclass(frozen=True)
class MergePlan:
    edits: dict[str, TensorEdit]  # on-disk tensor name -> edit

    def touches(self, name: str) -> bool:
        return name in self.edits

    def summary(self) -> dict[str, int]:
        """Edited on-disk tensors per component group (attn / mlp)."""
        return dict(Counter(edit.record.group for edit in self.edits.values()))


def _on_disk(record: EditRecord, names: set[str], naming: CheckpointNaming) -> list[tuple[str, int | None]]:
    for candidate in naming.disk_candidates(record.parameter):  # NemotronH backbone.*, Mixtral block_sparse_moe
        if (found := _stored_as(record, candidate, names)):
            return found
    return []


def _stored_as(record: EditRecord, parameter_name: str, names: set[str]) -> list[tuple[str, int | None]]:
    if parameter_name in names:
        return [(parameter_name, None)]
    if record.num_experts is None:
        return []
    module, _, parameter = parameter_name.rpartition(".")
    # the per-expert names a fused parameter may have on disk (down_proj or w2), as the formats loader reads them
    alternatives = [name for part in FUSED_EXPERT_PARTS.get(parameter, ((parameter,),)) for name in part]
    per_expert = re.compile(re.escape(module) + r"\.(\d+)\.(?:" + "|".join(map(re.escape, alternatives)) + r")\.weight$")
    found = [(name, int(m.group(1))) for name in names if (m := per_expert.match(name))]
    return sorted(found, key=lambda item: item[1]) if len(found) == record.num_experts else []


def plan_merge(trial: ChosenTrial, names: set[str], where: str, config: dict | None = None) -> MergePlan:
    """``names``: the full-precision tensor names of the merge source (``FullPrecisionSource.names``);
    ``config``: its config.json, whose ``model_type`` says how the family spells modules on disk."""
    edits: dict[str, TensorEdit] = {}
    missing: list[str] = []
    naming = naming_for(names, config=config)
    for record in trial.edits.values():
        targets = _on_disk(record, names, naming)
        if not targets:
            missing.append(record.parameter)
        for name, expert in targets:
            edits[name] = TensorEdit(name, record, expert)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise UserError(
            where,
            f"the chosen trial edits parameters with no tensor in this checkpoint: {shown}",
            "merge into the model the trial was searched on (same architecture, same parameter names)",
        )
    return MergePlan(edits)
