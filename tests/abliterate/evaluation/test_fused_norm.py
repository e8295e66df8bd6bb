"""The fused RMSNorm kernel gives transformers' LlamaRMSNorm, and is swapped in only where it applies."""

from __future__ import annotations

import pytest
import torch
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from abliterate.evaluation import fused_norm


def test_only_modules_running_llamas_norm_code_qualify():
    assert fused_norm.is_llama_rms_norm(LlamaRMSNorm(8)) and fused_norm.is_llama_rms_norm(Qwen3RMSNorm(8))
    assert not fused_norm.is_llama_rms_norm(GemmaRMSNorm(8))  # (1 + w) * x
    assert not fused_norm.is_llama_rms_norm(Olmo2RMSNorm(8))  # weight before the cast
    assert not fused_norm.is_llama_rms_norm(torch.nn.LayerNorm(8))


def test_nothing_is_swapped_on_the_cpu():
    model = torch.nn.Sequential(LlamaRMSNorm(8), torch.nn.Linear(8, 8))
    with fused_norm.fused_rms_norms(model) as swapped:
        assert swapped == 0
        assert "forward" not in model[0].__dict__


# No bf16 here: the interpreter casts fp32 to bf16 by truncation, not rounding (Triton 3.9); bf16 is checked on
# the GPU (bench/decode_kernels_bench.py: bit-exact share against transformers' code).
@pytest.mark.parametrize("dtype, weight_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                                 (torch.float16, torch.float32)])
def test_kernel_equals_llama_rms_norm(dtype, weight_dtype):
    """Under Triton's interpreter: the same roundings as transformers' code (x's dtype before the weight)."""
    pytest.importorskip("triton")
    generator = torch.Generator().manual_seed(0)
    norm = LlamaRMSNorm(96, eps=1e-5).to(weight_dtype)  # not a power of two: the masked tail
    norm.weight.data = torch.randn(96, generator=generator).to(weight_dtype)
    x = (torch.randn(5, 3, 96, generator=generator) * 3).to(dtype)
    reference = norm(x)
    ours = fused_norm.rms_norm(x, norm.weight, norm.variance_epsilon)
    assert ours.dtype == reference.dtype and ours.shape == reference.shape
    ulp = 0 if dtype == torch.float32 else torch.finfo(dtype).eps
    torch.testing.assert_close(ours, reference, rtol=max(ulp, 1e-6), atol=1e-6)
