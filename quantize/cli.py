"""``quant-abliterate quantize`` and the seed's ``quantize_nvfp4*.py`` scripts.

All three entry points parse the same flags and call ``run_quantize``; the
offload script only makes ``--offload_folder`` required.
"""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console

from quantize.recipes import print_format_table
from quantize.settings import build_parser, settings_from_args


def load_dotenv_if_present(path: str | Path = ".env") -> bool:
    """Seed compatibility: HF_TOKEN / INPUT_MODEL / OUTPUT_MODEL may come from ./.env (flags win)."""
    if not Path(path).is_file():
        return False
    from dotenv import load_dotenv

    return load_dotenv(path, override=False)


def main(argv: list[str] | None = None, *, offload: bool = False, prog: str = "quant-abliterate quantize") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(prog=prog, offload=offload and "--list_configs" not in argv)
    args = parser.parse_args(argv)
    console = Console()
    if args.list_configs:
        print_format_table(console)
        return 0
    settings = settings_from_args(args)
    from quantize.stage import run_quantize

    run_quantize(settings, console)
    return 0


def seed_script_main(offload: bool, prog: str) -> int:
    """Body of the repo-root shims: .env, then the same CLI, with UserError printed cleanly."""
    from foundation.guarded_cli import run_guarded

    load_dotenv_if_present()
    return run_guarded(lambda argv: main(argv, offload=offload, prog=prog), sys.argv[1:])


if __name__ == "__main__":
    from foundation.guarded_cli import run_guarded

    sys.exit(run_guarded(main, sys.argv[1:]))
