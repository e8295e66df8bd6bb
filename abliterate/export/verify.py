"""Reload an export and check that it behaves like the trial the user chose.

The search measured the trial on the model it loaded plus a LoRA edit; the
export is that edit merged (into bf16, or re-quantized). Both are scored with
the same evaluator, on the same test prompts, against the same unedited model,
so refusals, compliance, false refusals and KL must agree within a tolerance. The tolerance
is stated (and recorded in the manifest) because merging into the bf16 base
instead of dequantized weights, and re-quantizing, legitimately moves the
numbers a little; a larger gap means the export is not the chosen edit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from abliterate.artifacts import TRIAL_FILE, ChosenTrial
from foundation.errors import UserError


@dataclass(frozen=True)
class Tolerance:
    """How far the export may be from the trial; refusals/compliance: a count if >= 1, else a fraction of prompts.

    The defaults come from the testbed: re-quantizing the edited weights to
    NVFP4 moved 3 of 32 borderline answers (refusal <-> answer) while KL stayed
    within 2x; a broken export (edit missing, doubled or on the wrong layers)
    moves refusals to the base count or KL by orders of magnitude.
    """

    refusals: float = 0.1
    compliance: float = 0.1
    false_refusals: float = 0.1  # of the harmless test prompts when < 1
    kl_absolute: float = 0.02
    kl_relative: float = 0.5  # of the trial's KL

    @staticmethod
    def allowed(value: float, n_prompts: int) -> float:
        return value if value >= 1 else value * n_prompts

    def kl_allowed(self, trial_kl: float) -> float:
        return self.kl_absolute + self.kl_relative * abs(trial_kl)


@dataclass(frozen=True)
class VerifyResult:
    passed: bool
    trial: dict[str, Any]
    export: dict[str, Any]
    tolerance: dict[str, Any]
    problems: list[str]
    model: str
    unedited: dict[str, Any]  # the unedited model re-measured here (with perplexity when the spec has texts)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare(trial_metrics: dict[str, Any], export_metrics: dict[str, Any], tolerance: Tolerance) -> list[str]:
    """Each metric outside its tolerance, in words (empty: the export matches)."""
    problems = []
    n_harmful = int(trial_metrics.get("n_harmful") or export_metrics.get("n_harmful") or 0)
    n_harmless = int(trial_metrics.get("n_harmless") or export_metrics.get("n_harmless") or 0)
    for metric, allowed, n in (("refusals", tolerance.allowed(tolerance.refusals, n_harmful), n_harmful),
                               ("compliance", tolerance.allowed(tolerance.compliance, n_harmful), n_harmful),
                               ("false_refusals", tolerance.allowed(tolerance.false_refusals, n_harmless), n_harmless)):
        trial_value, export_value = trial_metrics.get(metric), export_metrics.get(metric)
        if trial_value is None or export_value is None:  # e.g. false refusals of a trial written before they were counted
            continue
        if abs(export_value - trial_value) > allowed:
            problems.append(f"{metric} {export_value} vs trial {trial_value} (tolerance ±{allowed:g} of {n})")
    allowed_kl = tolerance.kl_allowed(trial_metrics["kl"])
    if abs(export_metrics["kl"] - trial_metrics["kl"]) > allowed_kl:
        problems.append(f"KL {export_metrics['kl']:.4g} vs trial {trial_metrics['kl']:.4g} (tolerance ±{allowed_kl:.3g})")
    return problems


def verify_export(trial: ChosenTrial, export_dir: Path, tolerance: Tolerance, *,
                  device_map: str | None = None, trust_remote_code: bool = False) -> VerifyResult:
    """Score the export exactly as the search scored the trial; never raises on a mismatch (see ``passed``).

    ``trust_remote_code`` comes from the export command's own flag, never from chosen_trial.json: a trial
    folder is data, and an edited one must not be able to make the export run code."""
    from abliterate.evaluation import Evaluator
    from abliterate.evaluation_inputs import (
        EvaluationInputs,
        evaluation_config,
        refusal_judge_of,
    )
    from abliterate.loading import load_model
    from abliterate.prompts import perplexity_texts, prompt_sets_of
    from abliterate.search.objectives import TrialMetrics

    # the recorded values as data: a flag renamed or added since the trial was written must not break its export
    settings = EvaluationInputs.from_recorded(trial.header.settings, TRIAL_FILE)
    if trial.header.metrics is None:
        raise UserError(TRIAL_FILE, "no 'metrics' recorded: nothing to compare the export with",
                        "re-run the abliterate stage with this version, or export with --no-verify")
    if settings.cpu_threads:
        torch.set_num_threads(settings.cpu_threads)
    prompts = prompt_sets_of(settings)
    config = evaluation_config(settings, prompts)
    device_map = device_map if device_map is not None else settings.device_map
    reference = load_model(settings.model, dtypes=settings.dtypes, device_map=device_map, load_as=settings.load_as,
                           max_memory=settings.max_memory, trust_remote_code=trust_remote_code)
    texts = perplexity_texts(settings.prompt_spec())
    evaluator = Evaluator(reference.model, reference.tokenizer, prompts.harmful_test, prompts.harmless_test, config,
                          perplexity_texts=texts, refusal_judge=refusal_judge_of(settings, reference.model),
                          **prompts.collateral_sets())
    unedited = {**TrialMetrics.from_eval_result(evaluator.base).to_dict(), "perplexity": evaluator.base.perplexity}
    del reference  # the evaluator keeps the unedited model's KL reference, not the model
    exported = load_model(str(export_dir), dtypes=settings.dtypes, device_map=device_map, load_as=settings.load_as,
                          max_memory=settings.max_memory, trust_remote_code=trust_remote_code)
    with torch.no_grad():
        result = evaluator.evaluate(exported.model, with_perplexity=bool(texts))
    metrics = {**TrialMetrics.from_eval_result(result).to_dict(), "perplexity": result.perplexity}
    trial_metrics = dict(trial.header.metrics)
    problems = compare(trial_metrics, metrics, tolerance)
    n_harmful = int(trial_metrics.get("n_harmful") or 0)
    stated = {**asdict(tolerance), "refusals_allowed": tolerance.allowed(tolerance.refusals, n_harmful),
              "compliance_allowed": tolerance.allowed(tolerance.compliance, n_harmful),
              "false_refusals_allowed": tolerance.allowed(tolerance.false_refusals, int(trial_metrics.get("n_harmless") or 0)),
              "kl_allowed": tolerance.kl_allowed(trial_metrics["kl"])}
    return VerifyResult(not problems, trial_metrics, metrics, stated, problems,
                        f"{export_dir} ({exported.source_format})", unedited)
