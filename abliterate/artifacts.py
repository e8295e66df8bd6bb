"""What the search hands to the merge: the chosen trial, exactly reproducible.

An abliteration output directory holds:

``chosen_trial.json``
    ``format``: ``"quant-abliterate.chosen-trial"``, ``version``: 1,
    ``model``: the model argument; ``source_format``: how it was loaded
    (e.g. ``"bf16"``, or the formats loader's name for a quantized checkpoint),
    ``trial_number``, ``study_name``, ``journal``: where the study lives,
    ``method``: ``"rank1"`` | ``"norm_preserving"``, ``rank``: the low-rank
    approximation rank of ``norm_preserving`` (1 for ``rank1``),
    ``svd_seed``: the seed of its randomized SVD,
    ``parameters``: the trial's parameters (``AbliterationParameters.to_dict``),
    ``layers_path``, ``num_layers``, ``hidden_size``,
    ``edits``: one entry per edited weight::

        {"parameter": "model.layers.3.self_attn.o_proj.weight",  # name in the loaded model
         "layer": 3, "group": "attn", "strength": 0.93,           # lambda
         "direction": "global",                                   # key in directions.safetensors
         "num_experts": null, "transposed": false}                # 3-D fused experts: E, layout

    ``skipped``: components that were not edited (meta device, NaN weights),
    ``metrics`` / ``base_metrics``: the trial's and the unedited model's
    refusals, compliance, KL; ``settings``: the settings of the run.

``directions.safetensors``
    fp32 tensors: ``refusal_directions`` [layers + 1, hidden] (every residual
    index's unit direction) and every vector an edit names (``global`` or
    ``layer.<i>``), exactly as the search used them.

To recompute a weight (streaming, without the model): ``delta =
abliteration_delta(weight, directions[edit.direction], edit.strength,
method=method, rank=rank, transposed=edit.transposed, seed=svd_seed)`` and
``merged = (weight.float() + delta).to(weight.dtype)``; ``ChosenTrial.delta``
does this. Parameter names are those of the transformers model as loaded; a
checkpoint that transformers converts on load (e.g. per-expert tensors fused
into one 3-D parameter) needs the same conversion before the delta applies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from abliterate.edits.delta import abliteration_delta
from abliterate.edits.plan import AbliterationParameters, ComponentEdit
from foundation.errors import UserError

FORMAT = "quant-abliterate.chosen-trial"
VERSION = 1
TRIAL_FILE = "chosen_trial.json"
DIRECTIONS_FILE = "directions.safetensors"


@dataclass(frozen=True)
class EditRecord:
    parameter: str
    layer: int
    group: str
    strength: float
    direction: str
    num_experts: int | None
    transposed: bool

    @classmethod
    def from_edit(cls, edit: ComponentEdit) -> EditRecord:
        c = edit.component
        return cls(c.parameter_path, c.layer, c.group, float(edit.strength), edit.direction_key, c.num_experts, c.transposed)


@dataclass(frozen=True)
class ChosenTrial:
    data: dict[str, Any]
    edits: dict[str, EditRecord]  # by parameter name
    directions: dict[str, torch.Tensor]

    @property
    def method(self) -> str:
        return self.data["method"]

    @property
    def rank(self) -> int:
        return int(self.data["rank"])

    @property
    def svd_seed(self) -> int:
        return int(self.data["svd_seed"])

    @property
    def parameters(self) -> AbliterationParameters:
        return AbliterationParameters.from_dict(self.data["parameters"])

    def delta(self, parameter: str, weight: torch.Tensor) -> torch.Tensor | None:
        """The fp32 delta for ``parameter`` (None if this trial does not edit it)."""
        edit = self.edits.get(parameter)
        if edit is None:
            return None
        return abliteration_delta(
            weight, self.directions[edit.direction], edit.strength,
            method=self.method, rank=self.rank, transposed=edit.transposed, seed=self.svd_seed,
        )


def write_chosen_trial(
    directory: Path,
    *,
    header: dict[str, Any],
    edits: list[ComponentEdit],
    directions: torch.Tensor,
    edit_vectors: dict[str, torch.Tensor],
) -> None:
    """Write both files into ``directory`` (an atomic output's temporary directory)."""
    records = [EditRecord.from_edit(edit).__dict__ for edit in edits]
    data = {"format": FORMAT, "version": VERSION, **header, "edits": records}
    (directory / TRIAL_FILE).write_text(json.dumps(data, indent=2) + "\n")
    tensors = {"refusal_directions": directions.float().contiguous()}
    used = {record["direction"] for record in records}
    # clone: a per-layer vector is a view of refusal_directions, and safetensors refuses shared storage
    tensors.update({key: vector.float().clone() for key, vector in edit_vectors.items() if key in used})
    save_file(tensors, str(directory / DIRECTIONS_FILE), metadata={"format": FORMAT})


def load_chosen_trial(directory: str | Path) -> ChosenTrial:
    directory = Path(directory)
    trial_path = directory / TRIAL_FILE
    if not trial_path.is_file():
        raise UserError(str(directory), f"no {TRIAL_FILE} here", "point at the output directory of 'quant-abliterate abliterate'")
    try:
        data = json.loads(trial_path.read_text())
    except json.JSONDecodeError as error:  # hand-edited or truncated: say where, not a traceback
        raise UserError(f"{trial_path}:{error.lineno}:{error.colno}", f"not valid JSON ({error.msg})",
                        "restore the file, or re-run the abliterate stage to rewrite it") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
        raise UserError(str(trial_path), f"not a {FORMAT} v{VERSION} file", "re-run the abliterate stage with this version")
    edits = {record["parameter"]: EditRecord(**record) for record in data["edits"]}
    if not (directory / DIRECTIONS_FILE).is_file():
        raise UserError(str(directory), f"{TRIAL_FILE} is here but {DIRECTIONS_FILE} is missing",
                        "copy both files of the abliterate output together, or re-run the abliterate stage")
    directions = load_file(str(directory / DIRECTIONS_FILE))
    return ChosenTrial(data, edits, directions)
