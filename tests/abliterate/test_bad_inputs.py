"""Bad stage-2 inputs fail up front as UserErrors naming the flag or file, never as tracebacks."""

import json

import pytest

from abliterate.artifacts import FORMAT, TRIAL_FILE, VERSION, read_chosen_trial
from abliterate.settings import parse_settings
from foundation.errors import UserError


def test_unreadable_select_is_refused_before_the_search(tmp_path):
    with pytest.raises(UserError, match=r"--select.*cannot read 'best 3'.*best_kl_under"):
        parse_settings(["--model", str(tmp_path), "--select", "best 3"])
    assert parse_settings(["--model", str(tmp_path), "--select", "trial 4"]).select == "trial 4"


def test_unparsable_dict_flag_names_the_flag_and_the_syntax(tmp_path):
    with pytest.raises(UserError, match="--max_memory") as caught:
        parse_settings(["--model", str(tmp_path), "--max_memory", "notjson"])
    assert "KEY=VALUE" in caught.value.fix


def test_corrupt_chosen_trial_names_the_file_and_position(tmp_path):
    (tmp_path / TRIAL_FILE).write_text("{bad")
    with pytest.raises(UserError, match=rf"{TRIAL_FILE}:1:2: not valid JSON"):
        read_chosen_trial(tmp_path)
    (tmp_path / TRIAL_FILE).write_text("[1, 2]")
    with pytest.raises(UserError, match=f"not a {FORMAT}"):
        read_chosen_trial(tmp_path)


def test_chosen_trial_without_its_directions_file_says_which_is_missing(tmp_path):
    (tmp_path / TRIAL_FILE).write_text(json.dumps({"format": FORMAT, "version": VERSION, "method": "rank1", "rank": 1,
                                                 "svd_seed": 0, "edits": []}))
    with pytest.raises(UserError, match="directions.safetensors is missing"):
        read_chosen_trial(tmp_path)


def test_model_path_that_is_a_file_is_named_as_such(tmp_path):
    from abliterate.loading import load_model

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"not a folder")
    with pytest.raises(UserError, match=r"--model: .*model\.safetensors is a file, not a model folder"):
        load_model(str(weights), dtypes=["float32"], device_map=None)
