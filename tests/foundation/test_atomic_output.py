"""The output-directory contract every stage relies on: all or nothing, no silent overwrite."""

from __future__ import annotations

import os

import pytest

from foundation.atomic_output import (
    atomic_output_dir,
    temporary_dirs,
    temporary_sibling,
)
from foundation.errors import UserError


def test_success_moves_complete_directory_into_place(tmp_path):
    final = tmp_path / "out"
    with atomic_output_dir(final) as work:
        (work / "a.txt").write_text("hello")
        assert not final.exists(), "the final path must not appear before completion"
    assert (final / "a.txt").read_text() == "hello"
    assert not temporary_dirs(final)


def test_interrupted_write_leaves_nothing(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(final) as work:
            (work / "partial.bin").write_bytes(b"x" * 10)
            raise KeyboardInterrupt
    assert not final.exists()
    assert not temporary_dirs(final)


def test_existing_output_is_refused_without_overwrite(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "keep.txt").write_text("user data")
    with pytest.raises(UserError, match="--overwrite"):
        with atomic_output_dir(final):
            pass
    assert (final / "keep.txt").read_text() == "user data"


def test_overwrite_replaces_only_on_success(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output_dir(final, overwrite=True) as work:
            (work / "new.txt").write_text("new")
            raise RuntimeError("boom")
    assert (final / "old.txt").exists(), "a failed overwrite must keep the old output"
    with atomic_output_dir(final, overwrite=True) as work:
        (work / "new.txt").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]


def test_stale_temporary_directory_from_a_killed_run_is_cleared(tmp_path):
    final = tmp_path / "out"
    stale = temporary_sibling(final)
    legacy = tmp_path / ".tmp-out"  # the fixed name of older versions
    for directory in (stale, legacy):
        directory.mkdir()
        (directory / "junk").write_text("from a killed run")
    neighbour = tmp_path / ".tmp-out-NVFP4~1-0123abcd"  # another output's temporary: not ours to remove
    neighbour.mkdir()
    with atomic_output_dir(final) as work:
        assert list(work.iterdir()) == []
    assert final.exists() and not stale.exists() and not legacy.exists()
    assert neighbour.exists()


def test_temporary_names_are_unique_per_call(tmp_path):
    """Two writers of one output must never share a temporary directory (S14: fixed .tmp- names collided)."""
    final = tmp_path / "out"
    first, second = temporary_sibling(final), temporary_sibling(final)
    assert first != second and str(os.getpid()) in first.name
    assert temporary_dirs(final) == []
    first.mkdir()
    assert temporary_dirs(final) == [first]
