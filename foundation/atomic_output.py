"""Write an output directory so that it exists only when it is complete.

Outputs are built in a hidden sibling directory (same filesystem, so the final
``rename`` is atomic) and moved into place at the end. An interrupted run leaves
no partial output, only the hidden temporary directory, which the next run
removes. An existing output is never replaced unless ``overwrite`` is set, and
never when it is (or holds) the working directory or the home folder
(``foundation.output_guard``). The output is locked while it is written
(``foundation.output_lock``), and temporary names are unique per process, so two
writers can neither collide nor both succeed.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from foundation.errors import UserError
from foundation.output_guard import check_output_location
from foundation.output_lock import output_lock

TEMP_PREFIX = ".tmp-"


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def make_readable(path: str | os.PathLike[str]) -> None:
    """Give ``path`` (and everything below it) the modes a plain ``open`` would: 0644 / 0755 under umask 022.

    safetensors and ``tempfile`` create files private to their owner (0600 / 0700);
    a serving container or another user must be able to read what we publish.
    """
    mask = _umask()
    path = Path(path)
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for item in paths:
        if item.is_symlink():
            continue
        item.chmod((0o777 if item.is_dir() else 0o666) & ~mask)


def temporary_sibling(final_dir: Path, role: str = "") -> Path:
    """A hidden sibling name unique to this process and call (``.tmp-<name>~<pid>-<random>``)."""
    return final_dir.parent / f"{TEMP_PREFIX}{role}{final_dir.name}~{os.getpid()}-{uuid.uuid4().hex[:8]}"


def temporary_dirs(final_dir: Path) -> list[Path]:
    """Every temporary sibling of ``final_dir`` left by any run (also the fixed names of older versions)."""
    final_dir = Path(final_dir)
    if not final_dir.parent.is_dir():
        return []
    pattern = re.compile(rf"{re.escape(TEMP_PREFIX)}(old-)?{re.escape(final_dir.name)}(~\d+-[0-9a-f]{{8}})?")
    return sorted(path for path in final_dir.parent.iterdir() if pattern.fullmatch(path.name))


def check_writable_output(final_dir: Path, overwrite: bool, flag: str = "--overwrite") -> None:
    """Fail early (before any expensive work) if the output cannot be written.

    It may not exist yet (unless ``overwrite``), may not be a file, and its nearest existing parent must be a
    writable directory: a read-only parent or a file in the path otherwise shows only after the calibration or
    the search, as a bare ``OSError``.
    """
    final_dir = Path(final_dir)
    if final_dir.exists() and not final_dir.is_dir():
        raise UserError(str(final_dir), "the output path is an existing file, not a directory",
                        "choose another output path (a directory to be created), or move that file away")
    if final_dir.exists() and not overwrite:
        raise UserError(
            str(final_dir),
            "the output directory already exists",
            f"choose another output path, or pass {flag} to replace it",
        )
    check_parent_writable(final_dir)


def check_parent_writable(final_dir: Path) -> None:
    """The directory the output (and its hidden temporary sibling) will be created in must be writable."""
    check_can_write_in(Path(final_dir).absolute().parent, what=str(final_dir))


def check_can_write_in(directory: Path, what: str | None = None) -> None:
    """``directory``, or the nearest of its parents that exists (it will be created), must be a writable directory."""
    directory = Path(directory).absolute()
    what = what or str(directory)
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(what, f"{existing} is a file, so no directory can be created below it",
                        "choose an output path whose parent folders are directories")
    probe = existing / f"{TEMP_PREFIX}probe-{os.getpid()}"
    try:  # a real attempt: os.access says yes to root on a read-only mount's 0555 folder, and knows no ENOSPC
        os.mkdir(probe)
        os.rmdir(probe)
    except OSError as error:
        reason = os.strerror(error.errno) if error.errno else str(error)
        raise UserError(what, f"cannot create the output in {existing}: {reason}",
                        "choose an output path in a writable folder with free space, or fix that folder's permissions") from None


@contextlib.contextmanager
def atomic_output_dir(final_dir: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it becomes ``final_dir``.

    On any exception (including KeyboardInterrupt) the temporary directory is
    removed and ``final_dir`` is left exactly as it was.
    """
    final_dir = Path(final_dir).absolute()
    check_output_location(final_dir)
    check_writable_output(final_dir, overwrite)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(final_dir):
        check_writable_output(final_dir, overwrite)  # again: another run may have finished it meanwhile
        for stale in temporary_dirs(final_dir):  # we hold the lock: no live run owns these
            shutil.rmtree(stale, ignore_errors=True)
        temp_dir = temporary_sibling(final_dir)
        temp_dir.mkdir()
        try:
            yield temp_dir
        except BaseException:
            shutil.rmtree(temp_dir, ignore_errors=True)
            raise
        make_readable(temp_dir)
        if final_dir.exists():
            # Replace: move the old output aside first so there is never a moment
            # with neither the old nor the new directory in place.
            old_dir = temporary_sibling(final_dir, role="old-")
            final_dir.rename(old_dir)
            temp_dir.rename(final_dir)
            shutil.rmtree(old_dir, ignore_errors=True)
        else:
            temp_dir.rename(final_dir)
