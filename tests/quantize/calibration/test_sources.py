"""Every source kind loads through a real mix: local files of each type,
save_to_disk folders, a folder of data files, streaming, and the Hub path."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from foundation.dataset_sources import (
    DatasetSource,
    open_dataset,
    resolve_source,
    take_rows,
)
from foundation.errors import UserError
from quantize.calibration import build_calibration_set, load_mix
from tests.quantize.calibration.conftest import write_jsonl, write_mix
from tests.quantize.calibration.tiny_tokenizer import words

ROWS = [{"text": words(20 + i, offset=i), "id": i} for i in range(12)]


def _build(tmp_path: Path, entry_yaml: str, tokenizer, max_samples: int = 4):
    mix = write_mix(
        tmp_path / "mix.yaml",
        "datasets:\n  - " + entry_yaml.replace("\n", "\n    ")
        + f"\ncalibration:\n  max_samples: {max_samples}\n  min_token_length: 8\n  max_seq_len: 64\n",
    )
    return build_calibration_set(mix, tokenizer)


def _assert_rows_came_from(calib, rows):
    """Every sample is the BOS-prefixed tokenization of one of the source rows."""
    lengths = {len(row["text"].split()) + 1 for row in rows}
    assert calib.samples and all(len(sample) in lengths for sample in calib.samples)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
def test_local_data_files(tmp_path, tokenizer, suffix):
    table = datasets.Dataset.from_list(ROWS)
    path = tmp_path / f"corpus{suffix}"
    if suffix == ".jsonl":
        write_jsonl(path, ROWS)
    elif suffix == ".json":
        path.write_text(json.dumps(ROWS))
    elif suffix == ".parquet":
        table.to_parquet(str(path))
    else:
        table.to_csv(str(path), index=False)
    calib = _build(tmp_path, f"path: corpus{suffix}", tokenizer)
    assert calib.per_dataset["corpus"].loaded == 6  # ceil(4 * 1.5)
    assert len(calib) == 4
    _assert_rows_came_from(calib, ROWS)


def test_txt_file_is_split_into_paragraphs(tmp_path, tokenizer):
    paragraphs = [words(10, i) + "\n" + words(10, i + 50) for i in range(3)]
    (tmp_path / "notes.txt").write_text("\n\n".join(paragraphs) + "\n")
    calib = _build(tmp_path, "path: notes.txt", tokenizer, max_samples=3)
    assert calib.per_dataset["notes"].loaded == 3  # 3 paragraphs, not 6 lines
    assert sorted(len(s) for s in calib.samples) == [21, 21, 21]


def test_save_to_disk_dataset_and_dataset_dict(tmp_path, tokenizer):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    calib = _build(tmp_path, "path: saved", tokenizer)
    assert calib.per_dataset["saved"].loaded == 6
    _assert_rows_came_from(calib, ROWS)

    short = [{"text": words(9, i)} for i in range(5)]
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(short)}
    ).save_to_disk(str(tmp_path / "saved_dict"))
    calib = _build(tmp_path, "path: saved_dict\nsplit: test", tokenizer)
    assert calib.per_dataset["saved_dict"].loaded == 5
    assert all(len(sample) == 10 for sample in calib.samples)


def test_save_to_disk_missing_split_lists_splits(tmp_path, tokenizer):
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(UserError) as caught:
        _build(tmp_path, "name: dd\npath: dd\nsplit: validation", tokenizer)
    message = str(caught.value)
    assert "datasets[0] (name: 'dd'), field 'split'" in message and "use one of: train" in message


def test_folder_of_data_files(tmp_path, tokenizer):
    write_jsonl(tmp_path / "folder" / "part1.jsonl", ROWS[:6])
    write_jsonl(tmp_path / "folder" / "part2.jsonl", ROWS[6:])
    assert resolve_source("folder", tmp_path).kind == "folder"
    calib = _build(tmp_path, "path: folder", tokenizer, max_samples=8)
    assert calib.per_dataset["folder"].loaded == 12  # both files were read
    _assert_rows_came_from(calib, ROWS)


def test_streaming_reads_only_the_requested_rows_deterministically(tmp_path, tokenizer):
    rows = [{"text": words(20, i)} for i in range(300)]
    write_jsonl(tmp_path / "big.jsonl", rows)
    mix = load_mix(write_mix(tmp_path / "mix.yaml", "datasets:\n  - path: big.jsonl\n    streaming: true\n"))
    stream = open_dataset(mix.datasets[0], "test")
    assert isinstance(stream, datasets.IterableDataset)
    taken = take_rows(stream, 7, seed=3)
    assert len(taken) == 7 and taken == take_rows(stream, 7, seed=3)
    assert taken != take_rows(stream, 7, seed=4)
    first = build_calibration_set(mix, tokenizer, max_samples=10, min_token_length=4)
    second = build_calibration_set(mix, tokenizer, max_samples=10, min_token_length=4)
    assert first.per_dataset["big"].loaded == 15
    assert first.token_ids_sha256 == second.token_ids_sha256


def test_map_style_sampling_is_seeded_and_without_replacement():
    table = datasets.Dataset.from_list([{"text": str(i)} for i in range(50)])
    picked = take_rows(table, 20, seed=1)
    assert picked == take_rows(table, 20, seed=1)
    assert len({row["text"] for row in picked}) == 20
    assert picked != take_rows(table, 20, seed=2)
    assert len(take_rows(table, 80, seed=1)) == 50  # asking for more than exists gives all rows


def test_hub_id_is_passed_to_load_dataset(tmp_path, tokenizer, monkeypatch):
    calls = []

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return datasets.Dataset.from_list(
            [{"messages": [{"role": "user", "content": words(30, i)}]} for i in range(10)]
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert resolve_source("owner/chat-set", tmp_path) == DatasetSource("hub", "owner/chat-set")
    calib = _build(tmp_path, "path: owner/chat-set\nsubset: en\nsplit: train_sft\nstreaming: true", tokenizer)
    assert calls == [("owner/chat-set", {"name": "en", "split": "train_sft", "streaming": True})]
    assert calib.per_dataset["chat-set"].formatter == "chat_completion"


def test_hub_revision_is_passed_and_local_revision_rejected(tmp_path, tokenizer, monkeypatch):
    calls = []

    def fake_load_dataset(path, **kwargs):
        calls.append(kwargs)
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    _build(tmp_path, "path: owner/web-set\nrevision: 0123abc\nsplit: train[:8]", tokenizer)
    assert calls[0]["revision"] == "0123abc" and calls[0]["split"] == "train[:8]"
    write_jsonl(tmp_path / "c.jsonl", ROWS)
    with pytest.raises(UserError, match="field 'revision'.*Hub datasets only"):
        _build(tmp_path, "path: c.jsonl\nrevision: main", tokenizer)


def test_split_slices_apply_to_save_to_disk_folders(tmp_path, tokenizer):
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:2])}
                         ).save_to_disk(str(tmp_path / "saved_dict"))
    calib = _build(tmp_path, "path: saved_dict\nsplit: train[:3]", tokenizer, max_samples=8)
    assert calib.per_dataset["saved_dict"].loaded == 3  # the slice, not the 12 rows of train
    _assert_rows_came_from(calib, ROWS[:3])
    with pytest.raises(UserError, match="(?s)field .split.*.validation. not in the saved dataset.*use one of: train, test"):
        _build(tmp_path, "path: saved_dict\nsplit: validation[:3]", tokenizer)
    with pytest.raises(UserError, match="field 'split'.*cannot read split 'train\\[:x\\]'"):
        _build(tmp_path, "path: saved_dict\nsplit: train[:x]", tokenizer)


def test_hub_failure_is_a_user_error_naming_entry(tmp_path, tokenizer, monkeypatch):
    def unreachable(path, **kwargs):
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(UserError) as caught:
        _build(tmp_path, "name: web\npath: owner/web-set", tokenizer)
    message = str(caught.value)
    assert "datasets[0] (name: 'web'), field 'path'" in message
    assert "Couldn't reach 'owner/web-set'" in message and "HF_TOKEN" in message


def test_subset_on_a_local_file_is_rejected(tmp_path, tokenizer):
    write_jsonl(tmp_path / "c.jsonl", ROWS)
    with pytest.raises(UserError, match="field 'subset'.*Hub datasets only"):
        _build(tmp_path, "path: c.jsonl\nsubset: en", tokenizer)


def test_named_column_missing_at_build_lists_available(tmp_path, tokenizer):
    write_jsonl(tmp_path / "c.jsonl", ROWS)
    with pytest.raises(UserError) as caught:
        _build(tmp_path, "name: corpus\npath: c.jsonl\ntext_column: body", tokenizer)
    message = str(caught.value)
    assert "datasets[0] (name: 'corpus'), field 'text_column'" in message
    assert "available columns: text, id" in message
