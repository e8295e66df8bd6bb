"""Forwards swapped for a block come back afterwards, and a module's own instance forward (a hook) is left alone."""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from abliterate.evaluation.forward_swaps import runs_code_of, swapped_forwards


def test_swapped_for_the_block_and_restored():
    model = torch.nn.Sequential(LlamaRMSNorm(4), LlamaRMSNorm(4), torch.nn.Linear(4, 4))
    hooked = lambda x: x * 0  # noqa: E731 - an instance forward, as accelerate's hooks set one
    model[1].forward = hooked
    x = torch.randn(2, 4)
    with swapped_forwards(model, lambda m: (lambda x: x + 1) if isinstance(m, LlamaRMSNorm) else None) as count:
        assert count == 1
        assert torch.equal(model[0](x), x + 1)
        assert model[1].forward is hooked
    assert "forward" not in model[0].__dict__ and model[1].forward is hooked
    assert torch.allclose(model[0](x), LlamaRMSNorm(4)(x))


def test_runs_code_of_compares_code_not_names():
    assert runs_code_of(LlamaRMSNorm(4), LlamaRMSNorm.forward)
    assert not runs_code_of(torch.nn.Linear(2, 2), LlamaRMSNorm.forward)
