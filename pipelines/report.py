"""The table a user reads at the end of a pipeline: every model's quality and size."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

METRIC_COLUMNS = (
    ("refusals", "refusals"),
    ("compliance", "compliant"),
    ("false_refusals", "false ref."),
    ("kl", "KL"),
    ("perplexity", "ppl"),
    ("size_bytes", "size"),
)


def _format(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "size_bytes":
        return f"{value / 2**20:.1f} MiB"
    if key in {"refusals", "marker_refusals", "compliance", "false_refusals", "lookalike_refusals", "skill"} and isinstance(value, (int, float)) and value <= 1:
        return f"{100 * value:.1f}%"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def evaluation_rows(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Every evaluation any stage reported, in pipeline order (original -> ... -> re-exported)."""
    rows = []
    for stage_name, record in manifest.get("stages", {}).items():
        for evaluation in record.get("evaluations", []):
            rows.append({"stage": stage_name, **evaluation})
    return rows


def capability_scores(manifest: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """``{row label: {"task metric": value}}`` from every stage's ``capability`` list (the evaluate stage)."""
    scores: dict[str, dict[str, float | None]] = {}
    for record in manifest.get("stages", {}).values():
        for entry in record.get("capability", []):
            flat = {f"{task} {metric}": value for task, metrics in entry.get("scores", {}).items()
                    for metric, value in metrics.items()}
            scores.setdefault(entry["label"], {}).update(flat)
    return scores


def with_capability(rows: list[dict[str, Any]], manifest: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows with each model's capability scores added (a measured model without a row gets one), and the
    score columns in order."""
    scores = capability_scores(manifest)
    columns = list(dict.fromkeys(key for values in scores.values() for key in values))
    merged = [{**row, **scores.get(row.get("label", ""), {})} for row in rows]
    labels = {row.get("label") for row in rows}
    merged += [{"stage": "evaluate", "label": label, **values} for label, values in scores.items() if label not in labels]
    return merged, columns


JUDGED_COLUMN = ("marker_refusals", "marker ref.")
COLLATERAL_COLUMNS = (("lookalike_refusals", "look-alike ref."), ("skill", "skill"))


def metric_columns(rows: list[dict[str, Any]]) -> tuple[tuple[str, str], ...]:
    """``METRIC_COLUMNS``; with a refusal judge (some row has the markers' count) the markers' refusals follow the
    judged ones, so a reader sees where the two disagree; where the prompt spec has look-alike or skill sets (some
    row has them) their columns follow the false refusals."""
    columns = METRIC_COLUMNS
    if any(row.get("marker_refusals") is not None for row in rows):
        at = [key for key, _ in columns].index("refusals") + 1
        columns = (*columns[:at], JUDGED_COLUMN, *columns[at:])
    extra = tuple(column for column in COLLATERAL_COLUMNS if any(row.get(column[0]) is not None for row in rows))
    if extra:
        at = [key for key, _ in columns].index("false_refusals") + 1
        columns = (*columns[:at], *extra, *columns[at:])
    return columns


def print_final_table(console: Console, manifest: dict[str, Any]) -> None:
    table = Table(title=f"pipeline {manifest.get('pipeline', {}).get('name', '')}: every model, one ruler",
                  caption="refusals / compliance: share of the harmful test prompts; false ref.: share of the "
                          "harmless test prompts refused; KL: mean over the first generated tokens of the harmless "
                          "test prompts, against the model in 'KL vs'")
    table.add_column("model", no_wrap=True)
    rows = evaluation_rows(manifest)
    columns = metric_columns(rows)
    if JUDGED_COLUMN in columns:
        table.caption += "; refusals: by the judge (--judge), marker ref.: by the refusal markers alone"
    if any(column in columns for column in COLLATERAL_COLUMNS):
        table.caption += ("; look-alike ref.: share of the harmless look-alike prompts refused; skill: exact answers "
                          "to the skill prompts")
    for _, header in columns:
        table.add_column(header, justify="right", no_wrap=True)
    table.add_column("KL vs", no_wrap=True)
    rows, capability_columns = with_capability(rows, manifest)
    for column in capability_columns:  # lm-eval scores of the evaluate stage: one column per task and metric
        table.add_column(column.replace(" ", "\n", 1), justify="right", no_wrap=True)
    for row in rows:
        table.add_row(row.get("label", row["stage"]), *(_format(key, row.get(key)) for key, _ in columns),
                      row.get("reference") or "-", *(_format(column, row.get(column)) for column in capability_columns))
    if not console.is_terminal:  # a log or CI: rich would assume 80 columns and crop the numbers
        extra = 12 * (JUDGED_COLUMN in columns) + 12 * sum(column in columns for column in COLLATERAL_COLUMNS)
        console = Console(file=console.file, width=max(console.width, 110 + extra))
    console.print(table)
    timing = Table(title="stages")
    for header in ("stage", "status", "seconds", "peak RSS"):
        timing.add_column(header, justify="right" if header != "stage" else "left")
    for name, record in manifest.get("stages", {}).items():
        timing.add_row(name, record.get("status", "?"), _format("s", record.get("seconds")),
                       f"{record.get('peak_rss_mib', 0):.0f} MiB")
    console.print(timing)
