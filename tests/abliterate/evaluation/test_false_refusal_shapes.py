"""The false-refusal answers' batch shape on the static decoder (pure)."""

from __future__ import annotations

from abliterate.evaluation.false_refusals import fixed_shape


def test_departed_prompts_are_padded_to_whole_batches_that_hold_the_longest_prompt() -> None:
    pool = [[1], [1, 2, 3, 4], [1, 2], [5, 6, 7]]
    for asked in ([[1]], [[1, 2], [5, 6, 7]], [[1, 2, 3, 4]], pool):
        shaped = fixed_shape(list(asked), pool, size=3)
        assert shaped[: len(asked)] == asked  # the asked prompts first, in order: their answers are read there
        assert len(shaped) % 3 == 0
        assert max(map(len, shaped)) == 4  # every trial's batch has the same longest prompt, so the same shape
        assert all(prompt == [1, 2, 3, 4] for prompt in shaped[len(asked):])
