import copy
import math

import pytest
import torch

from abliterate.evaluation.batch_size import (
    candidate_batch_sizes,
    find_fastest_batch_size,
)
from abliterate.evaluation.generation import (
    format_chat_prompts,
    generate_greedy,
    left_pad,
)
from abliterate.evaluation.kl import (
    ContinuationLogProbs,
    continuation_log_probs,
    mean_kl_divergence,
)
from abliterate.evaluation.perplexity import perplexity
from foundation.errors import UserError

from .conftest import HARMFUL, HARMLESS


def test_left_pad_positions_count_from_first_real_token():
    batch = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch.position_ids.tolist() == [[0, 1, 2], [0, 0, 0]]


def test_prompts_use_the_chat_template_with_generation_prompt(tokenizer):
    ids = format_chat_prompts(tokenizer, ["make a cake"])[0]
    assert tokenizer.convert_ids_to_tokens(ids) == ["<s>", "user", ":", "make", "a", "cake", "assistant", ":"]


def test_missing_chat_template_is_a_user_error(tokenizer):
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    with pytest.raises(UserError, match="chat template"):
        format_chat_prompts(bare, ["hi"])


def test_batched_generation_equals_one_by_one(model, tokenizer):
    ids = format_chat_prompts(tokenizer, HARMFUL + HARMLESS)
    batched = generate_greedy(model, tokenizer, ids, max_new_tokens=6, batch_size=4)
    single = generate_greedy(model, tokenizer, ids, max_new_tokens=6, batch_size=1)
    assert [r.token_ids for r in batched] == [r.token_ids for r in single]
    assert all(len(r.token_ids) == 6 and r.stop_reason == "length" for r in batched)


def test_generation_stops_each_row_when_decided(model, tokenizer):
    ids = format_chat_prompts(tokenizer, HARMFUL + HARMLESS)
    full = generate_greedy(model, tokenizer, ids, max_new_tokens=8, batch_size=4)
    # Decide a row once its answer contains one of these words (taken from
    # some full answers, at different depths, so rows stop at different steps).
    stop_words = {full[0].text.split()[2], full[1].text.split()[4]}

    def decided(text):
        return bool(stop_words & set(text.split()))

    stopped = generate_greedy(model, tokenizer, ids, max_new_tokens=8, batch_size=4, is_decided=decided)
    lengths = set()
    for whole, response in zip(full, stopped, strict=True):
        words = whole.text.split()
        hits = [position for position, word in enumerate(words) if word in stop_words]
        if hits:
            expected = hits[0] + 1
            assert response.stop_reason == "decided"
            assert response.token_ids == whole.token_ids[:expected]
            lengths.add(expected)
        else:
            assert response.stop_reason == "length" and response.token_ids == whole.token_ids
    assert len(lengths) >= 2  # rows of one batch really stopped at different steps


def test_teacher_forced_log_probs_align_with_greedy_tokens(model, tokenizer):
    ids = format_chat_prompts(tokenizer, HARMLESS)
    continuations = [r.token_ids for r in generate_greedy(model, tokenizer, ids, max_new_tokens=5, batch_size=2)]
    reference = continuation_log_probs(model, ids, continuations, n_positions=5, pad_id=0, batch_size=3)
    assert reference.log_probs.shape == (len(ids), 5, len(tokenizer))
    assert reference.log_probs.argmax(-1).tolist() == [list(c) for c in continuations]
    assert mean_kl_divergence(reference, reference) == 0.0


def test_kl_sees_an_edit_and_is_zero_for_the_same_model(model, tokenizer):
    ids = format_chat_prompts(tokenizer, HARMLESS)
    continuations = [r.token_ids for r in generate_greedy(model, tokenizer, ids, max_new_tokens=4, batch_size=2)]
    reference = continuation_log_probs(model, ids, continuations, n_positions=4, pad_id=0, batch_size=2)
    again = continuation_log_probs(model, ids, continuations, n_positions=4, pad_id=0, batch_size=2)
    assert mean_kl_divergence(reference, again) == 0.0
    edited = copy.deepcopy(model)
    with torch.no_grad():
        edited.model.layers[1].mlp.down_proj.weight.mul_(0.5)
    changed = continuation_log_probs(edited, ids, continuations, n_positions=4, pad_id=0, batch_size=2)
    assert mean_kl_divergence(reference, changed) > 1e-4


def test_kl_formula_and_mask_on_known_distributions():
    p = torch.tensor([[[0.5, 0.5], [0.9, 0.1]]]).log()
    q = torch.tensor([[[0.5, 0.5], [0.5, 0.5]]]).log()
    second = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    both = ContinuationLogProbs(p, torch.tensor([[True, True]]))
    assert mean_kl_divergence(both, ContinuationLogProbs(q, both.mask)) == pytest.approx(second / 2, rel=1e-6)
    first_only = ContinuationLogProbs(p, torch.tensor([[True, False]]))
    assert mean_kl_divergence(first_only, ContinuationLogProbs(q, first_only.mask)) == pytest.approx(0.0, abs=1e-7)


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(model, tokenizer):
    uniform = copy.deepcopy(model)
    with torch.no_grad():
        uniform.lm_head.weight.zero_()
    value = perplexity(uniform, tokenizer, ["one two three", "red green blue alpha beta"], batch_size=2)
    assert value == pytest.approx(len(tokenizer), rel=1e-4)
    assert perplexity(model, tokenizer, ["one two three"]) != pytest.approx(len(tokenizer), rel=1e-2)


def test_batch_size_search_prefers_fast_sizes_and_stops_at_out_of_memory():
    assert candidate_batch_sizes(100, 32) == [1, 2, 4, 8, 16, 32]
    assert candidate_batch_sizes(5, 128) == [1, 2, 4, 5]
    now = [0.0]
    cost_per_batch = {1: 1.0, 2: 1.0, 4: 1.0, 8: 4.0}  # 4 is the fastest per item; 16 does not fit

    def probe(size):
        if size > 8:
            raise torch.OutOfMemoryError("CUDA out of memory")
        now[0] += cost_per_batch[size]

    assert find_fastest_batch_size(probe, 100, clock=lambda: now[0]) == 4


def test_batch_size_search_reraises_other_errors():
    def probe(size):
        if size == 2:
            raise ValueError("broken model")

    with pytest.raises(ValueError):
        find_fastest_batch_size(probe, 10)
