"""The data the project ships (calibration mixes, prompt specs, corpora, pipeline YAMLs, the testbed model), found where it is installed.

Defaults are written as repository-relative paths (``datasets_yaml/offline_mix.yaml``,
``testbed/model``) because that is what users type and what the README shows.
From a checkout those paths exist below the working directory; from a
non-editable install they live inside the installed packages, so a relative
path that does not exist here is looked up there through ``importlib.resources``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

# First path component -> the installed package that holds it.
_PACKAGED_ROOTS = {"datasets_yaml": "datasets_yaml", "testbed": "testbed", "pipelines": "pipelines"}


def packaged(relative: str | Path) -> Path:
    """Where a repository-relative data path lives in the installed project."""
    first, *rest = Path(relative).parts
    if first not in _PACKAGED_ROOTS:
        raise ValueError(f"{relative} is not under a packaged data folder ({', '.join(_PACKAGED_ROOTS)})")
    root = resources.files(_PACKAGED_ROOTS[first])
    return Path(str(root.joinpath(*rest)))


def resolve_data_path(path: str | Path) -> Path:
    """``path`` itself if it exists (or is absolute or outside the packaged folders), else the packaged copy."""
    path = Path(path).expanduser()
    if path.exists() or path.is_absolute() or not path.parts or path.parts[0] not in _PACKAGED_ROOTS:
        return path
    candidate = packaged(path)
    return candidate if candidate.exists() else path
