"""Long forwards run each MLP a slice of tokens at a time, on the GPU.

Why: a prefill or KL pass over ~5,000 tokens holds the MLP's three [tokens, intermediate] tensors (gate, up,
their product) at once: on the 8B-shaped model 0.47 GB, the largest transient of a stage-2 run on an H200
(bench/stage2_trial_profile.py --memory_history, 2026-12-02: the process peak was a 128-prompt forward of the
residual capture for the directions, with the harmful answers' KV cache already allocated). The MLP is per
token, so slicing the tokens changes nothing but which tensors exist at once; a packed NVFP4 weight is
dequantized once more per extra slice (~28 us each on the H200).

Only modules whose ``forward`` is Llama's MLP code (Mistral, Qwen2/3 and others copy it; compared by bytecode)
on a CUDA device are sliced; CPU runs keep transformers' code and their results.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers.models.llama.modeling_llama import LlamaMLP

from abliterate.evaluation.forward_swaps import runs_code_of, swapped_forwards

SLICE_BYTES = 2**25  # one [tokens, intermediate] tensor of a slice: 32 MiB (1,170 tokens at 14336 x bf16)
MIN_SLICE_TOKENS = 256


def is_llama_mlp(module: torch.nn.Module) -> bool:
    return runs_code_of(module, LlamaMLP.forward) and hasattr(module, "intermediate_size")


def slice_tokens(intermediate_size: int, element_bytes: int) -> int:
    """Tokens per slice: the slice's intermediate tensor within ``SLICE_BYTES``, at least ``MIN_SLICE_TOKENS``."""
    return max(MIN_SLICE_TOKENS, SLICE_BYTES // max(1, intermediate_size * element_bytes))


def _sliced_forward(module: torch.nn.Module, tokens_per_slice: int):
    run = type(module).forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] <= tokens_per_slice:
            return run(module, x)
        out = None
        for start in range(0, rows.shape[0], tokens_per_slice):
            part = run(module, rows[start : start + tokens_per_slice])
            if out is None:
                out = part.new_empty(rows.shape[0], part.shape[-1])
            out[start : start + part.shape[0]] = part
        return out.reshape(*x.shape[:-1], out.shape[-1])

    return forward


@contextmanager
def sliced_mlps(model: torch.nn.Module) -> Iterator[int]:
    """Within the block, the model's Llama-style MLPs on CUDA slice long inputs; yields how many were set up."""
    dtype = getattr(model, "dtype", torch.bfloat16)  # the activations' dtype
    element_bytes = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 2

    def replacement(module: torch.nn.Module):
        if not is_llama_mlp(module):
            return None
        tensors = [*module.parameters(), *module.buffers()]  # packed weights are buffers
        if not tensors or tensors[0].device.type != "cuda":
            return None
        return _sliced_forward(module, slice_tokens(module.intermediate_size, element_bytes))

    with swapped_forwards(model, replacement) as count:
        yield count
