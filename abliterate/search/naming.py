"""A study's name: what makes two runs the same search, so a re-run continues the study instead of starting over.

Kept apart from the loop that runs a study because the name is a promise to
users with studies on disk: the identity below must not change when the code
around it does (a changed name silently starts a new study).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from abliterate.evaluation import EvaluationConfig
    from abliterate.prompts import PromptSets
    from abliterate.settings import AbliterateSettings


_NOT_IDENTITY = ("decoding", "harmless_max_new_tokens", "judge_tokens")  # the judge is named below, when there is one
# False refusals are recorded, never optimized: counting them (the default window, which follows kl_tokens)
# leaves a study's name as it was before they were counted, so older studies resume. An explicit window
# (or 0, not counting) is named below, so one study never mixes counts taken over different windows.
# ("count_harmless_refusals": False is the value every study before them was named with.)
_FALSE_REFUSALS = {"count_harmless_refusals": False}
_COLLATERAL = ("lookalike_test", "skill_test", "skill_answers")


def study_name(settings: AbliterateSettings, prompts: PromptSets, config: EvaluationConfig) -> str:
    """Same model + prompts + objective-defining settings -> same study, so a re-run continues it."""
    identity = {
        "model": str(Path(settings.model).resolve()) if Path(settings.model).exists() else settings.model,
        # the look-alike and skill sets are named only where the spec has them (other studies keep their names)
        "prompts": {key: value for key, value in asdict(prompts).items() if value or key not in _COLLATERAL},
        # how answers are decoded and batched changes speed, not the tokens: not part of the search's identity
        "evaluation": {k: v for k, v in asdict(config).items() if k not in _NOT_IDENTITY}
        | {"batch_size": None, "max_batch_size": None} | _FALSE_REFUSALS,
        "edit": [settings.method, settings.lowrank_rank, settings.direction_scope, settings.direction_projected],
        "objective": [settings.kl_target, settings.seed],
    }
    if settings.directions != "mean_difference":  # a subspace edit is another search (older studies keep their names)
        identity["directions"] = [settings.directions, settings.direction_rank]
    if settings.search_depth != "late":  # another search space (older studies keep their names)
        identity["search_depth"] = settings.search_depth
    if settings.gentle_share > 0:  # a mixed search: its product trials are scheduled differently (older studies keep their names)
        identity["gentle"] = [settings.gentle_share, settings.gentle_depth, settings.gentle_kl_target]
    if settings.false_refusal_tokens is not None:
        identity["false_refusal_tokens"] = settings.false_refusal_tokens
    if settings.judge:  # judged refusals are another objective: their own study (unjudged studies keep their names)
        judge = str(Path(settings.judge).resolve()) if Path(settings.judge).exists() else settings.judge
        identity["judge"] = {"model": judge, "tokens": settings.judge_tokens}
    if settings.quantization != "none":  # a quantized model is another model: its own study (older studies keep their names)
        identity["quantization"] = settings.quantization_request().describe()
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"abliterate-{Path(settings.model.rstrip('/')).name}-{digest}"
