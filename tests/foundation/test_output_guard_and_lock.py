"""S9-S12 / security 4 (no output may destroy an input) and S14 (one writer per output)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from foundation.atomic_output import atomic_output_dir
from foundation.errors import UserError
from foundation.output_guard import check_output_location
from foundation.output_lock import lock_path_for, output_lock


@pytest.fixture
def model(tmp_path):
    folder = tmp_path / "models" / "M"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    return folder


@pytest.mark.parametrize("relation, output", [
    ("is", lambda m: m),
    ("contains", lambda m: m.parent),
    ("lies inside", lambda m: m / "out"),
])
def test_an_output_related_to_an_input_is_refused_naming_both(model, relation, output):
    target = output(model)
    with pytest.raises(UserError) as caught:
        check_output_location(target, {"--input_model": model}, output_flag="--output_model")
    message = str(caught.value)
    assert f"the output {relation} the input --input_model" in message
    assert str(target) in message and str(model) in message and "--overwrite" in message
    assert (model / "config.json").is_file()


def test_a_symlinked_or_relative_spelling_of_the_input_is_caught(model, tmp_path, monkeypatch):
    link = tmp_path / "link"
    link.symlink_to(model)
    with pytest.raises(UserError, match="the output is the input"):
        check_output_location(link, {"--model": model})
    monkeypatch.chdir(model.parent)
    with pytest.raises(UserError, match="the output is the input"):
        check_output_location("./M/../M", {"--model": "M"})


def test_a_sibling_output_and_hub_ids_pass(model):
    check_output_location(model.parent / "M-NVFP4", {"--input_model": model, "--hub": "org/name", "--none": None})


def test_a_file_input_may_not_sit_inside_the_output(tmp_path):
    mix = tmp_path / "data" / "mix.yaml"
    mix.parent.mkdir()
    mix.write_text("x")
    with pytest.raises(UserError, match="contains the input --dataset_yaml"):
        check_output_location(tmp_path / "data", {"--dataset_yaml": mix})


def test_overwrite_can_never_delete_the_working_directory_or_home(tmp_path, monkeypatch):
    work = tmp_path / "project"
    work.mkdir()
    (work / "precious.txt").write_text("keep")
    monkeypatch.chdir(work)
    for target in (work, tmp_path, "."):
        with pytest.raises(UserError, match="working directory"):
            with atomic_output_dir(target, overwrite=True):
                pass
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    with pytest.raises(UserError, match="home folder"):
        with atomic_output_dir(tmp_path / "home", overwrite=True):
            pass
    assert (work / "precious.txt").read_text() == "keep"
    with atomic_output_dir(work / "outputs" / "run") as out:  # inside the working directory is fine
        (out / "a").write_text("a")
    assert (work / "outputs" / "run" / "a").is_file()


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    """Two processes: the holder keeps the lock until told to stop; the second attempt names it."""
    target = tmp_path / "D"
    ready = tmp_path / "ready"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import pathlib, sys, time
        from foundation.output_lock import output_lock
        with output_lock({str(target)!r}):
            pathlib.Path({str(ready)!r}).write_text("x")
            sys.stdin.read()
    """), "--output_dir", "D"], stdin=subprocess.PIPE, cwd=os.getcwd())
    try:
        for _ in range(600):
            if ready.exists() or holder.poll() is not None:
                break
            time.sleep(0.05)
        assert ready.exists(), "the holder never took the lock"
        with pytest.raises(UserError) as caught:
            with output_lock(target):
                pass
        message = str(caught.value)
        assert f"pid {holder.pid}" in message and "on host" in message and "--output_dir D" in message
        assert "since" in message and "being written by another run" in message
        with pytest.raises(UserError, match="another run"):  # atomic_output_dir locks too
            with atomic_output_dir(target):
                pass
        assert not target.exists()
    finally:
        holder.communicate(b"", timeout=30)
    with output_lock(target):  # released when the holder ended
        pass
    assert not lock_path_for(target).exists(), "the lock file is removed on release"


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    target = tmp_path / "D"
    ready = tmp_path / "ready"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import pathlib, time
        from foundation.output_lock import output_lock
        with output_lock({str(target)!r}):
            pathlib.Path({str(ready)!r}).write_text("x")
            time.sleep(600)
    """)], cwd=os.getcwd())
    for _ in range(600):
        if ready.exists():
            break
        time.sleep(0.05)
    holder.kill()
    holder.wait()
    assert lock_path_for(target).exists()  # SIGKILL: the file stays, the kernel's lock does not
    with output_lock(target):
        pass


def test_the_lock_is_reentrant_within_one_process(tmp_path):
    target = tmp_path / "D"
    with output_lock(target):
        with atomic_output_dir(target) as out:
            (out / "x").write_text("x")
        assert lock_path_for(target).exists()
    assert (target / "x").is_file() and not lock_path_for(target).exists()


def test_every_spelling_of_the_output_names_one_lock(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    assert lock_path_for(tmp_path / "alias" / "D") == lock_path_for(tmp_path / "real" / "D")
    with output_lock(tmp_path / "alias" / "D"), output_lock(tmp_path / "real" / "D"):
        pass  # re-entrant, not a conflict with itself
