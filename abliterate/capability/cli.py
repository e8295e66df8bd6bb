"""``quant-abliterate evaluate MODEL --tasks ...``: what an edit or a quantization costs in capability.

Runs lm-evaluation-harness tasks on any model the project writes (the source
model, a stage-1 NVFP4 / FP8 checkpoint, a re-export) and prints one line per
task and metric; ``--output DIR`` also writes ``DIR/capability.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from abliterate.capability.settings import EvaluateSettings
from foundation.settings_cli import add_model_arguments, given_values, validate

RESULT_FILE = "capability.json"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quant-abliterate evaluate", description=__doc__.splitlines()[0],
                                     epilog="needs the eval extra: pip install 'quant-abliterate[eval]'")
    add_model_arguments(parser, EvaluateSettings, required=("tasks",))
    return parser


def settings_from_args(argv: list[str]) -> EvaluateSettings:
    args = build_parser().parse_args(argv)
    return validate(EvaluateSettings, given_values(args, EvaluateSettings), fix="see 'quant-abliterate evaluate --help'")


def scores_table(title: str, result) -> Table:
    table = Table(title=title)
    for header in ("task", "metric", "value", "± stderr", "better"):
        table.add_column(header, justify="left" if header in {"task", "metric"} else "right", no_wrap=True)
    for task, metrics in result.scores.items():
        for metric, value in metrics.items():
            error = result.stderr.get(task, {}).get(metric)
            better = result.higher_is_better.get(task, {}).get(metric)
            table.add_row(task, metric, "-" if value is None else f"{value:.4g}", "-" if error is None else f"{error:.2g}",
                          {True: "higher", False: "lower"}.get(better, "?"))
    return table


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    settings = settings_from_args(argv)
    from abliterate.capability.harness import evaluate_model, require_lm_eval
    from abliterate.capability.tasks import select_tasks
    from foundation.atomic_output import atomic_output_dir, check_writable_output

    require_lm_eval()
    if settings.output is not None:
        check_writable_output(settings.output, settings.overwrite)  # before the model is loaded
    selection = select_tasks(settings.tasks, settings.include_path)
    result = evaluate_model(settings.model, settings, selection)
    console = Console()
    if not console.is_terminal:  # a log: rich would assume 80 columns and crop
        console = Console(file=console.file, width=max(console.width, 110))
    console.print(scores_table(f"{settings.model} ({result.source_format}, held {result.held_as}, {result.dtype})", result))
    if settings.limit is not None:
        console.print(f"limit {settings.lm_eval_limit()}: scores of a subset, not comparable with published full-split numbers")
    if settings.output is not None:
        with atomic_output_dir(settings.output, overwrite=settings.overwrite) as work:
            payload = {"settings": settings.model_dump(mode="json"), **result.as_dict()}
            (Path(work) / RESULT_FILE).write_text(json.dumps(payload, indent=2) + "\n")
        console.print(f"wrote {Path(settings.output) / RESULT_FILE}")
    return 0


if __name__ == "__main__":
    from foundation.guarded_cli import run_guarded

    sys.exit(run_guarded(main, sys.argv[1:]))
