"""chosen_trial.json has one typed, versioned reader; old records stay exportable."""

import json

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import save_file

from abliterate.artifacts import (
    DIRECTIONS_FILE,
    FORMAT,
    TRIAL_FILE,
    VERSION,
    ChosenTrialHeader,
    read_chosen_trial,
)
from abliterate.evaluation_inputs import EvaluationInputs
from abliterate.settings import AbliterateSettings
from foundation.errors import UserError

# A record exactly as the code before the typed reader wrote it (version 1), trimmed to a 2-layer model.
VERSION_1_RECORD = {
    "format": "quant-abliterate.chosen-trial", "version": 1, "model": "tiny", "source_format": "bf16",
    "trial_number": 3, "study_name": "abliterate-tiny-0123456789ab", "journal": "/tmp/x.study/journal.log",
    "selection": "lowest KL with at most 1 refusals", "method": "norm_preserving", "rank": 3, "svd_seed": 0,
    "parameters": {"direction_index": 1.5, "kernels": {}}, "layers_path": "model.layers", "num_layers": 2,
    "hidden_size": 4, "skipped": [],
    "metrics": {"refusals": 1, "n_harmful": 8, "compliance": 6, "kl": 0.02},
    "base_metrics": {"refusals": 7, "n_harmful": 8, "compliance": 0, "kl": 0.0},
    "settings": {"model": "tiny", "dtypes": ["float32"], "device_map": "cpu", "max_test_prompts": 8,
                 "kl_tokens": 4, "a_flag_renamed_since": True},
    "edits": [{"parameter": "model.layers.1.self_attn.o_proj.weight", "layer": 1, "group": "attn", "strength": 0.9,
               "direction": "global", "num_experts": None, "transposed": False}],
}


def _write(directory, record):
    (directory / TRIAL_FILE).write_text(json.dumps(record))
    save_file({"refusal_directions": torch.zeros(3, 4), "global": torch.ones(4)}, str(directory / DIRECTIONS_FILE))


def test_a_version_1_record_reads_as_typed_fields(tmp_path):
    _write(tmp_path, VERSION_1_RECORD)
    trial = read_chosen_trial(tmp_path)
    assert isinstance(trial.header, ChosenTrialHeader) and trial.header.version == 1 == VERSION
    assert (trial.method, trial.rank, trial.svd_seed, trial.header.trial_number) == ("norm_preserving", 3, 0, 3)
    assert trial.edits["model.layers.1.self_attn.o_proj.weight"].strength == 0.9
    assert trial.data == VERSION_1_RECORD  # kept verbatim for the export manifest
    assert set(trial.directions) == {"refusal_directions", "global"}


def test_a_record_without_a_version_is_version_1(tmp_path):
    _write(tmp_path, {key: value for key, value in VERSION_1_RECORD.items() if key != "version"})
    assert read_chosen_trial(tmp_path).header.version == 1


def test_a_newer_version_is_refused_with_the_remedy(tmp_path):
    _write(tmp_path, {**VERSION_1_RECORD, "version": VERSION + 1})
    with pytest.raises(UserError, match=rf"schema version {VERSION + 1} is newer") as caught:
        read_chosen_trial(tmp_path)
    assert "upgrade" in caught.value.fix


@pytest.mark.parametrize("change, where", [({"rank": "three"}, "rank"), ({"edits": [{"parameter": "x"}]}, "edits.0")])
def test_a_malformed_field_is_named(tmp_path, change, where):
    _write(tmp_path, {**VERSION_1_RECORD, **change})
    with pytest.raises(UserError, match=rf"{TRIAL_FILE}: {where}"):
        read_chosen_trial(tmp_path)


def test_a_file_of_another_format_is_refused(tmp_path):
    _write(tmp_path, {**VERSION_1_RECORD, "format": "something-else"})
    with pytest.raises(UserError, match=f"not a {FORMAT} file"):
        read_chosen_trial(tmp_path)


def test_recorded_settings_are_read_as_data_not_against_todays_settings_class(tmp_path):
    """An unknown (renamed) key is ignored and a missing one takes its default: old trials stay verifiable."""
    with pytest.raises(ValidationError):  # today's settings class refuses the old record outright
        AbliterateSettings.model_validate(VERSION_1_RECORD["settings"])
    inputs = EvaluationInputs.from_recorded(VERSION_1_RECORD["settings"], TRIAL_FILE)
    assert (inputs.model, inputs.dtypes, inputs.max_test_prompts, inputs.kl_tokens) == ("tiny", ["float32"], 8, 4)
    assert inputs.max_response_length == 100


def test_recorded_settings_that_are_missing_or_malformed_are_user_errors():
    with pytest.raises(UserError, match="no 'settings' recorded"):
        EvaluationInputs.from_recorded(None, TRIAL_FILE)
    with pytest.raises(UserError, match=rf"{TRIAL_FILE}: settings.kl_tokens"):
        EvaluationInputs.from_recorded({"model": "tiny", "kl_tokens": "many"}, TRIAL_FILE)


def test_evaluation_inputs_default_like_the_settings_they_mirror():
    """A record missing a key must be measured as a run with today's default was, so the defaults must agree."""
    for name, field in EvaluationInputs.model_fields.items():
        if not field.is_required():
            assert field.get_default() == AbliterateSettings.model_fields[name].get_default(call_default_factory=True), name


def test_a_corrupt_directions_file_is_named(tmp_path):
    _write(tmp_path, VERSION_1_RECORD)
    (tmp_path / DIRECTIONS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(UserError, match=rf"{DIRECTIONS_FILE}: cannot be read"):
        read_chosen_trial(tmp_path)
