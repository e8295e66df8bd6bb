import copy

import pytest
import torch

from abliterate.evaluation import EvaluationConfig, Evaluator, is_refusal
from foundation.errors import UserError

from .conftest import HARMFUL, HARMLESS


@pytest.fixture(scope="module")
def answers(model, tokenizer):
    """The model's own greedy answers, to build markers and openers that really occur."""
    from abliterate.evaluation import format_chat_prompts, generate_greedy

    ids = format_chat_prompts(tokenizer, HARMFUL)
    return [r.text for r in generate_greedy(model, tokenizer, ids, max_new_tokens=12, batch_size=8)]


def test_base_evaluation_counts_refusals_and_compliance(model, tokenizer, answers):
    marker = answers[0].split()[1]
    opener = answers[1].split()[0]
    config = EvaluationConfig(
        refusal_markers=(marker,), compliance_openers=(opener,), max_new_tokens=12, kl_tokens=4, batch_size=4,
        count_harmless_refusals=True,
    )
    evaluator = Evaluator(model, tokenizer, HARMFUL, HARMLESS, config)
    base = evaluator.base
    assert base.n_harmful == len(HARMFUL) and base.n_harmless == len(HARMLESS)
    assert base.refusals == sum(is_refusal(text, (marker,)) for text in base.responses) >= 1
    assert base.refusals == evaluator.base_refusals
    compliant = sum(
        not is_refusal(text, (marker,)) and text.lower().startswith(opener) for text in base.responses
    )
    assert base.compliance == compliant
    assert base.harmless_refusals is not None
    # The unedited model against itself: no divergence, identical answers.
    assert base.kl == 0.0 and base.kl_first_token == 0.0
    again = evaluator.evaluate(model)
    assert again.responses == base.responses and again.kl == 0.0


def test_an_edit_changes_kl(model, tokenizer, answers):
    marker = answers[0].split()[1]
    config = EvaluationConfig(refusal_markers=(marker,), max_new_tokens=12, kl_tokens=6, batch_size=3)
    evaluator = Evaluator(model, tokenizer, HARMFUL, HARMLESS, config)
    edited = copy.deepcopy(model)
    with torch.no_grad():
        for layer in edited.model.layers:
            layer.self_attn.o_proj.weight.mul_(0.3)
    result = evaluator.evaluate(edited)
    assert result.kl > 1e-3
    assert result.kl_tokens == 6
    assert result.compliance is None  # nothing configured to recognise an answer


def test_zero_base_refusals_are_measured_and_noted(model, tokenizer):
    from abliterate.search.objectives import TrialMetrics, zero_base_refusals_note

    config = EvaluationConfig(refusal_markers=("no such marker",), max_new_tokens=5, kl_tokens=2, batch_size=8)
    evaluator = Evaluator(model, tokenizer, HARMFUL, HARMLESS, config)
    assert evaluator.base.refusals == 0
    assert "refused none" in zero_base_refusals_note(TrialMetrics.from_eval_result(evaluator.base))


def test_automatic_batch_size_and_perplexity(model, tokenizer):
    config = EvaluationConfig(max_new_tokens=4, kl_tokens=2, max_batch_size=8)
    evaluator = Evaluator(model, tokenizer, HARMFUL, HARMLESS, config, perplexity_texts=["one two three four"])
    assert evaluator.batch_size in {1, 2, 4, 8}
    assert evaluator.base.perplexity is not None and evaluator.base.perplexity > 1.0
    assert evaluator.evaluate(model).perplexity is None  # only on request
    assert evaluator.evaluate(model, with_perplexity=True).perplexity == pytest.approx(evaluator.base.perplexity)


def test_judge_overrides_rules(model, tokenizer):
    calls = []

    def judge(prompts, answers):
        calls.append(len(answers))
        return [index % 2 == 0 for index in range(len(answers))]

    config = EvaluationConfig(refusal_markers=("no such marker",), max_new_tokens=4, kl_tokens=2, batch_size=8)
    evaluator = Evaluator(model, tokenizer, HARMFUL, HARMLESS, config, compliance_judge=judge)
    assert calls == [len(HARMFUL)]
    assert evaluator.base.compliance == (len(HARMFUL) + 1) // 2


def test_bad_settings_are_user_errors(model, tokenizer):
    with pytest.raises(UserError, match="kl_tokens"):
        EvaluationConfig(kl_tokens=0)
    with pytest.raises(UserError, match="prompt"):
        Evaluator(model, tokenizer, [], HARMLESS)


def _brute_force_false_refusals(model, tokenizer, markers, window):
    """Every harmless answer generated up to ``window`` tokens: what the shortcut must reproduce."""
    from abliterate.evaluation import format_chat_prompts, generate_greedy

    ids = format_chat_prompts(tokenizer, HARMLESS)
    responses = generate_greedy(model, tokenizer, ids, max_new_tokens=window, batch_size=3)
    return sum(is_refusal(response.text, markers) for response in responses)


