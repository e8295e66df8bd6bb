"""Each CPU-capable --quantization loads a real checkpoint through load_model, takes the LoRA edit, and resets.

Tolerance: the edit's effect on the logits (edited - unedited) in the
quantized model must match the bf16 model's within a relative L2 error of 0.2
for 8-bit formats and 0.4 for 4-bit formats (measured here: 0.09-0.11 and
0.19-0.24), and editing must not add error beyond the quantization's own:
max |edited_q - edited_bf16| <= 1.5 x max |unedited_q - unedited_bf16| + 0.01.
A missing or wrong edit gives a relative error near 1.
"""

import importlib.util

import pytest
import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from abliterate.architectures import discover
from abliterate.edits.kernel import KernelParameters
from abliterate.edits.lora import LoraAbliterator
from abliterate.edits.plan import AbliterationParameters
from abliterate.loading import load_model
from abliterate.quantization.lora_support import dequantized_weight
from abliterate.quantization.options import QuantizationRequest
from checkpoint_formats.modules import NVFP4Linear

pytest.importorskip("torchao.quantization")

PARAMETERS = AbliterationParameters(
    "per_layer", None,
    {"attn": KernelParameters(1.5, 1.0, 1.0, 2.0), "mlp": KernelParameters(1.5, 1.0, 1.0, 2.0)},
)
IDS = torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(1))
BNB = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed (gpu extra)")

# option -> (weight class of a quantized Linear, LoRA wrapper class name, relative tolerance of the edit's effect)
CASES = {
    "torchao_int8_weight_only": ("Int8Tensor", "TorchaoLoraLinear", 0.2),
    "torchao_int8_dynamic": ("Int8Tensor", "TorchaoLoraLinear", 0.2),
    "torchao_float8_weight_only": ("Float8Tensor", "TorchaoLoraLinear", 0.2),
    "torchao_int4_weight_only": ("IntxUnpackedToInt8Tensor", "TorchaoLoraLinear", 0.4),  # the CPU layout
    "nvfp4": ("Tensor", "PackedLoraLinear", 0.4),  # NVFP4Linear's packed uint8 buffer, in PEFT's lora.Linear subclass
    "bnb_4bit": ("Params4bit", "Linear4bit", 0.4),
}


def _directions(model) -> torch.Tensor:
    generator = torch.Generator().manual_seed(2)
    return nn.functional.normalize(torch.randn(discover(model).num_layers + 1, 64, generator=generator), dim=-1)


@torch.no_grad()
def _edit_and_reset(model) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, LoraAbliterator]:
    """(unedited, edited, after reset) logits in fp32."""
    architecture = discover(model)
    base = model(IDS).logits.float()
    abliterator = LoraAbliterator(model, architecture.components, method="rank1")
    assert abliterator.apply(PARAMETERS, _directions(model)) == 4 and not abliterator.skipped
    edited = model(IDS).logits.float()
    abliterator.reset()
    return base, edited, model(IDS).logits.float(), abliterator


@pytest.fixture(scope="module")
def bf16_logits(tiny_llama_dir):
    model = load_model(str(tiny_llama_dir), dtypes=["bfloat16"], device_map="cpu").model
    base, edited, _, _ = _edit_and_reset(model)
    assert (edited - base).abs().max() > 0.02  # the edit is large enough to compare against
    return base, edited


@pytest.mark.parametrize("option", [pytest.param(o, marks=BNB) if o == "bnb_4bit" else o for o in CASES])
def test_edited_quantized_model_follows_edited_bf16(tiny_llama_dir, bf16_logits, option):
    weight_class, wrapper_class, tolerance = CASES[option]
    loaded = load_model(str(tiny_llama_dir), dtypes=["auto"], device_map="cpu",
                        quantization=QuantizationRequest(option, group_size=32))
    model = loaded.model
    assert option in loaded.source_format
    o_proj = model.model.layers[0].self_attn.o_proj
    assert type(o_proj.weight).__name__ == weight_class
    assert next(p for p in model.parameters() if p.is_floating_point()).dtype == torch.bfloat16  # auto -> bf16
    if option == "nvfp4":
        assert isinstance(o_proj, NVFP4Linear) and type(model.lm_head) is nn.Linear  # output embeddings stay bf16

    base, edited, after_reset, abliterator = _edit_and_reset(model)
    wrapped = model.model.layers[0].self_attn.o_proj
    assert type(wrapped).__name__ == wrapper_class
    if option == "nvfp4":
        assert isinstance(wrapped, LoraLinear) and isinstance(wrapped.get_base_layer(), NVFP4Linear)
    assert torch.equal(after_reset, base)  # reset gives the quantized model back exactly

    bf16_base, bf16_edited = bf16_logits
    effect_error = ((edited - base) - (bf16_edited - bf16_base)).norm() / (bf16_edited - bf16_base).norm()
    assert effect_error < tolerance, f"edit effect differs by {effect_error:.3f}"
    quantization_error = (base - bf16_base).abs().max()
    assert (edited - bf16_edited).abs().max() <= 1.5 * quantization_error + 0.01


