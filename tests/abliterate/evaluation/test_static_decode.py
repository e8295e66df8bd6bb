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

from abliterate.evaluation import grouped_heads, static_decode
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

PROMPTS = Path(__file__).resolve().parents[3] / "datasets_yaml" / "prompts"


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


@pytest.mark.usefixtures("one_cpu_thread")
def test_batches_of_one_size_share_one_decoder(testbed):
    """Prompts of several lengths in equal batches: one KV cache and graph, not one per prompt length."""
    model, tokenizer = testbed
    static_decode.forget_decoders(model)
    ids = _prompts(tokenizer, 4)
    assert len({len(prompt) for prompt in ids}) > 2, "the test needs prompts of several lengths"
    reference = generate_greedy(model, tokenizer, ids, max_new_tokens=6, batch_size=2, decoding="generate")
    static = generate_greedy(model, tokenizer, ids, max_new_tokens=6, batch_size=2, decoding="static")
    assert len(model.__dict__["_static_decoders"]) == 1
    assert [r.token_ids for r in static] == [r.token_ids for r in reference]


def test_grouped_decode_attention_equals_transformers_sdpa():
    """One query per row, 8 query heads on 2 KV heads, a padding mask: the same output as sdpa's repeat_kv path."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    generator = torch.Generator().manual_seed(0)
    query = torch.randn(3, 8, 1, 16, generator=generator)
    key, value = torch.randn(2, 3, 2, 11, 16, generator=generator)
    mask = torch.zeros(3, 1, 1, 11)
    mask[0, ..., :4] = torch.finfo(mask.dtype).min  # row 0 left-padded by 4
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 4, True
    ours, _ = grouped_heads.grouped_decode_attention(module, query, key, value, mask, scaling=0.25)
    reference, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    assert ours.shape == reference.shape == (3, 1, 8, 16)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    prefill = torch.randn(3, 8, 5, 16, generator=generator)  # anything but one query: transformers' own sdpa
    mask5 = torch.zeros(3, 1, 5, 11)
    torch.testing.assert_close(grouped_heads.grouped_decode_attention(module, prefill, key, value, mask5)[0],
                               sdpa_attention_forward(module, prefill, key, value, mask5)[0])


def test_stacked_heads_prefill_attention_equals_transformers_sdpa():
    """A prefill's query heads stacked per KV head (the GPU prefill path): sdpa's output, without K/V copies."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    generator = torch.Generator().manual_seed(1)
    query = torch.randn(3, 8, 5, 16, generator=generator)
    key, value = torch.randn(2, 3, 2, 11, 16, generator=generator)
    mask = torch.zeros(3, 1, 5, 11)
    mask[..., 6:] = torch.finfo(mask.dtype).min  # cache positions past the prompt
    mask[0, ..., :2] = torch.finfo(mask.dtype).min  # row 0 left-padded by 2
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 4, True
    reference, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    torch.testing.assert_close(grouped_heads.stacked_heads_attention(query, key, value, mask, 0.25), reference,
                               rtol=1e-5, atol=1e-6)


def test_long_forwards_take_grouped_attention_only_on_a_gpu():
    """``gpu_only`` leaves a CPU model on transformers' sdpa (CPU results unchanged); without it the model
    switches for the block and back."""
    from tests.tiny_models import dense_llama

    model = dense_llama(layers=1)
    model.config._attn_implementation = "sdpa"
    with grouped_heads.grouped_attention(model, gpu_only=True):
        assert model.config._attn_implementation == "sdpa"
    with grouped_heads.grouped_attention(model):
        assert model.config._attn_implementation == grouped_heads.GROUPED_DECODE_ATTENTION
        with grouped_heads.grouped_attention(model):  # nested (the decoder inside an evaluation): unchanged
            assert model.config._attn_implementation == grouped_heads.GROUPED_DECODE_ATTENTION
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.usefixtures("one_cpu_thread")
def test_lagged_checks_keep_every_answer_and_stop_at_most_one_check_later(testbed):
    """The GPU's way of checking (each check judged one check later) run on the CPU: the same kept tokens and stop
    reasons as checking at once, and the loop ends at most one check interval of steps after it."""
    model, tokenizer = testbed
    ids = _prompts(tokenizer, 3)[:3]  # harmful prompts only: the testbed refuses them, so every row ends early
    from abliterate.evaluation.generation import left_pad, pad_token_id

    batch = left_pad(ids, pad_token_id(tokenizer), "cpu", max(len(prompt) for prompt in ids))
    decoder = static_decode.StaticDecoder(model, len(ids), batch.input_ids.shape[1] + 64, torch.float32)
    eos = {tokenizer.eos_token_id}
    results = {}
    for lagged in (False, True):
        judge = static_decode.RowJudge(tokenizer, eos, _decided)
        tokens = decoder.run(batch, 64, judge, check_every=4, lagged=lagged)
        kept = [tokens[row, : judge.end_of(row, tokens.shape[1])[0]].tolist() for row in range(len(ids))]
        results[lagged] = (tokens.shape[1], kept, [judge.end_of(row, tokens.shape[1])[1] for row in range(len(ids))])
    (steps_now, kept_now, reasons_now), (steps_lagged, kept_lagged, reasons_lagged) = results[False], results[True]
    assert steps_now < 64, "the test needs a call whose rows all end before the length limit"
    assert kept_lagged == kept_now and reasons_lagged == reasons_now
    assert steps_now < steps_lagged <= steps_now + 4


def test_token_readback_returns_the_tokens_of_its_check():
    generated = torch.arange(12).reshape(2, 6)
    readback = static_decode.TokenReadback(generated)
    assert not readback.pending
    readback.start(3)
    generated[:, :3] += 100  # written after the check: the readback keeps what the check saw
    assert readback.pending and readback.result().tolist() == [[0, 1, 2], [6, 7, 8]]


@pytest.mark.usefixtures("one_cpu_thread")
def test_a_decoder_is_not_reused_once_a_module_of_the_model_was_replaced(testbed):
    """A captured step replays the modules it was captured with: an adapter injected later must get a new decoder
    (on a GPU the kept graph would decode without it)."""
    import copy

    from peft import LoraConfig, inject_adapter_in_model

    model, tokenizer = testbed
    model = copy.deepcopy(model)
    static_decode.forget_decoders(model)
    ids = _prompts(tokenizer, 2)
    generate_greedy(model, tokenizer, ids, max_new_tokens=4, batch_size=4, decoding="static")
    before = static_decode.decoder_for(model, 4, max(map(len, ids)), 4)
    assert static_decode.decoder_for(model, 4, max(map(len, ids)), 4) is before  # kept while nothing changed
    inject_adapter_in_model(LoraConfig(r=1, target_modules=["o_proj"]), model, adapter_name="edit")
    after = static_decode.decoder_for(model, 4, max(map(len, ids)), 4)
    assert after is not before and after.modules_key == static_decode.modules_key(model)
    assert list(model.__dict__["_static_decoders"].values()) == [after]
