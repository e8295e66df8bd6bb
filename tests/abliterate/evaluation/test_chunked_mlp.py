"""Long MLP inputs sliced by tokens give the unsliced output; only Llama-code MLPs on CUDA are sliced."""

from __future__ import annotations

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP
from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP

from abliterate.evaluation import chunked_mlp


def _mlp(cls=LlamaMLP):
    torch.manual_seed(0)
    return cls(LlamaConfig(hidden_size=16, intermediate_size=48, hidden_act="silu", num_attention_heads=2, num_key_value_heads=2)).eval()


def test_llama_code_mlps_qualify_and_others_do_not():
    assert chunked_mlp.is_llama_mlp(_mlp()) and chunked_mlp.is_llama_mlp(_mlp(Qwen3MLP))
    assert not chunked_mlp.is_llama_mlp(torch.nn.Linear(4, 4))


def test_slices_give_the_unsliced_output_and_shape():
    mlp = _mlp()
    x = torch.randn(3, 233, 16)  # 699 tokens: two full slices of 256 and a remainder
    sliced = chunked_mlp._sliced_forward(mlp, tokens_per_slice=256)
    with torch.no_grad():
        torch.testing.assert_close(sliced(x), mlp(x), rtol=1e-6, atol=1e-6)
        small = torch.randn(2, 5, 16)
        assert torch.equal(sliced(small), mlp(small))  # short inputs go straight through


def test_slice_size_follows_the_intermediate_width():
    assert chunked_mlp.slice_tokens(14336, 2) == 2**25 // (14336 * 2) == 1170
    assert chunked_mlp.slice_tokens(10**7, 2) == chunked_mlp.MIN_SLICE_TOKENS


def test_cpu_models_are_left_alone():
    model = torch.nn.Sequential(_mlp())
    with chunked_mlp.sliced_mlps(model) as count:
        assert count == 0 and "forward" not in model[0].__dict__
