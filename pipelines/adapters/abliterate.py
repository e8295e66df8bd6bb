"""Pipeline stage 'abliterate': stage 2 with the same AbliterateSettings as its CLI.

The Optuna journal lives beside the stage directory (``<output_dir>/abliterate.study/<input>``),
not inside it: a killed stage leaves no partial stage directory, yet a re-run
resumes the study where it stopped. It is keyed by the hash of the stage's input,
so a re-quantized checkpoint never continues a study measured on another one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from abliterate.settings import AbliterateSettings
from foundation.errors import UserError
from pipelines.adapters import stage_settings
from pipelines.evaluations import metrics_row, original_and_input_rows
from pipelines.stages import StageContext

TRIAL = "trial"


def build_settings(user_settings: dict[str, Any], context: StageContext) -> AbliterateSettings:
    if user_settings.get("search_only"):
        raise UserError("abliterate.search_only", "a pipeline's abliterate stage must select a trial and write it",
                        "remove search_only from the stage; extra workers are started with `quant-abliterate "
                        "abliterate ... --storage URL --search_only`, or use the stage's workers: N")
    stage_dir = Path(context.stage_dir)
    previous = next(reversed(context.previous_results.values()), {}) if context.previous_results else {}
    input_key = str(previous.get("output_sha256", "source"))[:16]
    chosen = {
        "select": "best_kl_under 0.05",  # a pipeline never waits for a person
        **user_settings,
        "trust_remote_code": context.trust_remote_code or user_settings.get("trust_remote_code", False),
    }
    wired = {
        "model": context.input_dir or context.source_model,
        "out": str(stage_dir / TRIAL),
        "study_dir": str(stage_dir.parent / "abliterate.study" / input_key),
        "overwrite": False,
    }
    return stage_settings("abliterate", AbliterateSettings, chosen, wired)


def run(settings: AbliterateSettings, context: StageContext) -> dict[str, Any]:
    from rich.console import Console

    from abliterate.artifacts import read_chosen_trial
    from abliterate.run import run_abliteration

    evaluations = []
    if context.evaluate_original and context.input_dir and context.input_dir != context.source_model:
        quantized = context.previous_results.get("quantize", {}).get("format")
        label = f"quantized ({quantized})" if quantized else "searched model"
        evaluations += original_and_input_rows(settings, context.source_model, context.input_dir, label)
    out = run_abliteration(settings, Console())
    trial = read_chosen_trial(out).data  # the one reader: a missing/corrupt/newer file is a UserError
    metrics, base = trial["metrics"], trial["base_metrics"]
    if not evaluations:
        evaluations.append(metrics_row("searched model", None, base, kl=None))
    evaluations.append(metrics_row(f"abliterated #{trial['trial_number']}", "searched", metrics))
    return {"artifact": TRIAL, "evaluations": evaluations, "trial_number": trial["trial_number"],
            "parameters": trial["parameters"], "base_metrics": trial["base_metrics"], "metrics": metrics}
