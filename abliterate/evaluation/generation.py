"""Greedy, batched generation of chat answers that stops each prompt early.

Answers are generated exactly as a user would see them: the chat template
with its generation prompt, left padding (so every row's next token sits in
the last column), greedy decoding. Each row stops as soon as its answer is
decided, by EOS or by a caller-supplied test on the text so far (a refusal
marker found), instead of every row running to ``max_new_tokens``; the batch
ends when its last row does. This is where most of a trial's time goes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from abliterate.evaluation import static_decode
from abliterate.evaluation.batch_size import is_out_of_memory
from foundation.errors import UserError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Response:
    text: str
    token_ids: tuple[int, ...]  # generated tokens, EOS included when reached
    stop_reason: str  # "eos", "decided" or "length"


@dataclass(frozen=True)
class PaddedBatch:
    input_ids: torch.Tensor  # [batch, length], left padded
    attention_mask: torch.Tensor
    position_ids: torch.Tensor  # positions counted from each row's first real token


def format_chat_prompts(tokenizer, prompts: Sequence[str], system_prompt: str | None = None) -> list[list[int]]:
    """Token ids of each prompt rendered by the chat template, generation prompt added."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            getattr(tokenizer, "name_or_path", "tokenizer"),
            "the tokenizer has no chat template",
            "use a chat (instruct) model, or set tokenizer.chat_template / chat_template.jinja",
        )
    encoded: list[list[int]] = []
    for prompt in prompts:
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": prompt})
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # The template already writes BOS where the model wants it.
        encoded.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return encoded


def pad_token_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    return 0


def eos_token_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for source in (configured, tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source is not None:
            ids.update(int(token) for token in source)
    return ids


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu",
             length: int | None = None) -> PaddedBatch:
    """Left-padded to the longest sequence, or to ``length`` when given (at least the longest)."""
    length = max([len(sequence) for sequence in sequences] + [length or 0])
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if sequence:
            input_ids[row, length - len(sequence) :] = torch.tensor(list(sequence), dtype=torch.long)
            attention_mask[row, length - len(sequence) :] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return PaddedBatch(input_ids.to(device), attention_mask.to(device), position_ids.to(device))


