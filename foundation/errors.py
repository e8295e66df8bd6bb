"""The one exception type a user ever sees.

Every bad input (a file, a YAML field, a CLI flag) is reported by raising
``UserError`` with *where* the problem is and *how to fix it*. The command-line
entry point catches it and prints a short message instead of a traceback, so
any code path can fail cleanly without knowing how it was invoked.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix: names the offending input and the remedy."""

    def __init__(self, where: str, problem: str, fix: str | None = None) -> None:
        self.where = where
        self.problem = problem
        self.fix = fix
        message = f"{where}: {problem}"
        if fix:
            message += f"\n  fix: {fix}"
        super().__init__(message)
