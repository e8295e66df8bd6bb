"""The ``quant-abliterate`` command: one entry point, one subcommand per stage.

Each subcommand lives in the module that owns it and exposes
``main(argv: list[str]) -> int``; this dispatcher imports it lazily (ModelOpt
alone takes ~15 s to import) and turns ``UserError`` into a short message.
"""

from __future__ import annotations

import importlib
import sys

from foundation.guarded_cli import run_guarded

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "quantize": ("quantize.cli", "stage 1: calibrate with ModelOpt and export an NVFP4/FP8 checkpoint"),
    "inspect": ("checkpoint_formats.cli_inspect", "print the format, tensor table and size of a checkpoint"),
    "verify": ("checkpoint_formats.cli_verify", "load a checkpoint, generate, check logits against a reference"),
    "convert": ("checkpoint_formats.cli_convert", "convert ModelOpt NVFP4 <-> compressed-tensors NVFP4"),
    "abliterate": ("abliterate.cli", "stage 2: find refusal directions and search abliteration parameters"),
    "export": ("abliterate.export_cli", "merge the chosen trial into full-precision weights and re-export"),
    "evaluate": ("abliterate.capability.cli", "capability benchmarks: lm-evaluation-harness tasks on a model (eval extra)"),
    "run": ("pipelines.runner", "run a pipeline YAML (both stages chained)"),
}


def _usage() -> str:
    lines = ["usage: quant-abliterate COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<11} {help_text}" for name, (_, help_text) in SUBCOMMANDS.items()]
    lines.append("")
    lines.append("Run 'quant-abliterate COMMAND --help' for the options of one command.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"error: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return run_guarded(module.main, rest)


if __name__ == "__main__":
    sys.exit(main())
