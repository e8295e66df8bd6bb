"""The mix YAML schema: defaults, path resolution, and one clear error per bad input."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from foundation.errors import UserError
from quantize.calibration import CalibrationMix, load_mix
from tests.quantize.calibration.conftest import write_jsonl, write_mix


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "data" / "general.jsonl", [{"text": "hello world"}])


def _error(tmp_path: Path, yaml_text: str) -> UserError:
    mix_file = write_mix(tmp_path / "mix.yaml", yaml_text)
    with pytest.raises(UserError) as caught:
        load_mix(mix_file)
    message = str(caught.value)
    assert str(mix_file) in message, message  # every message names the YAML file
    assert "fix:" in message, message  # ... and says how to fix it
    return caught.value


def test_defaults_and_relative_path_resolution(tmp_path, corpus):
    mix_file = write_mix(tmp_path / "mix.yaml", "datasets:\n  - path: data/general.jsonl\n")
    mix = load_mix(mix_file)
    entry = mix.datasets[0]
    assert entry.path == str(corpus.resolve())
    assert entry.name == "general"  # derived from the path
    assert (entry.split, entry.weight, entry.streaming, entry.formatter) == ("train", 1.0, False, None)
    settings = mix.calibration
    assert (settings.max_samples, settings.max_seq_len, settings.seed) == (512, 2048, 42)
    assert (settings.min_token_length, settings.oversample_ratio) == (32, 1.5)
    assert mix.sha256 == hashlib.sha256(mix_file.read_bytes()).hexdigest()
    assert mix.source_path == mix_file.resolve()


def test_relative_path_is_taken_from_yaml_folder_not_cwd(tmp_path, corpus, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    mix = load_mix(write_mix(tmp_path / "mix.yaml", "datasets:\n  - path: ./data/general.jsonl\n"))
    assert Path(mix.datasets[0].path) == corpus.resolve()


def test_hub_id_is_kept_as_written(tmp_path):
    mix = load_mix(write_mix(tmp_path / "mix.yaml", "datasets:\n  - path: HuggingFaceH4/ultrachat_200k\n"))
    assert mix.datasets[0].path == "HuggingFaceH4/ultrachat_200k"
    assert mix.datasets[0].name == "ultrachat_200k"


def test_unknown_key_in_entry_names_entry_field_and_suggests(tmp_path, corpus):
    error = _error(tmp_path, "datasets:\n  - name: web\n    path: data/general.jsonl\n    wieght: 2\n")
    message = str(error)
    assert "datasets[0] (name: 'web')" in message
    assert "unknown key 'wieght'" in message
    assert "did you mean 'weight'" in message


def test_unknown_top_level_key(tmp_path, corpus):
    error = _error(tmp_path, "datasets:\n  - path: data/general.jsonl\ncalibrate:\n  seed: 1\n")
    assert "top-level key 'calibrate'" in str(error)
    assert "did you mean 'calibration'" in str(error)


def test_batch_size_in_calibration_block_points_to_cli_flag(tmp_path, corpus):
    error = _error(tmp_path, "datasets:\n  - path: data/general.jsonl\ncalibration:\n  batch_size: 4\n")
    assert "calibration, field 'batch_size'" in str(error)
    assert "--batch_size" in str(error)


def test_negative_weight_names_second_entry(tmp_path, corpus):
    error = _error(
        tmp_path,
        "datasets:\n  - path: data/general.jsonl\n  - name: chat\n    path: data/general.jsonl\n    weight: -1\n",
    )
    message = str(error)
    assert "datasets[1] (name: 'chat'), field 'weight'" in message
    assert "weight must be >= 0" in message and "-1" in message


def test_missing_file_names_entry_and_path_field(tmp_path):
    error = _error(tmp_path, "datasets:\n  - name: gone\n    path: data/missing.jsonl\n")
    message = str(error)
    assert "datasets[0] (name: 'gone'), field 'path'" in message
    assert "file not found" in message and str(tmp_path / "data" / "missing.jsonl") in message


def test_unknown_formatter_lists_valid_ones(tmp_path, corpus):
    error = _error(tmp_path, "datasets:\n  - path: data/general.jsonl\n    formatter: alpaca\n")
    message = str(error)
    assert "field 'formatter'" in message and "unknown formatter 'alpaca'" in message
    for name in ("raw_text", "prompt_answer", "sharegpt", "chat_completion"):
        assert name in message


def test_bad_yaml_syntax_gives_line_number(tmp_path):
    error = _error(tmp_path, "datasets:\n  - path: a.jsonl\n   weight: [1\n")
    assert "invalid YAML syntax" in str(error)
    assert f"{tmp_path / 'mix.yaml'}:3:" in str(error)


def test_missing_path_key(tmp_path):
    error = _error(tmp_path, "datasets:\n  - name: nothing\n    weight: 1\n")
    assert "datasets[0] (name: 'nothing'), field 'path'" in str(error)
    assert "required key 'path' is missing" in str(error)


def test_duplicate_names_name_the_second_entry(tmp_path, corpus):
    error = _error(
        tmp_path,
        "datasets:\n  - name: a\n    path: data/general.jsonl\n  - name: a\n    path: data/general.jsonl\n",
    )
    assert "datasets[1] (name: 'a'), field 'name'" in str(error)
    assert "already used by datasets[0]" in str(error)


def test_all_zero_weights(tmp_path, corpus):
    error = _error(tmp_path, "datasets:\n  - path: data/general.jsonl\n    weight: 0\n")
    assert "field 'weight'" in str(error) and "every weight is 0" in str(error)


def test_wrong_column_count_for_formatter(tmp_path, corpus):
    error = _error(
        tmp_path,
        "datasets:\n  - path: data/general.jsonl\n    formatter: prompt_answer\n    columns: [q]\n",
    )
    assert "field 'columns'" in str(error) and "reads 2 or 3 column(s), got 1" in str(error)


def test_min_token_length_above_max_seq_len(tmp_path, corpus):
    error = _error(
        tmp_path,
        "datasets:\n  - path: data/general.jsonl\ncalibration:\n  max_seq_len: 16\n  min_token_length: 32\n",
    )
    assert "calibration, field 'min_token_length'" in str(error)


def test_nonpositive_max_samples(tmp_path, corpus):
    error = _error(tmp_path, "datasets:\n  - path: data/general.jsonl\ncalibration:\n  max_samples: 0\n")
    assert "calibration, field 'max_samples'" in str(error) and "must be > 0" in str(error)


def test_multiple_problems_are_all_mentioned_in_one_error(tmp_path, corpus):
    error = _error(
        tmp_path,
        "datasets:\n  - name: a\n    path: data/general.jsonl\n    weight: -2\n"
        "  - name: b\n    path: data/general.jsonl\n    colour: red\n",
    )
    message = str(error)
    assert "datasets[0] (name: 'a'), field 'weight'" in message
    assert "1 more problem(s)" in message and "unknown key 'colour'" in message


def test_entry_that_is_not_a_mapping(tmp_path):
    error = _error(tmp_path, "datasets:\n  - a.jsonl\n")
    assert "datasets[0]" in str(error) and "expected a mapping" in str(error)
    assert "'- path: <Hub id or file>'" in str(error)


def test_wrong_value_type(tmp_path, corpus):
    error = _error(tmp_path, "datasets:\n  - path: data/general.jsonl\n    streaming: maybe\n")
    assert "datasets[0] (name: 'data/general.jsonl'), field 'streaming'" in str(error)
    assert "'maybe'" in str(error) and "correct the value of 'streaming'" in str(error)


def test_unsupported_file_type(tmp_path):
    (tmp_path / "table.xlsx").write_bytes(b"not really")
    error = _error(tmp_path, "datasets:\n  - path: table.xlsx\n")
    assert "field 'path'" in str(error) and "unsupported file type '.xlsx'" in str(error)


def test_not_a_mapping_and_empty_list_and_missing_file(tmp_path):
    assert "must be a mapping" in str(_error(tmp_path, "- path: a.jsonl\n"))
    assert "datasets list is empty" in str(_error(tmp_path, "datasets: []\n"))
    with pytest.raises(UserError, match="calibration mix file not found"):
        load_mix(tmp_path / "nope.yaml")


def test_mix_built_in_code_resolves_against_cwd(tmp_path, corpus, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mix = CalibrationMix.model_validate({"datasets": [{"path": "data/general.jsonl"}]})
    assert mix.datasets[0].path == str(corpus.resolve())
    assert mix.source_path is None and len(mix.sha256) == 64
