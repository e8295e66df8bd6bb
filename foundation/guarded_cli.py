"""Running a subcommand's ``main`` so that a user sees a message, never a traceback."""

from __future__ import annotations

import sys

from foundation.disk_errors import disk_problem
from foundation.errors import UserError


def _print_error(error: UserError) -> int:
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True).print(f"[bold red]error:[/] {escape(str(error))}", highlight=False)
    return 2


def run_guarded(entry, argv: list[str]) -> int:
    """Call a subcommand's main, printing UserError as a message (exit 2)."""
    try:
        return int(entry(argv) or 0)
    except UserError as error:
        return _print_error(error)
    except Exception as error:  # safetensors and torch wrap a full disk in their own exception types
        problem = disk_problem(error)  # a full / read-only disk is said plainly; anything else is a bug: traceback
        if problem is None:
            raise
        return _print_error(problem)
    except KeyboardInterrupt:
        print("interrupted: nothing partial was written; re-run the same command to resume", file=sys.stderr)
        return 130
