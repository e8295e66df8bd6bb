"""``quant-abliterate abliterate``: find refusal directions and search the edit (stage 2)."""

from __future__ import annotations

import os
import sys

from rich.console import Console

from abliterate.settings import AbliterateSettings, outside_sources, parse_settings


def remote_code_warning(settings: AbliterateSettings, sources: dict[str, str]) -> str | None:
    """Security: remote code turned on by ./config.toml or QA_TRUST_REMOTE_CODE (not typed here) must be loud."""
    source = sources.get("trust_remote_code")
    if not (settings.trust_remote_code and source):
        return None
    return (f"WARNING: trust_remote_code is ON, set by {source}, not on this command line: the model folder's own "
            "Python code (configuration_*.py / modeling_*.py) will run with your permissions. Keep it only for a "
            f"repository you trust: remove it from {source}, or pass --trust_remote_code yourself to make it explicit.")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    settings = parse_settings(argv)
    console = Console()
    sources = outside_sources(argv)
    warning = remote_code_warning(settings, sources)
    if warning:
        Console(stderr=True).print(warning, style="bold red", markup=False, highlight=False)
    if sources:  # values nobody typed on this command line: say where they came from
        console.print("settings not from the command line: "
                      + ", ".join(f"{name}={getattr(settings, name)!r} ({source})" for name, source in sources.items()), markup=False)
    # A trial allocates many shapes (prefills, KV caches, captured graphs' pools): growable segments keep the
    # GPU's reserved memory near what is allocated. Read when CUDA first allocates; a user's own setting wins.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    from abliterate.run import (
        run_abliteration,  # heavy imports only after the flags are valid
    )

    run_abliteration(settings, console, settings_sources=sources)
    return 0


if __name__ == "__main__":
    from foundation.guarded_cli import run_guarded

    sys.exit(run_guarded(main, sys.argv[1:]))