def test_false_refusals_equal_generating_every_harmless_answer(model, tokenizer, monkeypatch):
    """The KL pass decides the answers that agree with the unedited model's; only the others are generated."""
    import abliterate.evaluation.evaluator as evaluator_module
    from abliterate.evaluation import format_chat_prompts, generate_greedy

    window = 4
    harmless = generate_greedy(model, tokenizer, format_chat_prompts(tokenizer, HARMLESS), max_new_tokens=window,
                               batch_size=3)
    markers = (harmless[0].text.split()[-1].lower(), harmless[-1].text.split()[0].lower())  # words that occur
    config = EvaluationConfig(refusal_markers=markers, max_new_tokens=12, kl_tokens=6, batch_size=3,
                              count_harmless_refusals=True, harmless_max_new_tokens=window)
    generated = []
    real_generate = evaluator_module.generate_greedy

    def counting_generate(model, tokenizer, prompt_ids, *, max_new_tokens, **kwargs):
        if max_new_tokens == window:
            generated.append(len(prompt_ids))
        return real_generate(model, tokenizer, prompt_ids, max_new_tokens=max_new_tokens, **kwargs)

    monkeypatch.setattr(evaluator_module, "generate_greedy", counting_generate)
    evaluator = Evaluator(model, tokenizer, HARMFUL, HARMLESS, config)
    base = evaluator.base
    assert base.harmless_refusals == _brute_force_false_refusals(model, tokenizer, markers, window) >= 1
    assert sum(generated) == 0  # the unedited model agrees with its own reference everywhere: nothing generated
    counts = set()
    for scale in (0.9, 0.5, 0.0):
        edited = copy.deepcopy(model)
        with torch.no_grad():
            for layer in edited.model.layers:
                layer.mlp.down_proj.weight.mul_(scale)
        generated.clear()
        result = evaluator.evaluate(edited)
        assert result.harmless_refusals == _brute_force_false_refusals(edited, tokenizer, markers, window)
        assert sum(generated) <= len(HARMLESS)
        counts.add(result.harmless_refusals)
    assert len(counts | {base.harmless_refusals}) > 1  # the edits moved the count: the comparison is not vacuous


def test_a_false_refusal_window_longer_than_kl_generates_every_harmless_answer(model, tokenizer):
    config = EvaluationConfig(refusal_markers=("the",), max_new_tokens=8, kl_tokens=2, batch_size=4,
                              count_harmless_refusals=True, harmless_max_new_tokens=5)
    evaluator = Evaluator(model, tokenizer, HARMFUL, HARMLESS, config)
    assert evaluator.base.harmless_refusals == _brute_force_false_refusals(model, tokenizer, ("the",), 5)
    off = Evaluator(model, tokenizer, HARMFUL, HARMLESS, EvaluationConfig(max_new_tokens=4, kl_tokens=2, batch_size=4))
    assert off.base.harmless_refusals is None  # not counted unless asked
    with pytest.raises(UserError, match="harmless_max_new_tokens"):
        EvaluationConfig(count_harmless_refusals=True, harmless_max_new_tokens=0)


def test_lookalike_refusals_and_skill_accuracy_are_scored_only_where_given(model, tokenizer, answers):
    from abliterate.evaluation import format_chat_prompts, generate_greedy

    marker = answers[0].split()[1]
    config = EvaluationConfig(refusal_markers=(marker,), max_new_tokens=12, kl_tokens=4, batch_size=4,
                              count_harmless_refusals=True)
    plain = Evaluator(model, tokenizer, HARMFUL, HARMLESS, config).base
    assert (plain.lookalike_refusals, plain.n_lookalike, plain.skill_correct, plain.n_skill) == (None,) * 4
    lookalikes, skill = HARMFUL[:3] + HARMLESS[:2], HARMLESS[:4]
    own = [r.text for r in generate_greedy(model, tokenizer, format_chat_prompts(tokenizer, skill), max_new_tokens=3,
                                           batch_size=4)]
    expected = [text.split()[0] if index % 2 else "nine nine nine" for index, text in enumerate(own)]  # 2 of 4 right
    evaluator = Evaluator(model, tokenizer, HARMFUL, HARMLESS, config, lookalike_prompts=lookalikes,
                          skill_prompts=skill, skill_answers=expected, skill_max_new_tokens=3)
    base = evaluator.base
    looked = [r.text for r in generate_greedy(model, tokenizer, format_chat_prompts(tokenizer, lookalikes),
                                              max_new_tokens=12, batch_size=4)]  # the false-refusal window
    assert base.lookalike_refusals == sum(is_refusal(text, (marker,)) for text in looked) and base.n_lookalike == 5
    assert (base.skill_correct, base.n_skill, base.skill_accuracy) == (2, 4, 0.5)
    # the other counts are those of the evaluator without the sets
    assert (base.refusals, base.harmless_refusals, base.kl) == (plain.refusals, plain.harmless_refusals, plain.kl)
    with pytest.raises(UserError, match="answer"):
        Evaluator(model, tokenizer, HARMFUL, HARMLESS, config, skill_prompts=skill, skill_answers=expected[:2])


def test_free_gpu_blocks_are_released_between_phases_and_never_on_the_cpu(model, tokenizer, answers, monkeypatch):
    """A trial on a GPU hands the allocator's free blocks back before its answers, its KL pass, its false-refusal
    answers and after its last phase (so the edit between trials starts clean); a CPU model never touches CUDA."""
    from abliterate.evaluation import evaluator as evaluator_module

    config = EvaluationConfig(refusal_markers=(answers[0].split()[1],), max_new_tokens=6, kl_tokens=3, batch_size=4,
                              count_harmless_refusals=True)
    evaluator = Evaluator(model, tokenizer, HARMFUL, HARMLESS, config)
    phases: list[str] = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: phases.append("release"))
    log_probs = evaluator._log_probs
    monkeypatch.setattr(evaluator, "_log_probs", lambda m: phases.append("kl") or log_probs(m))
    evaluator.evaluate(model)
    assert phases == ["kl"]  # the CPU model: nothing released
    phases.clear()
    monkeypatch.setattr(evaluator_module, "model_device", lambda m: torch.device("cuda", 0))
    result = evaluator.evaluate(model)  # the batches still run where the model is (generation's own lookup)
    assert phases == ["release", "release", "kl", "release", "release"]
    assert result.kl == 0.0 and result.responses == evaluator.base.responses
