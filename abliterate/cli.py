"""``quant-abliterate abliterate``: find refusal directions and search the edit (stage 2)."""

from __future__ import annotations

import sys

from rich.console import Console

from abliterate.settings import outside_sources, parse_settings


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    settings = parse_settings(argv)
    console = Console()
    sources = outside_sources(argv)
    if sources:  # values nobody typed on this command line: say where they came from
        console.print("settings not from the command line: "
                      + ", ".join(f"{name}={getattr(settings, name)!r} ({source})" for name, source in sources.items()), markup=False)
    from abliterate.run import (
        run_abliteration,  # heavy imports only after the flags are valid
    )

    run_abliteration(settings, console, settings_sources=sources)
    return 0


if __name__ == "__main__":
    from foundation.guarded_cli import run_guarded

    sys.exit(run_guarded(main, sys.argv[1:]))