def test_dequantized_weight_is_what_the_quantized_layer_computes(tiny_llama_dir):
    model = load_model(str(tiny_llama_dir), dtypes=["bfloat16"], device_map="cpu",
                       quantization=QuantizationRequest("torchao_int8_weight_only")).model
    layer = model.model.layers[1].mlp.down_proj
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    with torch.no_grad():
        expected = nn.functional.linear(x.float(), dequantized_weight(layer).float())
        assert torch.allclose(layer(x).float(), expected, atol=0.02, rtol=0.02)


def test_torchao_overrides_and_embeddings(tiny_llama_dir):
    request = QuantizationRequest("torchao_int8_weight_only", 32, True,
                                  ((r"model\.layers\.0\..*", "none"), (r".*down_proj", "torchao_int4_weight_only")))
    model = load_model(str(tiny_llama_dir), dtypes=["bfloat16"], device_map="cpu", quantization=request).model
    kinds = {name: type(module.weight).__name__ for name, module in model.named_modules()
             if isinstance(module, (nn.Linear, nn.Embedding))}
    assert kinds["model.layers.0.self_attn.q_proj"] == "Parameter" and kinds["model.layers.0.mlp.down_proj"] == "Parameter"
    assert kinds["model.layers.1.self_attn.q_proj"] == "Int8Tensor"
    assert kinds["model.layers.1.mlp.down_proj"] == "IntxUnpackedToInt8Tensor"
    assert kinds["model.embed_tokens"] == "Int8Tensor"  # torchao_include_embedding
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()


def test_nvfp4_override_keeps_modules_bf16_and_packs_the_rest_small(tiny_llama_dir):
    request = QuantizationRequest("nvfp4", overrides=((r"model\.layers\.1\.mlp\..*", "none"),))
    model = load_model(str(tiny_llama_dir), dtypes=["bfloat16"], device_map="cpu", quantization=request).model
    packed = [m for m in model.modules() if isinstance(m, NVFP4Linear)]
    assert len(packed) == 4 + 3 + 4  # layer 0: q k v o + gate up down; layer 1: q k v o
    assert type(model.model.layers[1].mlp.down_proj) is nn.Linear
    layer = model.model.layers[0].mlp.down_proj
    stored = sum(t.numel() * t.element_size() for t in (layer.weight, layer.weight_scale, layer.weight_scale_2))
    assert stored / (layer.in_features * layer.out_features * 2) < 0.29  # 4.5 bits per weight vs bf16's 16


def test_quantized_mamba_out_proj_is_skipped_by_name_not_broken():
    """Mamba out_proj is edited through a weight parametrization, which a quantized weight cannot take."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    from tests.tiny_models import nemotron_h_hybrid

    model = nemotron_h_hybrid().to(torch.bfloat16)
    quantize_(model, Int8WeightOnlyConfig())
    abliterator = LoraAbliterator(model, discover(model).components, method="rank1")
    assert [(s.component.parameter_path, s.reason.split(" (")[0]) for s in abliterator.skipped] == [
        ("model.layers.0.mixer.out_proj.weight", "quantized weight-level component")]
    assert len(abliterator.components) == 4  # attention o_proj, MLP and MoE down-projections still edited


def test_packed_lora_side_path_is_peft_lora_in_one_multiply_add():
    """``PackedLoraLinear``'s fused side path gives PEFT's own forward, and yields to it where it cannot serve."""
    from peft import LoraConfig, inject_adapter_in_model

    from abliterate.quantization.lora_support import PackedLoraLinear, register_quantized_lora_layers
    from checkpoint_formats import nvfp4

    generator = torch.Generator().manual_seed(4)
    quantized = nvfp4.quantize_weight(torch.randn(48, 64, generator=generator))
    packed = NVFP4Linear(64, 48, dtype=torch.float32)
    packed.weight, packed.weight_scale, packed.weight_scale_2 = (quantized.packed, quantized.weight_scale,
                                                                 quantized.weight_scale_2)
    holder = nn.ModuleDict({"proj": packed})
    holder.hf_device_map = {"": torch.device("cpu")}
    config = register_quantized_lora_layers(LoraConfig(r=2, lora_alpha=4, target_modules=["proj"]))
    inject_adapter_in_model(config, holder, adapter_name="edit")
    layer = holder["proj"]
    assert isinstance(layer, PackedLoraLinear)
    with torch.no_grad():
        layer.lora_B["edit"].weight.normal_(generator=generator)
        x = torch.randn(3, 5, 64, generator=generator)
        fused = layer(x)
        expected = LoraLinear.forward(layer, x)  # PEFT's four-kernel side path
        assert layer.scaling["edit"] == 2.0 and fused.shape == (3, 5, 48)
        torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)
        assert (fused - layer.base_layer(x)).abs().max() > 0.1  # the side path is in it
        layer.lora_dropout["edit"] = nn.Dropout(0.5)  # training-time dropout: PEFT's forward, not the fused one
        assert layer._plain_adapter((), {}) is None
