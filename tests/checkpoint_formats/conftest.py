"""Reference checkpoints made by ModelOpt itself (on CPU), once per test session.

Tiny models (hidden 64, 2 layers) keep each quantize + export around a second;
importing ModelOpt costs ~5-15 s once.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.tiny_models import llama_config, qwen3_moe_config

VOCAB = 128


def tiny_llama(tie_word_embeddings: bool = False):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(llama_config(vocab_size=VOCAB, tie_word_embeddings=tie_word_embeddings))


def tiny_qwen3_moe():
    """Qwen3-MoE: transformers 5.17 stores its experts as fused 3-D parameters."""
    from transformers import Qwen3MoeForCausalLM

    config = qwen3_moe_config(vocab_size=VOCAB)
    return Qwen3MoeForCausalLM(config)


def calibration_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (8, 16), generator=torch.Generator().manual_seed(0))


def quantize_and_export(model, config_name: str, export_dir) -> None:
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint

    ids = calibration_ids()

    def forward_loop(m):
        for row in ids:
            m(row[None])

    mtq.quantize(model, getattr(mtq, config_name), forward_loop)
    export_hf_checkpoint(model, export_dir=str(export_dir))


_BUILDERS = {
    "llama_nvfp4": (lambda: tiny_llama(), "NVFP4_DEFAULT_CFG"),
    "llama_w4a16_tied": (lambda: tiny_llama(tie_word_embeddings=True), "W4A16_NVFP4_CFG"),
    "llama_w4a8": (lambda: tiny_llama(), "W4A8_NVFP4_FP8_CFG"),
    "llama_fp8": (lambda: tiny_llama(), "FP8_DEFAULT_CFG"),
    "moe_nvfp4": (lambda: tiny_qwen3_moe(), "NVFP4_DEFAULT_CFG"),
}


@pytest.fixture(scope="session")
def modelopt_checkpoint(tmp_path_factory):
    """``modelopt_checkpoint(name) -> (export_dir, original_bf16_state_dict)``, cached per session."""
    cache: dict[str, tuple] = {}

    def make(name: str):
        if name not in cache:
            build, config_name = _BUILDERS[name]
            torch.manual_seed(0)
            model = build().to(torch.bfloat16).eval()
            original = {k: v.clone() for k, v in model.state_dict().items()}
            export_dir = tmp_path_factory.mktemp(name)
            quantize_and_export(model, config_name, export_dir)
            cache[name] = (export_dir, original)
        return cache[name]

    return make


# --- a reference loader for tests: ModelOpt's own dequantization, assembled by hand ---


def modelopt_dequantized_state_dict(path, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    files = sorted(path.glob("*.safetensors"))
    raw = {k: v for f in files for k, v in load_file(str(f)).items()}
    state = {}
    for name, tensor in raw.items():
        prefix, _, suffix = name.rpartition(".")
        if suffix != "weight":
            continue
        if tensor.dtype == torch.uint8:
            scale, scale_2 = raw[f"{prefix}.weight_scale"], raw[f"{prefix}.weight_scale_2"]
            block = tensor.shape[-1] * 2 // scale.shape[-1]
            shape = (*tensor.shape[:-1], tensor.shape[-1] * 2)
            state[name] = NVFP4QTensor(shape, dtype, tensor).dequantize(
                dtype=dtype, scale=scale, double_scale=scale_2, block_sizes={-1: block}
            )
        elif tensor.dtype == torch.float8_e4m3fn:
            state[name] = (tensor.to(torch.float32) * raw[f"{prefix}.weight_scale"]).to(dtype)
        else:
            state[name] = tensor.to(dtype)
    return state


def fuse_experts(state: dict[str, torch.Tensor], num_experts: int) -> dict[str, torch.Tensor]:
    """Per-expert gate/up/down (ModelOpt's export) -> transformers 5 fused 3-D parameters."""
    fused = dict(state)
    prefixes = {n.rsplit(".experts.", 1)[0] for n in state if ".experts.0.gate_proj.weight" in n}
    for prefix in prefixes:
        gate_up, down = [], []
        for e in range(num_experts):
            base = f"{prefix}.experts.{e}"
            gate_up.append(torch.cat([fused.pop(f"{base}.gate_proj.weight"), fused.pop(f"{base}.up_proj.weight")]))
            down.append(fused.pop(f"{base}.down_proj.weight"))
        fused[f"{prefix}.experts.gate_up_proj"] = torch.stack(gate_up)
        fused[f"{prefix}.experts.down_proj"] = torch.stack(down)
    return fused


def build_reference_model(path, dtype=torch.bfloat16):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = fuse_experts(modelopt_dequantized_state_dict(path, dtype), getattr(config, "num_experts", 0) or 0)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= {"lm_head.weight"}, missing  # tied embeddings
    model.tie_weights()
    return model.eval()


@pytest.fixture(scope="session")
def reference_model():
    """``reference_model(path)``: the checkpoint dequantized by ModelOpt's NVFP4QTensor, in a plain model."""
    return build_reference_model


@pytest.fixture(scope="session")
def make_tiny_llama():
    return tiny_llama