def batches_by_length(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped so that similar lengths share a batch (less padding)."""
    order = sorted(range(len(lengths)), key=lambda index: (lengths[index], index))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def model_device(model) -> torch.device:
    """Where a batch goes: the input embedding's (execution) device, also under an accelerate offload map."""
    from checkpoint_formats.placement import input_device

    return input_device(model)


class _StopWhenDecided(StoppingCriteria):
    """Marks a row finished once its decoded answer satisfies ``is_decided``."""

    def __init__(self, tokenizer, prompt_length: int, is_decided: Callable[[str], bool]) -> None:
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length
        self.is_decided = is_decided
        self.decided_at: dict[int, int] = {}  # row -> number of tokens when decided

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        new_tokens = input_ids[:, self.prompt_length :].tolist()
        for row, tokens in enumerate(new_tokens):
            if row in self.decided_at:
                done[row] = True
            elif self.is_decided(self.tokenizer.decode(tokens, skip_special_tokens=True)):
                self.decided_at[row] = len(tokens)
                done[row] = True
        return done


def _trim(tokens: list[int], eos_ids: set[int]) -> tuple[list[int], bool]:
    for position, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[: position + 1], True
    return tokens, False


DECODING = ("auto", "static", "generate")
CHECK_EVERY = 8  # decode steps between reading the tokens back for the early stop


def use_static_decode(model, decoding: str) -> bool:
    """``auto``: the captured static decoder on a GPU, transformers' ``generate`` on a CPU (where launches are cheap)."""
    if decoding not in DECODING:
        raise UserError("decoding", f"unknown choice {decoding!r}", f"choose one of: {', '.join(DECODING)}")
    if decoding == "generate" or not static_decode.supports_static_decode(model):
        return False
    return decoding == "static" or model_device(model).type == "cuda"


def _static_responses(model, tokenizer, batch: PaddedBatch, max_new_tokens: int, eos_ids: set[int],
                      is_decided: Callable[[str], bool] | None) -> list[Response]:
    decoder = static_decode.decoder_for(model, batch.input_ids.shape[0], batch.input_ids.shape[1], max_new_tokens)
    judge = static_decode.RowJudge(tokenizer, eos_ids, is_decided)
    return _judged_responses(tokenizer, decoder.run(batch, max_new_tokens, judge, CHECK_EVERY), judge)


def _judged_responses(tokenizer, generated: torch.Tensor, judge: static_decode.RowJudge) -> list[Response]:
    responses = []
    for row, tokens in enumerate(generated.tolist()):
        length, reason = judge.end_of(row, len(tokens))
        kept = tokens[:length]
        responses.append(Response(tokenizer.decode(kept, skip_special_tokens=True), tuple(kept), reason))
    return responses


@dataclass(frozen=True)
class Prefilled:
    """Prompts a static decoder's cache already holds (``StaticDecoder.prefill``) and the tokens they predict."""

    decoder: static_decode.StaticDecoder
    prompts: PaddedBatch  # on the decoder's device: the first columns of what was prefilled
    first_tokens: torch.Tensor  # [rows], on the decoder's device
    indices: tuple[int, ...]  # the caller's index of each row's prompt


@torch.inference_mode()
def continue_greedy(model, tokenizer, prefilled: Prefilled, *, max_new_tokens: int,
                    is_decided: Callable[[str], bool] | None = None) -> dict[int, Response]:
    """Greedy answers of prompts already prefilled, by the caller's index: ``generate_greedy``'s answers
    (same early stops) without a prefill of their own."""
    judge = static_decode.RowJudge(tokenizer, eos_token_ids(model, tokenizer), is_decided)
    generated = prefilled.decoder.run(prefilled.prompts, max_new_tokens, judge, CHECK_EVERY,
                                      first_tokens=prefilled.first_tokens)
    return dict(zip(prefilled.indices, _judged_responses(tokenizer, generated, judge), strict=True))


def give_up_static_decode(model, error: BaseException) -> None:
    """A model whose forward cannot take a static cache or be captured: transformers' generate from here on."""
    static_decode.forget_decoders(model)
    model.__dict__["_static_decode_failed"] = f"{type(error).__name__}: {error}"
    logger.warning("static-cache decoding failed (%s); using transformers' generate from here on",
                   model.__dict__["_static_decode_failed"][:300])


@torch.inference_mode()
def generate_greedy(
    model,
    tokenizer,
    prompt_token_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    batch_size: int,
    is_decided: Callable[[str], bool] | None = None,
    decoding: str = "auto",
) -> list[Response]:
    """Greedy answers for already-templated prompts, in the input order."""
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    pad_id = pad_token_id(tokenizer)
    eos_ids = eos_token_ids(model, tokenizer)
    device = model_device(model)
    static = use_static_decode(model, decoding)
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=sorted(eos_ids) or None,
        temperature=None,
        top_p=None,
        top_k=None,
    )
    responses: list[Response | None] = [None] * len(prompt_token_ids)
    # Static decoding pads every batch to the longest prompt of the call, so that batches of one size share one
    # decoder (one KV cache, one captured graph) instead of one per prompt length.
    longest = max((len(ids) for ids in prompt_token_ids), default=0) if static else None
    for indices in batches_by_length([len(ids) for ids in prompt_token_ids], batch_size):
        batch = left_pad([prompt_token_ids[index] for index in indices], pad_id, device, longest)
        if static:
            try:
                answers = _static_responses(model, tokenizer, batch, max_new_tokens, eos_ids, is_decided)
            except (RuntimeError, TypeError, ValueError, NotImplementedError) as error:
                if is_out_of_memory(error):  # the batch-size search needs to see it
                    raise
                give_up_static_decode(model, error)
                static = False
            else:
                for row, index in enumerate(indices):
                    responses[index] = answers[row]
                continue
        prompt_length = batch.input_ids.shape[1]
        stopper = _StopWhenDecided(tokenizer, prompt_length, is_decided) if is_decided else None
        output = model.generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            generation_config=config,
            stopping_criteria=StoppingCriteriaList([stopper]) if stopper else None,
        )
        for row, index in enumerate(indices):
            tokens, reached_eos = _trim(output[row, prompt_length:].tolist(), eos_ids)
            if stopper is not None and row in stopper.decided_at and not (
                reached_eos and len(tokens) <= stopper.decided_at[row]
            ):
                tokens = output[row, prompt_length : prompt_length + stopper.decided_at[row]].tolist()
                reason = "decided"
            else:
                reason = "eos" if reached_eos else "length"
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            responses[index] = Response(text=text, token_ids=tuple(tokens), stop_reason=reason)
    return [response for response in responses if response is not None]
