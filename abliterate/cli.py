"""``quant-abliterate abliterate``: find refusal directions and search the edit (stage 2)."""

from __future__ import annotations

import sys

from rich.console import Console

from abliterate.settings import parse_settings


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(list(sys.argv[1:] if argv is None else argv))
    from abliterate.run import (
        run_abliteration,  # heavy imports only after the flags are valid
    )

    run_abliteration(settings, Console())
    return 0


if __name__ == "__main__":
    from foundation.guarded_cli import run_guarded

    sys.exit(run_guarded(main, sys.argv[1:]))
