"""An output must never be, hold or sit inside something the command reads (or the user's working places).

``--overwrite`` deletes the output before the new one is moved into place, so an
output path equal to the input model (or to a folder holding it, or to the working
directory or the home folder) would delete what the run reads or far more. Every
command checks its output against its inputs with ``check_output_location`` before
any work; ``atomic_output_dir`` checks the working directory and the home folder
on its own, so no writer can forget them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from foundation.errors import UserError

PathLike = str | os.PathLike[str]


def _real(path: PathLike) -> Path:
    """Absolute, symlinks resolved, ``~`` expanded; a path that does not exist yet is resolved as far as it does."""
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def protected_places() -> dict[str, Path]:
    """Places no output may be or contain, whatever the command."""
    places = {"the working directory": _real(Path.cwd())}
    home = os.path.expanduser("~")
    if home and home != "~":
        places["the home folder"] = _real(home)
    return places


def check_output_location(output: PathLike, inputs: Mapping[str, PathLike | None] | None = None,
                          *, output_flag: str = "the output", overwrite_flag: str = "--overwrite") -> None:
    """Refuse an output that equals, contains or lies inside an input, or equals / contains a protected place.

    ``inputs`` maps the flag (or field) that named each input to its path; inputs that are no local path
    (a Hub id, None) are skipped. A file input may not be the output or lie inside it.
    """
    target = _real(output)
    for name, place in protected_places().items():
        if _inside(place, target):
            what = "is" if place == target else "contains"
            raise UserError(
                f"{output_flag} {output}",
                f"the output {what} {name} ({place}); {overwrite_flag} would delete it",
                f"choose a new, dedicated output folder (e.g. outputs/<name>), not {target}",
            )
    for flag, given in (inputs or {}).items():
        if given is None or str(given) == "":
            continue
        source = _real(given)
        if not source.exists():
            continue  # a Hub id or a path to be created: nothing on disk to lose
        if _inside(source, target):
            relation = "is" if source == target else "contains"
        elif source.is_dir() and _inside(target, source):
            relation = "lies inside"
        else:
            continue
        raise UserError(
            f"{output_flag} {output}",
            f"the output {relation} the input {flag} {given} ({source}); writing there "
            f"(or {overwrite_flag}, which deletes the output first) would destroy the input",
            f"choose an output outside {source}, e.g. a sibling folder",
        )
