"""Prompt sets from datasets: save_to_disk folders written here (offline), split slices, column checks, Hub requests.

The loader is stage 1's (``foundation.dataset_sources``), so a prompt spec accepts what a calibration mix
accepts and fails the same way; every error names the spec file and the set's field.
"""

from pathlib import Path

import datasets
import pytest

from abliterate.evaluation.prompt_sets import load_prompt_spec
from abliterate.prompts import load_prompt_sets
from foundation.errors import UserError

HARMFUL = [f"harmful request number {i}" for i in range(30)]
HARMLESS = [f"harmless request number {i}" for i in range(30)]


def _save(folder: Path, prompts: list[str]) -> None:
    """A Hub-shaped dataset: train and test splits, the prompts in column 'text' (mlabonne/* are laid out so)."""
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": prompts[:20], "id": list(range(20))}),
        "test": datasets.Dataset.from_dict({"text": prompts[20:], "id": list(range(20, 30))}),
    }).save_to_disk(str(folder))


def _spec(tmp_path: Path, harmful_test: str = "{path: harmful, split: 'test[:5]', column: text}") -> Path:
    _save(tmp_path / "harmful", HARMFUL)
    _save(tmp_path / "harmless", HARMLESS)
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "harmful_train: {path: harmful, split: 'train[:12]', column: text}\n"
        "harmless_train: {path: ./harmless, split: 'train[:12]', column: text}\n"
        f"harmful_test: {harmful_test}\n"
        "harmless_test: {path: harmless, split: 'test[2:6]', column: text}\n"
    )
    return spec


def test_saved_folders_with_slices_and_columns(tmp_path):
    loaded = load_prompt_spec(_spec(tmp_path))
    assert loaded.harmful_train == HARMFUL[:12]
    assert loaded.harmless_train == HARMLESS[:12]
    assert loaded.harmful_test == HARMFUL[20:25]
    assert loaded.harmless_test == HARMLESS[22:26]
    sets = load_prompt_sets(tmp_path / "spec.yaml", {}, limit_test=3)  # stage 2's view: the caps on top
    assert sets.harmful_test == tuple(HARMFUL[20:23])


def test_plain_split_and_prompt_field_as_the_default_column(tmp_path):
    spec = _spec(tmp_path, harmful_test="{path: harmful, split: test}")
    spec.write_text(spec.read_text() + "prompt_field: text\n")
    assert load_prompt_spec(spec).harmful_test == HARMFUL[20:]


def test_a_string_naming_a_saved_folder_reads_its_train_split(tmp_path):
    datasets.Dataset.from_dict({"prompt": HARMFUL[:4]}).save_to_disk(str(tmp_path / "flat"))
    spec = _spec(tmp_path, harmful_test="flat")
    assert load_prompt_spec(spec).harmful_test == HARMFUL[:4]
    override = load_prompt_sets(spec, {"harmless_test": tmp_path / "flat"})  # a flag may name a folder too
    assert override.harmless_test == tuple(HARMFUL[:4])


def test_bad_column_names_the_spec_set_and_the_columns_there(tmp_path):
    spec = _spec(tmp_path, harmful_test="{path: harmful, split: 'test[:5]', column: prompt}")
    with pytest.raises(UserError) as caught:
        load_prompt_spec(spec)
    assert caught.value.where == f"{spec}: harmful_test, field 'column'"
    assert "no column 'prompt'" in caught.value.problem and caught.value.fix == "use one of: text, id"
    spec = _spec(tmp_path, harmful_test="{path: harmful, split: 'test[:5]', column: id}")
    with pytest.raises(UserError, match=r"harmful_test, row 0 of column 'id'.*not a non-empty string: 20"):
        load_prompt_spec(spec)


@pytest.mark.parametrize(("split", "problem"), [
    ("validation[:5]", "split 'validation' not in the saved dataset"),
    ("validation", "split 'validation' not in the saved dataset"),
    ("test[:x]", "cannot read split 'test[:x]'"),
    ("test[50:60]", "holds no rows"),
])
def test_bad_split_names_the_spec_set_and_the_field(tmp_path, split, problem):
    spec = _spec(tmp_path, harmful_test=f"{{path: harmful, split: '{split}', column: text}}")
    with pytest.raises(UserError) as caught:
        load_prompt_spec(spec)
    assert caught.value.where == f"{spec}: harmful_test, field 'split'"
    assert problem in caught.value.problem


def test_missing_folder_and_local_revision_are_refused(tmp_path):
    spec = _spec(tmp_path, harmful_test="{path: ./gone, split: test, column: text}")
    with pytest.raises(UserError) as caught:
        load_prompt_spec(spec)
    assert caught.value.where == f"{spec}: harmful_test, field 'path'"
    assert f"file not found: {tmp_path / 'gone'}" in caught.value.problem
    spec = _spec(tmp_path, harmful_test="{path: harmful, split: test, column: text, revision: main}")
    with pytest.raises(UserError, match="harmful_test, field 'revision'.*Hub datasets only"):
        load_prompt_spec(spec)
    spec = _spec(tmp_path, harmful_test="{path: harmful, splits: test}")
    with pytest.raises(UserError, match=r"harmful_test"):
        load_prompt_spec(spec)


def test_hub_sets_are_requested_with_split_and_revision(tmp_path, monkeypatch):
    calls = []

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return datasets.Dataset.from_dict({"text": [f"{path} {kwargs['split']} {i}" for i in range(3)]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    spec = _spec(tmp_path, harmful_test="{path: owner/harmful_set, split: 'test[:100]', column: text, revision: abc123}")
    assert load_prompt_spec(spec).harmful_test == [f"owner/harmful_set test[:100] {i}" for i in range(3)]
    assert calls == [("owner/harmful_set", {"name": None, "split": "test[:100]", "streaming": False, "revision": "abc123"})]


def test_the_shipped_standard_spec_names_heretics_default_sets():
    import yaml

    from foundation.package_data import resolve_data_path

    spec = yaml.safe_load(resolve_data_path("datasets_yaml/standard_prompts.yaml").read_text())
    wanted = {"harmful_train": ("mlabonne/harmful_behaviors", "train[:400]"),
              "harmful_test": ("mlabonne/harmful_behaviors", "test[:100]"),
              "harmless_train": ("mlabonne/harmless_alpaca", "train[:400]"),
              "harmless_test": ("mlabonne/harmless_alpaca", "test[:100]")}
    for name, (path, split) in wanted.items():
        assert (spec[name]["path"], spec[name]["split"], spec[name]["column"]) == (path, split, "text")
        assert spec[name]["revision"]  # pinned (a branch until a sha is recorded)
