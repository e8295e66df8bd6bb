"""Running a subcommand's ``main`` so that a user sees a message, never a traceback."""

from __future__ import annotations

import sys

from foundation.errors import UserError


def run_guarded(entry, argv: list[str]) -> int:
    """Call a subcommand's main, printing UserError as a message (exit 2)."""
    try:
        return int(entry(argv) or 0)
    except UserError as error:
        from rich.console import Console
        from rich.markup import escape

        Console(stderr=True).print(f"[bold red]error:[/] {escape(str(error))}", highlight=False)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing partial was written; re-run the same command to resume", file=sys.stderr)
        return 130
