"""Measuring refusals, compliance, KL and perplexity of a (possibly edited) model."""

from abliterate.evaluation.evaluator import (
    ComplianceJudge,
    EvalResult,
    EvaluationConfig,
    Evaluator,
)
from abliterate.evaluation.generation import (
    Response,
    format_chat_prompts,
    generate_greedy,
)
from abliterate.evaluation.judge import RefusalJudge, load_refusal_judge
from abliterate.evaluation.kl import (
    ContinuationLogProbs,
    continuation_log_probs,
    mean_kl_divergence,
)
from abliterate.evaluation.markers import (
    DEFAULT_REFUSAL_MARKERS,
    ComplianceRule,
    is_compliant,
    is_exact_answer,
    is_refusal,
    strip_reasoning,
)
from abliterate.evaluation.perplexity import perplexity

__all__ = [
    "DEFAULT_REFUSAL_MARKERS",
    "ComplianceJudge",
    "ComplianceRule",
    "ContinuationLogProbs",
    "EvalResult",
    "EvaluationConfig",
    "Evaluator",
    "RefusalJudge",
    "Response",
    "continuation_log_probs",
    "format_chat_prompts",
    "generate_greedy",
    "is_compliant",
    "is_exact_answer",
    "is_refusal",
    "load_refusal_judge",
    "mean_kl_divergence",
    "perplexity",
    "strip_reasoning",
]
