"""Stage 2: --overwrite never deletes the model (S10), one writer per output and study (S14), pickle-only
weights refused (security 5), remote code from config.toml / QA_* said loudly (security 2)."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from rich.console import Console

import abliterate.run
from abliterate import cli
from abliterate.settings import outside_sources, parse_settings
from foundation.errors import UserError
from tests.abliterate.tiny_chat import write_prompts, write_tiny_chat_model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return write_tiny_chat_model(tmp_path_factory.mktemp("tiny") / "M")


@pytest.fixture
def model_copy(tiny_model, tmp_path):
    copy = tmp_path / "models" / "M"
    shutil.copytree(tiny_model, copy)
    return copy


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad output was reported")

    monkeypatch.setattr(abliterate.run, "load_model", refuse)


@pytest.mark.parametrize("where", ["same", "parent", "inside"])
def test_overwrite_never_deletes_the_model(model_copy, no_model_load, where):
    files = {path.name: path.read_bytes() for path in model_copy.iterdir()}
    out = {"same": model_copy, "parent": model_copy.parent, "inside": model_copy / "abliterated"}[where]
    settings = parse_settings(["--model", str(model_copy), "--out", str(out), "--overwrite"])
    with pytest.raises(UserError) as caught:
        abliterate.run.run_abliteration(settings, Console(file=io.StringIO()))
    assert f"--out {out}" in str(caught.value) and "the input --model" in str(caught.value)
    assert {path.name: path.read_bytes() for path in model_copy.iterdir()} == files


def test_overwrite_never_deletes_the_prompt_files(model_copy, tmp_path, no_model_load):
    spec = write_prompts(tmp_path / "prompts")
    settings = parse_settings(["--model", str(model_copy), "--prompts", str(spec), "--out", str(tmp_path / "prompts"),
                               "--overwrite"])
    with pytest.raises(UserError, match="the input --prompts"):
        abliterate.run.run_abliteration(settings, Console(file=io.StringIO()))
    assert spec.is_file()


def test_a_second_search_of_the_same_study_is_refused_naming_the_first(model_copy, tmp_path, no_model_load):
    study = tmp_path / "study"
    ready = tmp_path / "ready"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import pathlib, sys
        from foundation.output_lock import output_lock
        with output_lock({str(study)!r}, what="study"):
            pathlib.Path({str(ready)!r}).write_text("x")
            sys.stdin.read()
    """), "abliterate", "--model", "M"], stdin=subprocess.PIPE, cwd=os.getcwd())
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert time.monotonic() < deadline and holder.poll() is None, "the holder never took the lock"
            time.sleep(0.05)
        settings = parse_settings(["--model", str(model_copy), "--out", str(tmp_path / "other-out"),
                                   "--study_dir", str(study)])
        with pytest.raises(UserError) as caught:
            abliterate.run.run_abliteration(settings, Console(file=io.StringIO()))
        message = str(caught.value)
        assert "the study is being written by another run" in message and f"pid {holder.pid}" in message
        assert "abliterate --model M" in message
        assert not (tmp_path / "other-out").exists()
    finally:
        holder.communicate(b"", timeout=30)


def test_a_model_with_only_pickle_weights_is_refused(model_copy):
    from safetensors.torch import load_file

    from abliterate.loading import load_model

    for weights in model_copy.glob("*.safetensors"):
        torch.save(load_file(str(weights)), model_copy / "pytorch_model.bin")
        weights.unlink()
    with pytest.raises(UserError) as caught:
        load_model(str(model_copy), dtypes=["float32"], device_map=None)
    assert "--model" in caught.value.where and "only pickle weights (pytorch_model.bin)" in caught.value.problem


def test_from_pretrained_is_told_to_use_safetensors(model_copy, monkeypatch):
    from abliterate import loading

    seen = {}

    def record(*args, **kwargs):
        seen.update(kwargs)
        raise OSError("stop here")

    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", record)
    with pytest.raises(UserError):
        loading.load_model(str(model_copy), dtypes=["float32"], device_map=None)
    assert seen["use_safetensors"] is True


@pytest.mark.parametrize("source", ["config.toml", "environment"])
def test_remote_code_not_from_the_command_line_is_printed_loudly(tmp_path, monkeypatch, capsys, source):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("QA_TRUST_REMOTE_CODE", raising=False)
    if source == "config.toml":
        (tmp_path / "config.toml").write_text("[abliterate]\ntrust_remote_code = true\n")
    else:
        monkeypatch.setenv("QA_TRUST_REMOTE_CODE", "1")
    ran = []
    monkeypatch.setattr(abliterate.run, "run_abliteration", lambda settings, console, **kwargs: ran.append(settings))
    assert cli.main(["--model", str(tmp_path), "--out", str(tmp_path / "o")]) == 0
    assert ran[0].trust_remote_code is True
    warning = capsys.readouterr().err
    assert "WARNING: trust_remote_code is ON" in warning
    assert ("config.toml" if source == "config.toml" else "QA_TRUST_REMOTE_CODE") in warning

    argv = ["--model", str(tmp_path), "--trust_remote_code"]  # typed on the command line: no warning
    assert cli.remote_code_warning(parse_settings(argv), outside_sources(argv)) is None
