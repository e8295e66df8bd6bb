"""The README.md of an export: what was done to the model, with which parameters, and what it measured.

Pure text rendering: the caller gathers the numbers (trial record, verify
result, optional pipeline metrics) and this only formats them.
"""

from __future__ import annotations

import json
from typing import Any

NA = "—"


def _cell(value: Any, n: Any = None) -> str:
    if value is None:
        return NA
    if isinstance(value, float):
        return f"{value:.4g}"
    return f"{value}/{n}" if n else str(value)


def metrics_rows(rows: list[tuple[str, dict[str, Any] | None]]) -> list[str]:
    lines = ["| model | refusals | compliance | false refusals | KL vs unedited | perplexity |", "|---|---|---|---|---|---|"]
    for label, metrics in rows:
        if metrics is None:
            continue
        n = metrics.get("n_harmful")
        refusals = _cell(metrics.get("refusals"), n)
        if metrics.get("marker_refusals") is not None:  # a judged run: the markers' own count beside the judge's
            refusals += f" (judge; markers {_cell(metrics['marker_refusals'], n)})"
        lines.append(f"| {label} | {refusals} | {_cell(metrics.get('compliance'), n)} | "
                     f"{_cell(metrics.get('false_refusals'), metrics.get('n_harmless'))} | "
                     f"{_cell(metrics.get('kl'))} | {_cell(metrics.get('perplexity'))} |")
    return lines


def _format_note(export: dict[str, Any]) -> str:
    if export["format"] != "nvfp4":
        return ""
    if export.get("recalibrated"):
        return f" ({export.get('quant_algo')}; the merged model calibrated afresh with ModelOpt)"
    return f" ({export.get('quant_algo')}; edited weights re-quantized, activation scales carried from stage 1)"


def render_model_card(*, trial: dict[str, Any], export: dict[str, Any], source: str, verify: dict[str, Any] | None,
                      extra_metrics: dict[str, dict[str, Any]] | None = None) -> str:
    """``extra_metrics``: e.g. {"original (bf16)": {...}} from a pipeline that measured the source model too."""
    rows: list[tuple[str, dict[str, Any] | None]] = list((extra_metrics or {}).items())
    rows += [
        (f"unedited ({trial.get('source_format', 'as loaded by stage 2')})",
         {**trial.get("base_metrics", {}), **({"perplexity": verify["unedited"].get("perplexity")} if verify else {})}),
        (f"abliterated, trial {trial.get('trial_number')} (search: LoRA on the loaded model)", trial.get("metrics")),
        (f"this export ({export['format']}), re-measured", verify.get("export") if verify else None),
    ]
    parameters = json.dumps(trial.get("parameters", {}), indent=2)
    lines = [
        f"# {trial.get('model', 'model')} — abliterated ({export['format']})",
        "",
        "Refusal behaviour removed by directional ablation (abliteration) with quant-abliterate.",
        "Answers to harmful requests are no longer refused: deploy it only where that is acceptable.",
        "",
        "## Method",
        f"- edit: `{trial.get('method')}` (rank {trial.get('rank')}); W' = (I - λ v vᵀ) W on the output "
        "projections that write into the residual stream (attention/Mamba out-projections, MLP and every expert's "
        "down-projection)" + (", row norms preserved" if trial.get("method") == "norm_preserving" else ""),
        f"- edited weights: {export.get('edited_tensors')}",
        f"- merged into: {source}",
        f"- format: {export['format']}{_format_note(export)}",
        f"- trial {trial.get('trial_number')} chosen by: {trial.get('selection', NA)}",
        "",
        "## Chosen parameters",
        "```json",
        parameters,
        "```",
        "",
        "## Metrics",
        "Refusals and compliance count harmful test prompts; KL is measured on harmless test prompts against the "
        "unedited model.",
        "",
        *metrics_rows(rows),
    ]
    if verify:
        status = "passed" if verify["passed"] else "FAILED"
        lines += ["", f"Verification {status}: the export was reloaded and re-measured; tolerance "
                  f"{json.dumps(verify['tolerance'])}."]
    return "\n".join(lines) + "\n"
