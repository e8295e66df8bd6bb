"""Export: --overwrite never deletes an input (S11), and a multi-format export resumes the missing formats (S15)."""

from __future__ import annotations

import json
import shutil

import pytest

from abliterate import export_cli
from abliterate.export import run as export_run
from foundation.errors import UserError
from tests.abliterate.export.conftest import llama_config, make_trial

FLAGS = ["--no-verify", "--no_progress"]


@pytest.fixture()
def trial_dir(tmp_path):
    directory = tmp_path / "trial"
    make_trial(llama_config(), directory)
    return directory


@pytest.fixture()
def model_copy(llama_dir, tmp_path):
    copy = tmp_path / "M"
    shutil.copytree(llama_dir, copy)
    return copy


@pytest.mark.parametrize("target", ["trial", "checkpoint", "base_model", "inside_trial"])
def test_overwrite_never_deletes_an_input_of_the_export(trial_dir, model_copy, target):
    before = {path: path.read_bytes() for path in [*trial_dir.iterdir(), *model_copy.iterdir()]}
    output = {"trial": trial_dir, "checkpoint": model_copy, "base_model": model_copy,
              "inside_trial": trial_dir / "exports"}[target]
    extra = ["--base_model", str(model_copy)] if target == "base_model" else []
    with pytest.raises(UserError) as caught:
        export_cli.main([str(trial_dir), "--checkpoint", str(model_copy), *extra, "--format", "bf16",
                         "-o", str(output), "--overwrite", *FLAGS])
    message = str(caught.value)
    assert "--output" in message and str(output) in message and "--overwrite" in message
    assert "the input" in message
    assert {path: path.read_bytes() for path in before} == before  # nothing touched


def test_a_killed_multi_format_export_resumes_the_missing_formats(llama_dir, trial_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    argv = [str(trial_dir), "--checkpoint", str(llama_dir), "--format", "bf16", "--format", "adapter", "-o", str(out),
            *FLAGS]

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # SIGINT after bf16 was written

    monkeypatch.setattr(export_run, "export_adapter", killed)
    with pytest.raises(KeyboardInterrupt):
        export_cli.main(argv)
    assert (out / "bf16" / "export_manifest.json").is_file() and not (out / "adapter").exists()
    written = {path.name: path.stat().st_mtime_ns for path in (out / "bf16").iterdir()}
    monkeypatch.undo()

    capsys.readouterr()
    assert export_cli.main(argv) == 0  # no --overwrite: the complete format is kept, the missing one written
    printed = capsys.readouterr().out
    assert "bf16" in printed and "already complete" in printed and "skipped" in printed
    assert {path.name: path.stat().st_mtime_ns for path in (out / "bf16").iterdir()} == written
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 1

    make_trial(llama_config(), trial_dir, seed=2)  # another trial at the same path must not be "complete"
    with pytest.raises(UserError, match=r"differs in: trial"):
        export_cli.main(argv)
