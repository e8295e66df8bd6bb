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

    ``skipped``: components that were not edited (NaN weights; weights on the
    meta device are edited through their offload hook or stop the run),
    ``placement``: how many components were edited on which device and which
    of them were offloaded (accelerate CPU/disk offload, edited through the
    hook's weights map),
    ``metrics`` / ``base_metrics``: the trial's and the unedited model's
    refusals, compliance, KL; ``settings``: the settings of the run;
    ``regime`` (only from a search with ``--gentle_share``): the trial's regime
    (``product`` or ``gentle``), its study and number there, and the direction
    recipe and depth it was searched with (a gentle trial's directions are the
    single projected ones, not ``settings.directions``: the files below hold
    the ones it used).

``directions.safetensors``
    fp32 tensors: ``refusal_directions`` [layers + 1, hidden] ([layers + 1, k, hidden] with ``--directions subspace``) (every residual
    index's unit direction) and every vector an edit names (``global`` or
    ``layer.<i>``), exactly as the search used them.

To recompute a weight (streaming, without the model): ``delta =
abliteration_delta(weight, directions[edit.direction], edit.strength,
method=method, rank=rank, transposed=edit.transposed, seed=svd_seed)`` and
``merged = (weight.float() + delta).to(weight.dtype)``; the export
(``abliterate.export.apply_edit``) does this. Parameter names are those of the
transformers model as loaded; a checkpoint that transformers converts on load
(e.g. per-expert tensors fused into one 3-D parameter) needs the same
conversion before the delta applies.

``version`` is the schema version of ``chosen_trial.json``: a file without it
is read as version 1 (the first layout); a newer one than this code knows is
refused. ``read_chosen_trial`` is the one reader: every consumer (export,
verification, pipeline) gets the typed ``ChosenTrialHeader`` from it instead
of opening the file by name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from abliterate.edits.plan import AbliterationParameters, ComponentEdit
from foundation.errors import UserError
from foundation.validation import user_error_from_validation

FORMAT = "quant-abliterate.chosen-trial"
VERSION = 1  # the schema version this code writes and the newest it reads
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


class ChosenTrialHeader(BaseModel):
    """``chosen_trial.json`` as typed fields (see the module docstring for each).

    Only what the merge needs is required; the rest is optional so a hand-made
    or older record still merges. Unknown keys are ignored (a newer writer of
    the same version may add some), and ``settings`` stays plain data: it is
    read by ``EvaluationInputs.from_recorded``, never by today's settings class.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    format: Literal["quant-abliterate.chosen-trial"] = FORMAT
    version: int = 1
    method: Literal["rank1", "norm_preserving"]
    rank: int
    svd_seed: int
    edits: list[EditRecord]
    model: str | None = None
    source_format: str | None = None
    trial_number: int | None = None
    study_name: str | None = None
    journal: str | None = None
    selection: str | None = None
    parameters: dict[str, Any] | None = None
    layers_path: str | None = None
    num_layers: int | None = None
    hidden_size: int | None = None
    skipped: list[dict[str, Any]] = []
    placement: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    base_metrics: dict[str, Any] | None = None
    settings: dict[str, Any] | None = None
    # settings the direct CLI took from QA_* variables or config.toml instead of its command line (name -> source)
    settings_sources: dict[str, str] = {}
    # a mixed search's (--gentle_share) trial: which regime, study and directions it used (absent otherwise)
    regime: dict[str, Any] | None = None


@dataclass(frozen=True)
class ChosenTrial:
    header: ChosenTrialHeader
    edits: dict[str, EditRecord]  # by parameter name
    directions: dict[str, torch.Tensor]
    data: dict[str, Any]  # the file as written, recorded verbatim in the export manifest

    @property
    def method(self) -> str:
        return self.header.method

    @property
    def rank(self) -> int:
        return self.header.rank

    @property
    def svd_seed(self) -> int:
        return self.header.svd_seed

    @property
    def parameters(self) -> AbliterationParameters:
        return AbliterationParameters.from_dict(self.header.parameters)

    @classmethod
    def from_parts(cls, header: dict[str, Any], edits: list[EditRecord], directions: dict[str, torch.Tensor]) -> ChosenTrial:
        """An in-memory trial (tests, benches) validated like a file."""
        data = {"format": FORMAT, "version": VERSION, **header, "edits": [record.__dict__ for record in edits]}
        parsed = ChosenTrialHeader.model_validate(data)
        return cls(parsed, {record.parameter: record for record in parsed.edits}, directions, data)


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


def _read_trial_file(directory: str | Path) -> tuple[ChosenTrialHeader, dict[str, Any]]:
    """``chosen_trial.json`` of an abliterate output, typed, and as written; every bad file is a UserError."""
    directory = Path(directory)
    trial_path = directory / TRIAL_FILE
    if not trial_path.is_file():
        raise UserError(str(directory), f"no {TRIAL_FILE} here", "point at the output directory of 'quant-abliterate abliterate'")
    try:
        data = json.loads(trial_path.read_text())
    except json.JSONDecodeError as error:  # hand-edited or truncated: say where, not a traceback
        raise UserError(f"{trial_path}:{error.lineno}:{error.colno}", f"not valid JSON ({error.msg})",
                        "restore the file, or re-run the abliterate stage to rewrite it") from None
    except UnicodeDecodeError:
        raise UserError(str(trial_path), "not a text file", "restore the file, or re-run the abliterate stage") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(str(trial_path), f"not a {FORMAT} file", "point at the output directory of 'quant-abliterate abliterate'")
    version = data.get("version", 1)  # the first files may lack it: they are version 1
    if not isinstance(version, int) or version < 1:
        raise UserError(str(trial_path), f"unreadable schema version {version!r}", "re-run the abliterate stage to rewrite it")
    if version > VERSION:
        raise UserError(str(trial_path), f"schema version {version} is newer than this quant-abliterate reads (up to {VERSION})",
                        "upgrade quant-abliterate, or re-run the abliterate stage with this version")
    try:
        header = ChosenTrialHeader.model_validate(data)
    except ValidationError as error:
        raise user_error_from_validation(error, lambda problem: (
            f"{trial_path}: {problem.field or 'file'}", f"{problem.message} (got {problem.input!r})",
            "restore the file, or re-run the abliterate stage to rewrite it")) from None
    return header, data


def read_chosen_trial(directory: str | Path) -> ChosenTrial:
    """The one reader of an abliterate output: typed header, edits by parameter, direction tensors."""
    directory = Path(directory)
    header, data = _read_trial_file(directory)
    if not (directory / DIRECTIONS_FILE).is_file():
        raise UserError(str(directory), f"{TRIAL_FILE} is here but {DIRECTIONS_FILE} is missing",
                        "copy both files of the abliterate output together, or re-run the abliterate stage")
    try:
        directions = load_file(str(directory / DIRECTIONS_FILE))
    except (SafetensorError, OSError) as error:  # a truncated or foreign file
        raise UserError(str(directory / DIRECTIONS_FILE), f"cannot be read ({error})",
                        "copy both files of the abliterate output together, or re-run the abliterate stage") from None
    return ChosenTrial(header, {record.parameter: record for record in header.edits}, directions, data)
