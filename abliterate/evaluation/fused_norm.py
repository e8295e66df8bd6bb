"""transformers' Llama RMSNorm as one Triton kernel, for the captured decode step.

Why: eagerly, each RMSNorm is seven kernels (casts, pow, mean, add, rsqrt, two multiplies); an 8B-shaped decode
step has 65 of them, ~150 ms of a 1.9 s trial's GPU time on an H200 (bench/stage2_trial_profile_kernels_swap.txt),
for a row of 4096 values each. Only modules whose ``forward`` is Llama's own code (Mistral, Qwen2/3, Mixtral,
NemotronH, Granite copy it; compared by bytecode, not by name) are swapped, and only inside the decode step on a
CUDA device with Triton; the prefill and every CPU run keep transformers' code.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from abliterate.evaluation import decode_attention
from abliterate.evaluation.forward_swaps import runs_code_of, swapped_forwards

try:
    import triton

    from abliterate.evaluation import decode_kernels as kernel
except ImportError:
    triton = kernel = None

_MAX_WIDTH = 16384


def is_llama_rms_norm(module: torch.nn.Module) -> bool:
    """True for a module whose forward is Llama's RMSNorm code, with a 1-D weight and an epsilon."""
    weight = getattr(module, "weight", None)
    return runs_code_of(module, LlamaRMSNorm.forward) and isinstance(weight, torch.Tensor) and weight.dim() == 1 and hasattr(module, "variance_epsilon")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``LlamaRMSNorm(x)`` for x [..., D] in one kernel; the output dtype is torch's promotion of weight and x."""
    width = x.shape[-1]
    rows = x.reshape(-1, width)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, device=x.device, dtype=torch.promote_types(weight.dtype, x.dtype))
    kernel._rms_norm_kernel[(rows.shape[0],)](
        rows, weight, out, width, float(eps), rows.stride(0), out.stride(0),
        BLOCK=triton.next_power_of_2(width), num_warps=4 if width <= 4096 else 8,
    )  # fmt: skip
    return out.reshape(x.shape)


def _fused_forward(module: torch.nn.Module):
    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.shape[-1] > _MAX_WIDTH or not module.weight.is_contiguous():
            return type(module).forward(module, hidden_states)
        return rms_norm(hidden_states, module.weight, module.variance_epsilon)

    return forward


@contextmanager
def fused_rms_norms(model: torch.nn.Module) -> Iterator[int]:
    """Within the block, the model's Llama-style RMSNorms on a Triton-capable CUDA device run ``rms_norm``.

    Yields how many modules were swapped (0 where none can be: CPU, no Triton, other norm code).
    """
    first = next(model.parameters(), None)
    if kernel is None or first is None or not decode_attention.available(first.device):
        yield 0  # a CPU step: no walk over the modules
        return

    def replacement(module: torch.nn.Module):
        if is_llama_rms_norm(module) and decode_attention.available(module.weight.device):
            return _fused_forward(module)
        return None

    with swapped_forwards(model, replacement) as count:
        yield count
