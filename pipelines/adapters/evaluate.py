"""Pipeline stage 'evaluate': lm-evaluation-harness tasks on the pipeline's models (the eval extra).

It runs last and measures, one after the other in its own process, the source
model ('original'), the stage-1 checkpoint ('quantized') and every re-exported
model ('abliterated': the export stage's nvfp4 / bf16 folders; a trial alone is
an edit, not a model). Each model's scores go into ``capability.json`` of the
stage, the manifest's ``capability`` list, and the final table's row of that
model (the labels are the other stages' row labels).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from abliterate.capability.settings import CapabilityOptions
from foundation.errors import UserError
from pipelines.adapters import stage_settings
from pipelines.stages import StageContext

MODELS = ("original", "quantized", "abliterated")
RESULT_FILE = "capability.json"


class EvaluateStageSettings(CapabilityOptions):
    models: tuple[Literal["original", "quantized", "abliterated"], ...] | None = Field(
        default=None, min_length=1,
        description="Which models to measure: original, quantized (the quantize stage's checkpoint), abliterated (the "
                    "export stage's models). None: every one this pipeline has (original unless evaluate_original is false).")


def build_settings(user_settings: dict[str, Any], context: StageContext) -> EvaluateStageSettings:
    from abliterate.capability.harness import require_lm_eval

    settings = stage_settings("evaluate", EvaluateStageSettings,
                              {"trust_remote_code": context.trust_remote_code, **user_settings}, {})
    require_lm_eval("pipeline stage 'evaluate'")  # before any stage runs, not after the search
    return settings


def models_to_measure(settings: EvaluateStageSettings, context: StageContext) -> list[tuple[str, str]]:
    """``[(row label, model folder or Hub id)]`` in pipeline order."""
    output_dir = Path(context.stage_dir).parent
    results = context.previous_results
    available: dict[str, list[tuple[str, str]]] = {"original": [("original", context.source_model)]}
    if "quantize" in results:
        fmt = results["quantize"].get("format")
        path = output_dir / "quantize" / results["quantize"].get("artifact", ".")
        available["quantized"] = [(f"quantized ({fmt})" if fmt else "quantized", str(path))]
    if "export" in results:
        formats = [fmt for fmt in results["export"].get("merge_source", {}) if fmt != "adapter"]
        available["abliterated"] = [(f"re-exported {fmt}", str(output_dir / "export" / fmt)) for fmt in formats]
    if settings.models is None:
        wanted = [name for name in MODELS if name != "original" or context.evaluate_original]
        return [pair for name in wanted for pair in available.get(name, [])]
    chosen = []
    for name in settings.models:
        if not available.get(name):
            needs = {"quantized": "a quantize stage", "abliterated": "an export stage with format nvfp4 or bf16"}[name]
            raise UserError("pipeline stage 'evaluate': field 'models'", f"'{name}' needs {needs} before it",
                            f"add that stage, or drop '{name}' from models")
        chosen += available[name]
    return chosen


def run(settings: EvaluateStageSettings, context: StageContext) -> dict[str, Any]:
    from abliterate.capability.harness import evaluate_model
    from abliterate.capability.tasks import select_tasks

    selection = select_tasks(settings.tasks, settings.include_path)
    models = models_to_measure(settings, context)
    if not models:
        raise UserError("pipeline stage 'evaluate'", "this pipeline has no model to measure",
                        "set evaluate_original: true, or add a quantize or export stage")
    output_dir = Path(context.stage_dir).parent
    capability = []
    for label, path in models:
        print(f"evaluate: {label} ({path})", flush=True)
        result = evaluate_model(path, settings, selection).as_dict()
        inside = Path(path).is_relative_to(output_dir)
        result["model"] = str(Path(path).relative_to(output_dir)) if inside else path
        capability.append({"label": label, **result})
    (Path(context.stage_dir) / RESULT_FILE).write_text(json.dumps(capability, indent=2) + "\n")
    return {"capability": capability, "limit": settings.lm_eval_limit()}
