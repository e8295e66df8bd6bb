"""A full or read-only disk, said plainly.

Writing a checkpoint can fail deep inside safetensors (``SafetensorError: ... IoError(Os { code: 28,
kind: StorageFull ...``), ``torch.save`` (``PytorchStreamWriter failed writing file``) or plain
``open`` (``OSError: [Errno 28]``). Whatever the library, the user needs one sentence: which disk,
what happened (the output is written atomically, so nothing partial was left), and what to do.
"""

from __future__ import annotations

import errno
import re

from foundation.errors import UserError

_NO_SPACE = re.compile(r"no space left on device|storagefull|os error 28|errno 28|disk quota exceeded|os error 122", re.IGNORECASE)
_READ_ONLY = re.compile(r"read-only file system|os error 30|errno 30", re.IGNORECASE)


def _chain(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def disk_problem(error: BaseException) -> UserError | None:
    """The UserError a full / read-only disk means, or None for anything else (then it is a real bug: keep the traceback)."""
    for link in _chain(error):
        number = getattr(link, "errno", None) if isinstance(link, OSError) else None
        text = str(link)
        where = getattr(link, "filename", None) or "output"
        if number in (errno.ENOSPC, errno.EDQUOT) or _NO_SPACE.search(text):
            return UserError(str(where), "no space left on the disk (or the quota is full) while writing the output; "
                             "the output is written atomically, so nothing partial was kept",
                             "free space on that disk (a checkpoint needs about its size again while it is written), "
                             "or write the output to another disk, then run the same command again")
        if number == errno.EROFS or _READ_ONLY.search(text):
            return UserError(str(where), "the file system is read-only",
                             "write the output to a writable disk, then run the same command again")
    return None
