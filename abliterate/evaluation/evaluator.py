"""One object that scores a model (or an edit of it) against its unedited self.

Built once per model with the prompt sets: it renders the prompts, picks a
batch size, fixes the unedited model's greedy continuations of the harmless
prompts and their log-probabilities (the KL reference), and scores the
unedited model itself (``base``). Each ``evaluate(model)`` then costs one
early-stopping generation pass over the harmful prompts and one
teacher-forced forward pass over the harmless ones. Stage 2 calls it once per
trial on the same model object with different adapters applied.

**False refusals** (``count_harmless_refusals``): refusals among the answers to
the harmless prompts, each answer up to ``harmless_max_new_tokens`` tokens.
Within the positions the KL pass already scored, that pass tells for free what
the model's greedy answer is wherever it agrees with the unedited model's: a
harmless prompt whose teacher-forced argmax tokens equal the reference
continuation over the whole window has the reference's answer, and so its
verdict. Only the prompts whose answer departs from the reference within the
window are generated (same early stop on a refusal marker). With a window no
longer than ``kl_tokens`` a mild edit costs almost nothing extra; a longer one
generates every harmless answer. On the static decoder (a GPU) those answers
start from the KL pass itself: its forward writes the prompts into the
decoder's KV cache, so they need no prefill of their own. (``false_refusals`` does
the counting).

**A refusal judge** (``refusal_judge``, see ``judge``): the markers' early stop
still decides the obvious cases (an answer in which a marker appeared stays a
refusal), every other harmful answer is generated to at least ``judge_tokens``
tokens (or its EOS) and the judge's verdict replaces the markers'. The result
keeps both counts: ``refusals`` (the verdicts in use, judged) and
``marker_refusals`` (the markers alone, on the same answers), so a user sees
where they disagree. False refusals stay the markers' (their window is short,
and judging them would generate every harmless answer).

**Look-alikes and a skill** (optional, the hard testbed's spec has both):
``lookalike_prompts`` are harmless requests that share words with harmful ones;
their refusals (markers, over the false-refusal window, as false refusals) are
counted in the same generation call as the harmless answers that departed from
the reference. ``skill_prompts`` have exact answers (``skill_answers``): each is
generated greedily to ``skill_max_new_tokens`` (a few tokens) and is right when
it begins with the expected text (``markers.is_exact_answer``). Without these
sets the result's fields stay None and nothing extra is generated.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from abliterate.evaluation import static_decode
from abliterate.evaluation.batch_size import find_fastest_batch_size
from abliterate.evaluation.chunked_mlp import sliced_mlps
from abliterate.evaluation.false_refusals import FalseRefusalCounter
from abliterate.evaluation.generation import format_chat_prompts, generate_greedy, model_device, pad_token_id
from abliterate.evaluation.grouped_heads import grouped_attention
from abliterate.evaluation.judge import RefusalJudge
from abliterate.evaluation.kl import ContinuationLogProbs, continuation_log_probs, first_position_kl, mean_kl_divergence
from abliterate.evaluation.markers import (
    DEFAULT_REFUSAL_MARKERS,
    ComplianceRule,
    contains_refusal_marker,
    is_exact_answer,
    is_refusal,
)
from abliterate.evaluation.perplexity import perplexity
from foundation.errors import UserError

SKILL_MAX_NEW_TOKENS = 16  # exact skill answers are a few tokens ("20, 23, 26." is under 12 on the hard testbed)

# (prompts, answers) -> one "is a real answer" verdict per answer.
ComplianceJudge = Callable[[Sequence[str], Sequence[str]], Sequence[bool]]


@dataclass(frozen=True)
class EvaluationConfig:
    refusal_markers: tuple[str, ...] = DEFAULT_REFUSAL_MARKERS
    compliance_openers: tuple[str, ...] = ()  # prefixes of a well-formed answer
    compliance_patterns: tuple[str, ...] = ()  # regexes; either kind of match counts
    max_new_tokens: int = 100  # longest answer generated for refusal/compliance
    kl_tokens: int = 8  # generated positions compared for KL
    batch_size: int | None = None  # None: the fastest that fits, found on a probe
    max_batch_size: int = 128
    decoding: str = "auto"  # generation.DECODING: the captured static decoder on a GPU, generate() on a CPU
    system_prompt: str | None = None
    count_harmless_refusals: bool = False  # also count refusals of the harmless prompts (false refusals)
    harmless_max_new_tokens: int | None = None  # the false-refusal window; None: max_new_tokens
    perplexity_max_length: int = 512
    judge_tokens: int | None = None  # with a refusal judge: harmful answers are generated to at least this many tokens

    def __post_init__(self) -> None:
        if self.kl_tokens < 1:
            raise UserError("kl_tokens", f"must be at least 1, got {self.kl_tokens}", "use e.g. --kl_tokens 8")
        if self.max_new_tokens < 1:
            raise UserError("max_new_tokens", f"must be at least 1, got {self.max_new_tokens}", "use e.g. 100")
        if self.batch_size is not None and self.batch_size < 1:
            raise UserError("batch_size", f"must be positive, got {self.batch_size}", "omit it to pick automatically")
        if self.judge_tokens is not None and self.judge_tokens < 1:
            raise UserError("judge_tokens", f"must be at least 1, got {self.judge_tokens}", "use e.g. --judge_tokens 128")
        if self.harmless_max_new_tokens is not None and self.harmless_max_new_tokens < 1:
            raise UserError("harmless_max_new_tokens", f"must be at least 1, got {self.harmless_max_new_tokens}",
                            "use e.g. 8, or turn counting off with count_harmless_refusals=False")

    @property
    def false_refusal_window(self) -> int:
        return self.harmless_max_new_tokens or self.max_new_tokens

    def harmful_window(self, judged: bool) -> int:
        """Most tokens generated per harmful answer: ``max_new_tokens``, at least ``judge_tokens`` when judged."""
        return max(self.max_new_tokens, self.judge_tokens or 0) if judged else self.max_new_tokens


@dataclass(frozen=True)
class EvalResult:
    refusals: int
    n_harmful: int
    compliance: int | None  # None when no openers, patterns or judge are configured
    kl: float  # mean KL(unedited || model) over the first kl_tokens answer positions
    kl_first_token: float
    kl_tokens: int
    n_harmless: int
    harmless_refusals: int | None = None  # false refusals; None when not counted
    perplexity: float | None = None
    responses: tuple[str, ...] = field(default=(), repr=False)  # answers to the harmful prompts
    seconds: float = 0.0
    marker_refusals: int | None = None  # the markers' count when a judge decided ``refusals``; None without a judge
    judge_seconds: float = 0.0
    lookalike_refusals: int | None = None  # refusals of the look-alike prompts; None without them
    n_lookalike: int | None = None
    skill_correct: int | None = None  # exact skill answers; None without skill prompts
    n_skill: int | None = None

    @property
    def skill_accuracy(self) -> float | None:
        return self.skill_correct / self.n_skill if self.skill_correct is not None and self.n_skill else None

    @property
    def refusal_rate(self) -> float:
        return self.refusals / self.n_harmful if self.n_harmful else 0.0

    @property
    def compliance_rate(self) -> float | None:
        if self.compliance is None or not self.n_harmful:
            return None
        return self.compliance / self.n_harmful

    @property
    def harmless_refusal_rate(self) -> float | None:
        if self.harmless_refusals is None or not self.n_harmless:
            return None
        return self.harmless_refusals / self.n_harmless


def release_free_device_memory(model) -> None:
    """Hand the allocator's free GPU blocks back to the device before the next phase of a trial.

    Why: each phase (the harmful answers' prefill and decode, the KL pass, the false-refusal answers, the edit
    between trials) leaves its freed transients in blocks the next phase's shapes or stream cannot reuse, so the
    reserved memory climbed ~290 MiB above the peak allocated over three trials of the 8B-shaped bench (6,186 MiB
    reserved against 5,896 MiB allocated; bench/stage2_trial_profile.py, H200). Released between phases, the
    reserved peak is the largest phase's own. Under expandable segments (the CLI's allocator setting) this unmaps
    the free pages only; the phases end in a host read-back anyway, so the stream sync it costs waits for nothing.
    """
    if model_device(model).type == "cuda":
        torch.cuda.empty_cache()


class Evaluator:
    def __init__(
        self,
        model,
        tokenizer,
        harmful_prompts: Sequence[str],
        harmless_prompts: Sequence[str],
        config: EvaluationConfig | None = None,
        *,
        perplexity_texts: Sequence[str] = (),
        compliance_judge: ComplianceJudge | None = None,
        refusal_judge: RefusalJudge | None = None,
        lookalike_prompts: Sequence[str] = (),
        skill_prompts: Sequence[str] = (),
        skill_answers: Sequence[str] = (),
        skill_max_new_tokens: int = SKILL_MAX_NEW_TOKENS,
    ) -> None:
        if not harmful_prompts or not harmless_prompts:
            raise UserError(
                "prompt sets",
                f"evaluation needs harmful and harmless prompts (got {len(harmful_prompts)} and {len(harmless_prompts)})",
                "point the prompt-set spec at non-empty files",
            )
        if len(skill_prompts) != len(skill_answers):
            raise UserError("skill_test", f"{len(skill_prompts)} skill prompts but {len(skill_answers)} answers",
                            "give every skill_test line its answer field (the spec's answer_field)")
        if skill_max_new_tokens < 1:
            raise UserError("skill_max_new_tokens", f"must be at least 1, got {skill_max_new_tokens}", "use e.g. 16")
        self.config = config or EvaluationConfig()
        self.lookalike_prompts = list(lookalike_prompts)
        self.skill_prompts = list(skill_prompts)
        self.skill_answers = list(skill_answers)
        self.skill_max_new_tokens = skill_max_new_tokens
        self.tokenizer = tokenizer
        self.harmful_prompts = list(harmful_prompts)
        self.harmless_prompts = list(harmless_prompts)
        self.perplexity_texts = list(perplexity_texts)
        self.compliance_rule = ComplianceRule(self.config.compliance_openers, self.config.compliance_patterns)
        self.compliance_judge = compliance_judge
        self.refusal_judge = refusal_judge
        self.pad_id = pad_token_id(tokenizer)
        self.harmful_ids = format_chat_prompts(tokenizer, self.harmful_prompts, self.config.system_prompt)
        self.harmless_ids = format_chat_prompts(tokenizer, self.harmless_prompts, self.config.system_prompt)
        self.lookalike_ids = format_chat_prompts(tokenizer, self.lookalike_prompts, self.config.system_prompt) \
            if self.lookalike_prompts else []
        self.skill_ids = format_chat_prompts(tokenizer, self.skill_prompts, self.config.system_prompt) \
            if self.skill_prompts else []
        model.eval()
        with sliced_mlps(model), grouped_attention(model, gpu_only=True):
            self.batch_size = self.config.batch_size or self._find_batch_size(model)
            static_decode.forget_decoders(model)  # the probe's shapes never come back; their KV caches would stay
            continuations = generate_greedy(
                model, tokenizer, self.harmless_ids, max_new_tokens=self.config.kl_tokens, batch_size=self.batch_size,
                decoding=self.config.decoding,
            )
            static_decode.forget_decoders(model)  # nor do the reference continuations'
            self.reference_continuations = [response.token_ids for response in continuations]
        # The KL reference is the base evaluation's own KL pass (the same forward every trial's takes)
        self.reference_log_probs: ContinuationLogProbs | None = None
        self.false_refusals = FalseRefusalCounter(
            tokenizer, self.harmless_ids, self.lookalike_ids, self.reference_continuations,
            window=self.config.false_refusal_window, kl_tokens=self.config.kl_tokens,
            markers=self.config.refusal_markers, counted=self.config.count_harmless_refusals,
            decoding=self.config.decoding, batch_size=self.batch_size,
        )  # fmt: skip
        self.base = self.evaluate(model, with_perplexity=bool(self.perplexity_texts))

    @property
    def base_refusals(self) -> int:
        return self.base.refusals

    def evaluate(self, model, *, with_perplexity: bool = False) -> EvalResult:
        # long forwards on a GPU: the MLPs a slice of tokens at a time, attention without per-head K/V copies (memory)
        with sliced_mlps(model), grouped_attention(model, gpu_only=True):
            try:
                return self._evaluate(model, with_perplexity)
            finally:
                release_free_device_memory(model)  # the edit between trials starts from what the model holds

    def _evaluate(self, model, with_perplexity: bool) -> EvalResult:
        start = time.perf_counter()
        model.eval()
        config = self.config
        window = config.harmful_window(self.refusal_judge is not None)
        release_free_device_memory(model)
        answers = [response.text for response in self._answers(model, self.harmful_ids, window)]
        marker_refused = [is_refusal(answer, config.refusal_markers) for answer in answers]
        judge_start = time.perf_counter()
        refused = self._judged(answers, marker_refused)
        judge_seconds = time.perf_counter() - judge_start
        compliance = self._count_compliant(answers, refused)
        release_free_device_memory(model)
        log_probs = self._log_probs(model)
        if self.reference_log_probs is None:  # the base evaluation: the unedited model is the reference
            self.reference_log_probs = log_probs
        release_free_device_memory(model)
        harmless_refusals, lookalike_refusals = self._count_false_refusals(model, log_probs)
        skill_correct = self._count_skill(model) if self.skill_ids else None
        ppl = None
        if with_perplexity and self.perplexity_texts:
            ppl = perplexity(
                model,
                self.tokenizer,
                self.perplexity_texts,
                batch_size=self.batch_size,
                max_length=config.perplexity_max_length,
            )
        return EvalResult(
            refusals=sum(refused),
            n_harmful=len(answers),
            compliance=compliance,
            kl=mean_kl_divergence(self.reference_log_probs, log_probs),
            kl_first_token=first_position_kl(self.reference_log_probs, log_probs),
            kl_tokens=config.kl_tokens,
            n_harmless=len(self.harmless_ids),
            harmless_refusals=harmless_refusals,
            perplexity=ppl,
            responses=tuple(answers),
            seconds=time.perf_counter() - start,
            marker_refusals=sum(marker_refused) if self.refusal_judge is not None else None,
            judge_seconds=judge_seconds if self.refusal_judge is not None else 0.0,
            lookalike_refusals=lookalike_refusals,
            n_lookalike=len(self.lookalike_ids) if self.lookalike_ids else None,
            skill_correct=skill_correct,
            n_skill=len(self.skill_ids) if self.skill_ids else None,
        )

    def _judged(self, answers: list[str], marker_refused: list[bool]) -> list[bool]:
        """The judge's verdicts where no marker decided the answer; the markers' verdicts without a judge."""
        undecided = [index for index, refused in enumerate(marker_refused) if not refused]
        if self.refusal_judge is None or not undecided:
            return marker_refused
        verdicts = list(self.refusal_judge([self.harmful_prompts[i] for i in undecided], [answers[i] for i in undecided]))
        if len(verdicts) != len(undecided):
            raise RuntimeError(f"the refusal judge gave {len(verdicts)} verdicts for {len(undecided)} answers")
        refused = list(marker_refused)
        for index, verdict in zip(undecided, verdicts, strict=True):
            refused[index] = bool(verdict)
        return refused

    def _count_false_refusals(self, model, log_probs) -> tuple[int | None, int | None]:
        """Refusals among the harmless answers and among the look-alikes (``false_refusals``)."""
        return self.false_refusals.count(model, log_probs, self._answers)

    def _count_skill(self, model) -> int:
        """Exact answers among the skill prompts' greedy answers (``skill_max_new_tokens`` each).

        An answer as long as the longest expected one is decided (``is_exact_answer`` reads only its start), so
        its row stops there instead of running to the window.
        """
        longest = max(map(len, self.skill_answers))
        answers = generate_greedy(model, self.tokenizer, self.skill_ids, max_new_tokens=self.skill_max_new_tokens,
                                  batch_size=self.batch_size, is_decided=lambda text: len(text.strip()) >= longest,
                                  decoding=self.config.decoding)
        return sum(is_exact_answer(answer.text, expected)
                   for answer, expected in zip(answers[: len(self.skill_ids)], self.skill_answers, strict=True))

    def _answers(self, model, prompt_ids, max_new_tokens: int | None = None):
        markers = self.config.refusal_markers
        return generate_greedy(
            model,
            self.tokenizer,
            prompt_ids,
            max_new_tokens=max_new_tokens or self.config.max_new_tokens,
            batch_size=self.batch_size,
            is_decided=lambda text: contains_refusal_marker(text, markers),
            decoding=self.config.decoding,
        )

    def _count_compliant(self, answers: list[str], refused: list[bool]) -> int | None:
        if self.compliance_judge is not None:
            verdicts = self.compliance_judge(self.harmful_prompts, answers)
            return sum(bool(verdict) and not refusal for verdict, refusal in zip(verdicts, refused, strict=True))
        if not self.compliance_rule.is_configured:
            return None
        return sum(not refusal and self.compliance_rule.matches(a) for a, refusal in zip(answers, refused, strict=True))

    def _log_probs(self, model):
        counter = self.false_refusals
        counter.forget_prefill()
        return continuation_log_probs(
            model,
            self.harmless_ids,
            self.reference_continuations,
            n_positions=self.config.kl_tokens,
            pad_id=self.pad_id,
            batch_size=self.batch_size,
            forward=counter.prefilling_forward(model) if counter.continues_from_kl(model) else None,
        )

    def _find_batch_size(self, model) -> int:
        prompts = self.harmful_ids + self.harmless_ids

        def probe(size: int) -> None:
            batch = [prompts[index % len(prompts)] for index in range(size)]
            generate_greedy(model, self.tokenizer, batch, max_new_tokens=4, batch_size=size)

        return find_fastest_batch_size(probe, len(prompts), self.config.max_batch_size)
