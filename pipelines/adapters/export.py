"""Pipeline stage 'export': merge the chosen trial and re-export, with ExportSettings as its CLI.

When the pipeline quantized a local source model first, the merge reads that
original full-precision model (``base_model``) rather than the dequantized
NVFP4 weights, unless the YAML says otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from abliterate.export.settings import ExportSettings
from pipelines.adapters import stage_settings
from pipelines.evaluations import metrics_row, size_bytes
from pipelines.stages import StageContext


def build_settings(user_settings: dict[str, Any], context: StageContext) -> ExportSettings:
    chosen = {"progress": True, **user_settings}
    searched_another_model = context.previous_results.get("quantize") is not None
    if "base_model" not in user_settings and searched_another_model and Path(context.source_model).is_dir():
        chosen["base_model"] = context.source_model
    wired = {"trial": context.input_dir, "output": str(Path(context.stage_dir)), "overwrite": False,
             "trust_remote_code": context.trust_remote_code}
    return stage_settings("export", ExportSettings, chosen, wired)


def run(settings: ExportSettings, context: StageContext) -> dict[str, Any]:
    from rich.console import Console

    from abliterate.export.run import run_exports

    # The stage directory itself is the atomic unit here: one subdirectory per format inside it.
    manifests = run_exports(settings, Console(), subdirectories=True)
    evaluations, outputs = [], {}
    for fmt, manifest in manifests.items():
        outputs[fmt] = str(Path(manifest["output"]).relative_to(Path(context.stage_dir)))
        verify = manifest.get("verify")
        if not verify:
            continue
        metrics = verify["export"]
        evaluations.append(metrics_row(f"re-exported {fmt}", "searched", metrics, perplexity=metrics.get("perplexity"),
                                       size=size_bytes(manifest["output"])))
    first = next(iter(outputs.values()))
    return {"artifact": first, "outputs": outputs, "evaluations": evaluations,
            "verify_passed": all((m.get("verify") or {}).get("passed", True) for m in manifests.values()),
            "merge_source": {fmt: m["merge_source"] for fmt, m in manifests.items()}}
