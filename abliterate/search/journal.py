"""The study's journal file: opened through Optuna's own backend and lock, repaired if a write was cut short.

Optuna appends each record as one JSON line (``JournalFileBackend.append_logs``, under its
``JournalFileSymlinkLock``). A run stopped mid-append (the disk filled up, the machine lost
power) leaves a last line without its newline. Optuna skips such a line when reading, but
the next append lands right after it, the two fuse into one invalid line, and every later
run fails with ``JSONDecodeError``: the study is stuck. ``repair_journal`` runs before the
storage is opened, under the same lock, and

* cuts a half-written last record (``os.truncate``: needs no free space);
* splits a line in which a half-written record was fused with the next one (written by an
  older version that did not repair), keeping the whole record;
* refuses (``UserError``) a journal damaged any other way, rather than guess.

What was cut is kept beside the journal (``journal.log.dropped-<time>``) when space allows.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

from foundation.errors import UserError

RECORD_START = b'{"op_code":'  # every record Optuna writes starts so (JournalStorage._write_log)


def _is_record(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _salvage(line: bytes) -> bytes | None:
    """The whole record at the end of a line that starts with a half-written one, if there is one."""
    start = line.rfind(RECORD_START)
    while start > 0:
        if _is_record(line[start:]):
            return line[start:]
        start = line.rfind(RECORD_START, 0, start)
    return None


def repaired_content(data: bytes, where: str) -> tuple[bytes, bytes, int]:
    """(journal as it should be, the bytes dropped, how many fused lines were split); pure, for tests."""
    lines = data.splitlines(keepends=True)
    tail = b""
    if lines and not lines[-1].endswith(b"\n"):
        tail = lines.pop()  # half-written: Optuna itself never reads it
    kept, dropped, salvaged = [], [tail] if tail else [], 0
    for number, line in enumerate(lines, start=1):
        if _is_record(line):
            kept.append(line)
            continue
        record = _salvage(line)
        if record is None:
            raise UserError(
                f"{where}:{number}",
                "is not an Optuna journal record (the file was damaged other than by a cut-short write)",
                "move the study folder away (a new search starts from scratch), or restore it from a backup",
            )
        kept.append(record)
        dropped.append(line[: len(line) - len(record)])
        salvaged += 1
    return b"".join(kept), b"".join(dropped), salvaged


def repair_journal(path: Path) -> str | None:
    """Repair ``path`` in place (see the module docstring); returns what was done, or None if it was whole."""
    if not path.is_file() or path.stat().st_size == 0:
        return None
    lock = JournalFileSymlinkLock(str(path))
    lock.acquire()
    try:
        data = path.read_bytes()
        content, dropped, salvaged = repaired_content(data, str(path))
        if not dropped:
            return None
        saved = path.with_name(f"{path.name}.dropped-{time.strftime('%Y%m%d-%H%M%S')}")
        try:
            saved.write_bytes(dropped)
        except OSError:
            saved.unlink(missing_ok=True)
            saved = None
        if data.startswith(content):
            os.truncate(path, len(content))  # only the tail goes: no free space needed
        else:
            temporary = path.with_name(f".{path.name}.repair-{os.getpid()}")
            with no_space_left(path):
                temporary.write_bytes(content)
                os.replace(temporary, path)
    finally:
        lock.release()
    what = (f"dropped a half-written last record ({len(dropped)} bytes)" if not salvaged
            else f"split {salvaged} half-written record(s) from the records after them ({len(dropped)} bytes dropped)")
    kept = content.count(b"\n")
    return (f"{path}: {what}, left by a run stopped mid-write (full disk, power loss); the study resumes from the "
            f"{kept} whole records" + (f" (dropped bytes kept in {saved})" if saved else ""))


def journal_backend(path: Path) -> tuple[JournalFileBackend, str | None]:
    """Optuna's journal file backend on ``path`` with its default file lock, after ``repair_journal``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    note = repair_journal(path)
    with no_space_left(path):
        return JournalFileBackend(str(path), lock_obj=JournalFileSymlinkLock(str(path))), note


def open_journal(path: Path) -> tuple[JournalStorage, str | None]:
    """Optuna's journal storage on ``path`` with its default file lock, after ``repair_journal``."""
    backend, note = journal_backend(path)
    with no_space_left(path):
        return JournalStorage(backend), note


@contextlib.contextmanager
def no_space_left(path: Path | str) -> Iterator[None]:
    """A full disk (or quota) while writing under ``path`` is a UserError saying so, not two tracebacks."""
    try:
        yield
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise UserError(
            str(path),
            f"no space left on device at {path} ({os.strerror(error.errno)})",
            "free some space (or point --study_dir / --out at another disk) and re-run the same command: "
            "the study resumes from its last complete trial",
        ) from None
