"""The static-cache decoder (CUDA graphs on a GPU) answers exactly as transformers' generate does.

Run on the CPU (eagerly, same loop) on the committed testbed model, whose
harmful answers are refusals that stop early as "decided": same tokens, same
stop reasons, over batches with padding, EOS and decided rows, and again
after the decoder is reused (as it is across trials).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from abliterate.evaluation import static_decode
from abliterate.evaluation.generation import (
    format_chat_prompts,
    generate_greedy,
    use_static_decode,
)
from abliterate.evaluation.markers import (
    DEFAULT_REFUSAL_MARKERS,
    contains_refusal_marker,
)
from abliterate.evaluation.prompt_sets import read_field
from foundation.errors import UserError

TESTBED = Path(__file__).resolve().parents[3] / "testbed" / "model"
PROMPTS = Path(__file__).resolve().parents[3] / "datasets_yaml" / "prompts"


@pytest.fixture(scope="module")
def testbed():
    tokenizer = AutoTokenizer.from_pretrained(TESTBED)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(TESTBED, dtype=torch.float32).eval()
    return model, tokenizer


def _prompts(tokenizer, count: int):
    harmful = read_field(PROMPTS / "harmful_test.jsonl", "prompt", "test")[:count]
    harmless = read_field(PROMPTS / "harmless_test.jsonl", "prompt", "test")[:count]
    return format_chat_prompts(tokenizer, harmful + harmless)


def _decided(text: str) -> bool:
    return contains_refusal_marker(text, DEFAULT_REFUSAL_MARKERS)


@pytest.mark.usefixtures("one_cpu_thread")
def test_static_decode_gives_the_answers_of_generate(testbed):
    model, tokenizer = testbed
    ids = _prompts(tokenizer, 6)
    reference = generate_greedy(model, tokenizer, ids, max_new_tokens=64, batch_size=5, is_decided=_decided,
                                decoding="generate")
    static = generate_greedy(model, tokenizer, ids, max_new_tokens=64, batch_size=5, is_decided=_decided,
                             decoding="static")
    assert "_static_decoders" in model.__dict__, "the static path must actually have run"
    assert {r.stop_reason for r in reference} >= {"decided", "eos"}, "the test must cover both early stops"
    assert [(r.token_ids, r.stop_reason) for r in static] == [(r.token_ids, r.stop_reason) for r in reference]
    again = generate_greedy(model, tokenizer, ids, max_new_tokens=64, batch_size=5, is_decided=_decided,
                            decoding="static")
    assert [r.token_ids for r in again] == [r.token_ids for r in reference]


@pytest.mark.usefixtures("one_cpu_thread")
def test_length_limit_without_a_stop_test(testbed):
    model, tokenizer = testbed
    ids = _prompts(tokenizer, 2)
    reference = generate_greedy(model, tokenizer, ids, max_new_tokens=5, batch_size=4, decoding="generate")
    static = generate_greedy(model, tokenizer, ids, max_new_tokens=5, batch_size=4, decoding="static")
    assert [r.token_ids for r in static] == [r.token_ids for r in reference]
    assert all(len(r.token_ids) <= 5 for r in static)


def test_auto_uses_generate_on_a_cpu_and_unknown_choice_is_refused(testbed):
    model, _ = testbed
    assert static_decode.supports_static_decode(model)
    assert not use_static_decode(model, "auto")
    assert use_static_decode(model, "static")
    with pytest.raises(UserError, match="decoding"):
        use_static_decode(model, "fast")


def test_row_judge_finds_the_first_decided_prefix(testbed):
    _, tokenizer = testbed
    words = tokenizer("I am sorry but no", add_special_tokens=False)["input_ids"]
    judge = static_decode.RowJudge(tokenizer, {tokenizer.eos_token_id}, _decided)
    tokens = torch.tensor([words + [tokenizer.eos_token_id], [5] * len(words) + [tokenizer.eos_token_id]])
    assert judge.update(tokens)
    length, reason = judge.end_of(0, tokens.shape[1])
    assert reason == "decided" and _decided(tokenizer.decode(words[:length]))
    assert not _decided(tokenizer.decode(words[: length - 1]))
    assert judge.end_of(1, tokens.shape[1]) == (len(words) + 1, "eos")
