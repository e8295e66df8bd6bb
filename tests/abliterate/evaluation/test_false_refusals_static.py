"""False refusals on the static-cache decoder (the GPU path, run eagerly on the CPU on the committed testbed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from abliterate.evaluation import static_decode
from abliterate.evaluation.generation import format_chat_prompts, generate_greedy
from abliterate.evaluation.prompt_sets import read_field

PROMPTS = Path(__file__).resolve().parents[3] / "datasets_yaml" / "prompts"


@pytest.mark.usefixtures("one_cpu_thread")
def test_false_refusals_reuse_one_static_decoder_across_trials(testbed):
    """The prompts that depart from the reference vary per trial; their generation must keep one batch shape."""
    import copy

    from abliterate.evaluation import EvaluationConfig, Evaluator, is_refusal

    model, tokenizer = testbed
    harmful = read_field(PROMPTS / "harmful_test.jsonl", "prompt", "test")[:4]
    harmless = read_field(PROMPTS / "harmless_test.jsonl", "prompt", "test")[:10]
    # a "marker" one of the testbed's four answer openers contains: some harmless answers count, edits move them
    config = EvaluationConfig(refusal_markers=("here is",), max_new_tokens=16, kl_tokens=6, batch_size=4,
                              decoding="static", count_harmless_refusals=True, harmless_max_new_tokens=6)
    evaluator = Evaluator(model, tokenizer, harmful, harmless, config)
    shapes, counts = set(), {evaluator.base.harmless_refusals}
    for scale in (0.9, 0.6, 0.2, 0.0):
        edited = copy.deepcopy(model)
        static_decode.forget_decoders(edited)  # only this trial's decoders below (not the reference's, copied along)
        with torch.no_grad():
            for layer in edited.model.layers[3:]:
                layer.mlp.down_proj.weight.mul_(scale)
        result = evaluator.evaluate(edited)
        answers = generate_greedy(edited, tokenizer, format_chat_prompts(tokenizer, harmless), max_new_tokens=6,
                                  batch_size=4, decoding="generate")
        assert result.harmless_refusals == sum(is_refusal(a.text, config.refusal_markers) for a in answers)
        counts.add(result.harmless_refusals)
        decoders = edited.__dict__.get("_static_decoders", {})
        shapes |= {(size, decoder.cache_len) for size, decoder in decoders.items()}
    # one decoder for every trial: the departed prompts are padded to the harmful prompts' batch size and decode
    # in their KV cache (no cache of their own), so every trial keeps exactly one (batch, cache length)
    harmful_cache = max(len(ids) for ids in evaluator.harmful_ids) + config.max_new_tokens
    assert shapes == {(4, harmful_cache)}
    assert len(counts) > 1  # the edits moved the count, so departed prompts were generated


@pytest.mark.usefixtures("one_cpu_thread")
def test_false_refusal_answers_decode_on_from_the_kl_pass_without_a_prefill_of_their_own(testbed):
    """All harmless prompts in one batch: the KL pass leaves them in the decoder's cache, the departed ones'
    answers start from there. Same counts as transformers' generate, and one long forward fewer per trial."""
    import copy

    from abliterate.evaluation import EvaluationConfig, Evaluator, is_refusal

    model, tokenizer = testbed
    harmful = read_field(PROMPTS / "harmful_test.jsonl", "prompt", "test")[:4]
    harmless = read_field(PROMPTS / "harmless_test.jsonl", "prompt", "test")[:6]
    config = EvaluationConfig(refusal_markers=("here is",), max_new_tokens=16, kl_tokens=6, batch_size=8,
                              decoding="static", count_harmless_refusals=True, harmless_max_new_tokens=6)
    evaluator = Evaluator(model, tokenizer, harmful, harmless, config)
    assert evaluator.base.kl == 0.0
    counts = {evaluator.base.harmless_refusals}
    for scale in (0.9, 0.6, 0.2, 0.0):
        edited = copy.deepcopy(model)
        static_decode.forget_decoders(edited)
        with torch.no_grad():
            for layer in edited.model.layers[3:]:
                layer.mlp.down_proj.weight.mul_(scale)
        prefills = []
        hook = edited.model.register_forward_pre_hook(
            lambda module, args, kwargs: prefills.append(kwargs["input_ids"].shape[1]) if kwargs["input_ids"].shape[1] > 1 else None,
            with_kwargs=True)  # fmt: skip
        result = evaluator.evaluate(edited)
        hook.remove()
        answers = generate_greedy(edited, tokenizer, format_chat_prompts(tokenizer, harmless), max_new_tokens=6,
                                  batch_size=8, decoding="generate")
        assert result.harmless_refusals == sum(is_refusal(a.text, config.refusal_markers) for a in answers)
        counts.add(result.harmless_refusals)
        # the harmful answers' prefill and the KL pass: the departed answers have none of their own
        assert len(prefills) == 2, prefills
        assert prefills[1] == max(len(ids) for ids in evaluator.harmless_ids) + config.kl_tokens - 1
    assert len(counts) > 1  # the edits moved the count, so departed prompts were generated
