"""The one factory of tiny random models, made from configs (no Hub), for every test folder.

``llama_config`` / ``qwen3_moe_config`` give the shared small shapes (hidden 64,
4 heads, GQA 2, inputs multiples of 32 so int4 groups and NVFP4 blocks fit);
callers override what their test is about (vocabulary, layers, special
tokens). The builders below are the layouts stage 2 must handle.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    GptOssConfig,
    LlamaConfig,
    NemotronHConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

VOCAB = 96
HIDDEN = 64


def llama_config(**overrides) -> LlamaConfig:
    values = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  architectures=["LlamaForCausalLM"])
    return LlamaConfig(**{**values, **overrides})


def qwen3_moe_config(**overrides) -> Qwen3MoeConfig:
    """Qwen3-MoE: transformers 5 stores its experts as fused 3-D parameters."""
    values = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, moe_intermediate_size=32,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
                  num_experts_per_tok=2, max_position_embeddings=256, architectures=["Qwen3MoeForCausalLM"])
    return Qwen3MoeConfig(**{**values, **overrides})


def _build(config) -> nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    return model.eval()


def dense_llama(layers: int = 4) -> nn.Module:
    return _build(llama_config(num_hidden_layers=layers))


def fused_moe() -> nn.Module:
    """Qwen3-MoE: experts stored as one [experts, hidden, in] parameter per layer."""
    return _build(qwen3_moe_config())


def transposed_fused_moe() -> nn.Module:
    """gpt-oss: experts stored [experts, in, hidden] (is_transposed)."""
    return _build(GptOssConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                               num_experts_per_tok=2))


class _ExpertMLP(nn.Module):
    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class ModuleListExperts(nn.ModuleList):
    """The older / remote-code MoE layout: one Linear-based MLP per expert in a ModuleList."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        output = torch.zeros_like(hidden_states)
        for expert_index, expert in enumerate(self):
            token_index, slot = torch.where(top_k_index == expert_index)
            if token_index.numel():
                contribution = expert(hidden_states[token_index]) * top_k_weights[token_index, slot, None]
                output.index_add_(0, token_index, contribution.to(output.dtype))
        return output


def modulelist_moe() -> nn.Module:
    """Qwen2-MoE with its experts replaced by a ModuleList of MLPs; keeps its shared expert."""
    model = _build(Qwen2MoeConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, moe_intermediate_size=32,
                                  shared_expert_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, num_experts=4, num_experts_per_tok=2))
    torch.manual_seed(1)
    for layer in model.model.layers:
        layer.mlp.experts = ModuleListExperts([_ExpertMLP(HIDDEN, 32) for _ in range(4)])
    return model.eval()


def nemotron_h_hybrid() -> nn.Module:
    """Mamba, attention, MLP and MoE layers (the NemotronH pattern)."""
    return _build(NemotronHConfig(vocab_size=VOCAB, hidden_size=HIDDEN,
                                  layers_block_type=["mamba", "attention", "mlp", "moe"],
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
                                  mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=16, n_groups=1,
                                  n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                  moe_shared_expert_intermediate_size=32, n_group=1, topk_group=1))


ALL_MODELS = {
    "dense_llama": dense_llama,
    "modulelist_moe": modulelist_moe,
    "fused_moe": fused_moe,
    "transposed_fused_moe": transposed_fused_moe,
    "nemotron_h": nemotron_h_hybrid,
}


# --- one tiny config per family the family matrix (tests/abliterate/test_family_matrix.py) covers ----------------
# 2 layers, hidden 64, 4 heads / 2 KV heads, head_dim 16 and inputs that are multiples of 16 (NVFP4 blocks).
_ATTENTION = dict(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=256)
_MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)


def family_config(family: str, **overrides):
    """The tiny config of ``family`` (a transformers ``model_type``), ``architectures`` set as export needs."""
    import transformers

    class_name, architecture, values = FAMILY_CONFIGS[family]
    config = getattr(transformers, class_name)(**{**_ATTENTION, "vocab_size": VOCAB, **values, **overrides})
    config.architectures = [architecture]
    return config


FAMILY_CONFIGS: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(intermediate_size=128)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(intermediate_size=128)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(intermediate_size=128)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(intermediate_size=128, sliding_window=32)),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(intermediate_size=128, sliding_window=32)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(intermediate_size=128, pad_token_id=0)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(intermediate_size=128, num_experts=4,
                                                                  shared_expert_intermediate_size=32, **_MOE)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(intermediate_size=128, num_experts=4, **_MOE)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(intermediate_size=32, num_local_experts=4,
                                                            num_experts_per_tok=2)),
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM", dict(intermediate_size=32, num_local_experts=4,
                                                         num_experts_per_tok=2)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        intermediate_size=128, n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
        q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, head_dim=16,
        num_key_value_heads=4, **_MOE)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(intermediate_size=32, num_local_experts=4,
                                                          num_experts_per_tok=2, sliding_window=32)),
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM", dict(
        intermediate_size=128, num_experts=4, shared_expert_intermediate_size=32, linear_num_value_heads=4,
        linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16, full_attention_interval=2,
        **_MOE)),
}
