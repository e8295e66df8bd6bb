"""Shipped data is found from the checkout and from an installed copy, and published files are readable by others."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from foundation.atomic_output import atomic_output_dir
from foundation.package_data import packaged, resolve_data_path


def test_packaged_paths_point_at_the_shipped_files():
    assert packaged("datasets_yaml/offline_mix.yaml").is_file()
    assert packaged("datasets_yaml/testbed_prompts.yaml").is_file()
    assert (packaged("testbed/model") / "model.safetensors").is_file()
    assert packaged("pipelines/testbed_default.yaml").is_file()
    with pytest.raises(ValueError, match="not under a packaged data folder"):
        packaged("somewhere/else.yaml")


def test_relative_default_resolves_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    resolved = resolve_data_path("datasets_yaml/offline_mix.yaml")
    assert resolved.is_absolute() and resolved.is_file()


def test_a_local_file_wins_over_the_packaged_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "datasets_yaml").mkdir()
    (tmp_path / "datasets_yaml" / "offline_mix.yaml").write_text("datasets: []\n")
    assert resolve_data_path("datasets_yaml/offline_mix.yaml").resolve() == (tmp_path / "datasets_yaml" / "offline_mix.yaml").resolve()
    assert resolve_data_path("elsewhere/missing.yaml") == Path("elsewhere/missing.yaml")  # left for the caller to report
    assert not resolve_data_path("datasets_yaml/no_such_mix.yaml").exists()


def test_published_outputs_are_readable_by_others(tmp_path):
    previous = os.umask(0o022)
    try:
        final = tmp_path / "out"
        with atomic_output_dir(final) as work:
            save_file({"w": torch.zeros(2)}, str(work / "model.safetensors"))  # safetensors writes 0600
            (work / "sub").mkdir(mode=0o700)
            (work / "sub" / "x.json").write_text("{}")
        assert stat.S_IMODE((final / "model.safetensors").stat().st_mode) == 0o644
        assert stat.S_IMODE((final / "sub").stat().st_mode) == 0o755
        assert stat.S_IMODE(final.stat().st_mode) == 0o755
    finally:
        os.umask(previous)
