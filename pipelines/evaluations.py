"""Rows of the pipeline's final table: one model measured with the stage-2 evaluator.

The same ``Evaluator`` that scores every trial scores the original and the
quantized model too, so the whole chain (original -> quantized -> abliterated
-> re-exported) is measured with one ruler. KL is always against the row's
stated reference model.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the quantize adapter imports this module too: keep stage 2 out of its start-up
    from abliterate.settings import AbliterateSettings


def size_bytes(model_dir: str | Path) -> int | None:
    path = Path(model_dir)
    if not path.is_dir():
        return None
    return sum(file.stat().st_size for file in path.glob("*.safetensors"))


COLLATERAL = ("lookalike_refusals", "n_lookalike", "skill_correct", "n_skill")


def collateral(result: Any) -> dict[str, int | None]:
    """The look-alike and skill counts of an ``EvalResult`` (None where the prompt spec has no such set)."""
    return {name: getattr(result, name, None) for name in COLLATERAL}


def row(label: str, reference: str | None, *, refusals: int, n_harmful: int, compliance: int | None, kl: float | None,
        perplexity: float | None = None, size: int | None = None, false_refusals: int | None = None,
        n_harmless: int | None = None, marker_refusals: int | None = None, lookalike_refusals: int | None = None,
        n_lookalike: int | None = None, skill_correct: int | None = None, n_skill: int | None = None) -> dict[str, Any]:
    """One line of the table; ``false_refusals`` (of ``n_harmless`` harmless test prompts) None where not counted;
    ``marker_refusals`` the markers' count where a judge decided ``refusals``; ``lookalike_refusals`` (of
    ``n_lookalike``) and ``skill_correct`` (of ``n_skill``) where the prompt spec has those sets (keys present
    only then)."""
    counted = false_refusals is not None and bool(n_harmless)
    judged = {} if marker_refusals is None else {
        "marker_refusals": marker_refusals / n_harmful if n_harmful else None, "marker_refusal_count": marker_refusals}
    if lookalike_refusals is not None and n_lookalike:
        judged |= {"lookalike_refusals": lookalike_refusals / n_lookalike, "lookalike_refusal_count": lookalike_refusals,
                   "n_lookalike": n_lookalike}
    if skill_correct is not None and n_skill:
        judged |= {"skill": skill_correct / n_skill, "skill_correct": skill_correct, "n_skill": n_skill}
    return {
        "label": label, "reference": reference, "refusals": refusals / n_harmful if n_harmful else None,
        "refusal_count": refusals, "n_harmful": n_harmful,
        "compliance": None if compliance is None else compliance / n_harmful,
        "false_refusals": false_refusals / n_harmless if counted else None,
        "false_refusal_count": false_refusals, "n_harmless": n_harmless, "kl": kl,
        "perplexity": perplexity, "size_bytes": size, **judged,
    }


def metrics_row(label: str, reference: str | None, metrics: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A row from a recorded ``TrialMetrics`` dict (trial, base or verify metrics; older ones lack false refusals)."""
    return row(label, reference, refusals=metrics["refusals"], n_harmful=metrics["n_harmful"],
               compliance=metrics.get("compliance"), kl=extra.pop("kl", metrics.get("kl")),
               false_refusals=metrics.get("false_refusals"), n_harmless=metrics.get("n_harmless"),
               marker_refusals=metrics.get("marker_refusals"),
               **{name: metrics.get(name) for name in COLLATERAL}, **extra)


def original_and_input_rows(settings: AbliterateSettings, original: str, searched: str,
                            searched_label: str = "quantized") -> list[dict[str, Any]]:
    """Measure the source model, then the model stage 2 searches on with the original as KL reference."""
    from abliterate.evaluation import Evaluator
    from abliterate.evaluation_inputs import (
        EvaluationInputs,
        evaluation_config,
        refusal_judge_of,
    )
    from abliterate.loading import load_model
    from abliterate.prompts import perplexity_texts, prompt_sets_of

    inputs = EvaluationInputs.from_settings(settings)
    prompts = prompt_sets_of(inputs)
    texts = perplexity_texts(inputs.prompt_spec())  # the same texts the export's verify measures
    config = evaluation_config(inputs, prompts)

    def load(path: str):
        return load_model(path, dtypes=settings.dtypes, device_map=settings.device_map, max_memory=settings.max_memory,
                          load_as=settings.load_as,
                          trust_remote_code=settings.trust_remote_code)

    loaded = load(original)
    evaluator = Evaluator(loaded.model, loaded.tokenizer, prompts.harmful_test, prompts.harmless_test, config,
                          perplexity_texts=tuple(texts), refusal_judge=refusal_judge_of(inputs, loaded.model),
                          **prompts.collateral_sets())
    base = evaluator.base  # measured while the evaluator was built (with perplexity when there are texts)
    rows = [row("original", None, refusals=base.refusals, n_harmful=base.n_harmful, compliance=base.compliance,
                kl=None, perplexity=base.perplexity, size=size_bytes(original), false_refusals=base.harmless_refusals,
                n_harmless=base.n_harmless, marker_refusals=base.marker_refusals, **collateral(base))]
    del loaded
    gc.collect()
    searched_model = load(searched)
    result = evaluator.evaluate(searched_model.model, with_perplexity=bool(texts))
    rows.append(row(searched_label, "original", refusals=result.refusals,
                    n_harmful=result.n_harmful, compliance=result.compliance, kl=result.kl,
                    perplexity=result.perplexity, size=size_bytes(searched), false_refusals=result.harmless_refusals,
                    n_harmless=result.n_harmless, marker_refusals=result.marker_refusals, **collateral(result)))
    return rows
