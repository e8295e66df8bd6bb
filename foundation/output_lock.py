"""One writer per output: an OS file lock (``fcntl.flock``) beside the output, naming its holder.

Two runs writing the same output (two ``make pipeline ARGS="--output_dir D"``, or two
searches of one study) would interleave their temporary files, manifests and trials.
``output_lock(path)`` takes an exclusive, non-blocking lock on ``.<name>.lock`` next to
``path``; a second writer is refused at once with the holder's pid, host, command and
start time. The kernel drops the lock when its process dies (SIGKILL included), so a
killed run never leaves a stale lock behind. The lock is re-entrant within a process
(a command locks its output early, ``atomic_output_dir`` locks it again at the end).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from foundation.errors import UserError

# path of the lock file -> (open file descriptor, how many times this process holds it)
_held: dict[Path, list[int]] = {}


def lock_path_for(target: str | os.PathLike[str]) -> Path:
    """``.<name>.lock`` beside ``target``; the folder's real path, so every spelling of it names one lock."""
    target = Path(os.path.abspath(os.fspath(target)))
    return Path(os.path.realpath(target.parent)) / f".{target.name}.lock"


def _holder_record() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _describe_holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        holder = json.loads(os.read(fd, 65536).decode("utf-8") or "{}")
    except (OSError, ValueError):
        holder = {}
    if not holder:
        return "another process (it has not written its name yet)"
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, command "
            f"'{holder.get('command', '?')}', since {holder.get('since', '?')}")


def _acquire(lock_file: Path, what: str, target: Path) -> int:
    try:
        lock_file.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(str(target), f"cannot create the folder of the {what} ({error.strerror})",
                        "choose an output in a folder you can write to") from None
    while True:
        try:
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise UserError(str(target), f"cannot create the lock file {lock_file} ({error.strerror})",
                            "choose an output in a folder you can write to") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = _describe_holder(fd)
            os.close(fd)
            if error.errno not in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                raise
            raise UserError(
                str(target),
                f"the {what} is being written by another run: {holder} (lock {lock_file})",
                "wait for that run to finish, stop it, or choose another output; two writers would corrupt it",
            ) from None
        # The previous holder may have removed the file between our open and our lock: then we hold
        # a lock on an orphan inode, not on the path. Retry until the path and our descriptor agree.
        try:
            same = os.stat(lock_file).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextlib.contextmanager
def output_lock(target: str | os.PathLike[str], what: str = "output") -> Iterator[Path]:
    """Hold the exclusive lock of ``target`` (a file or folder, existing or not) for the ``with`` block."""
    target = Path(os.path.abspath(os.fspath(target)))
    lock_file = lock_path_for(target)
    if lock_file in _held:
        _held[lock_file][1] += 1
    else:
        fd = _acquire(lock_file, what, target)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(_holder_record()).encode("utf-8"))
        _held[lock_file] = [fd, 1]
    try:
        yield lock_file
    finally:
        entry = _held[lock_file]
        entry[1] -= 1
        if entry[1] == 0:
            del _held[lock_file]
            # Unlink while still holding it: a waiter that opened the old file sees the inode change and retries.
            with contextlib.suppress(OSError):
                lock_file.unlink()
            os.close(entry[0])
