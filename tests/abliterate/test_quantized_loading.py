"""A stage-1 NVFP4 checkpoint (ModelOpt export) loads dequantized, and LoRA edits it like bf16 - fused experts included."""

import copy

import pytest
import torch
from test_edits import PARAMETERS
from tiny_chat import HARMFUL, HARMLESS
from transformers import Qwen3MoeForCausalLM

from abliterate.architectures import discover
from abliterate.edits.delta import abliteration_delta
from abliterate.edits.lora import LoraAbliterator
from abliterate.edits.plan import edit_directions, plan_edits
from abliterate.loading import load_model
from testbed.tokenizer import train_tokenizer
from tests.tiny_models import qwen3_moe_config


@pytest.fixture(scope="module")
def nvfp4_moe_checkpoint(tmp_path_factory):
    mtq = pytest.importorskip("modelopt.torch.quantization")
    from modelopt.torch.export import export_hf_checkpoint

    tokenizer = train_tokenizer(HARMFUL + HARMLESS, vocab_size=300)
    config = qwen3_moe_config(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(config).to(torch.bfloat16).eval()
    ids = torch.randint(0, len(tokenizer), (4, 16), generator=torch.Generator().manual_seed(0))
    mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, lambda m: [m(row[None]) for row in ids])
    directory = tmp_path_factory.mktemp("nvfp4_moe")
    export_hf_checkpoint(model, export_dir=str(directory))
    tokenizer.save_pretrained(directory)
    return directory


def test_nvfp4_checkpoint_loads_dequantized_and_edits_every_expert(nvfp4_moe_checkpoint):
    seed_spelling = load_model(str(nvfp4_moe_checkpoint), dtypes=["fp8"], device_map=None)  # the seed's --dtypes fp8
    assert "nvfp4" in seed_spelling.source_format
    assert seed_spelling.model.model.layers[0].mlp.experts.down_proj.dtype == torch.bfloat16
    # fp32 dequantized weights, so the comparison below is not lost in bf16 rounding.
    model = load_model(str(nvfp4_moe_checkpoint), dtypes=["float32"], device_map=None).model
    architecture = discover(model)
    fused = [c for c in architecture.components if c.num_experts is not None]
    assert len(fused) == 2 and all(c.num_experts == 4 for c in fused)
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 200, (2, 6), generator=torch.Generator().manual_seed(1))
    directions = torch.nn.functional.normalize(torch.randn(architecture.num_layers + 1, 64), dim=-1)
    with torch.no_grad():
        base = model(ids).logits
        abliterator = LoraAbliterator(model, architecture.components, method="rank1")
        abliterator.apply(PARAMETERS, directions)
        edited = model(ids).logits
        vectors = edit_directions(PARAMETERS, directions)
        for edit in plan_edits(PARAMETERS, architecture.components):
            weight = getattr(reference.get_submodule(edit.component.module_name), edit.component.parameter_name)
            merged = weight.float() + abliteration_delta(weight, vectors[edit.direction_key], edit.strength,
                                                         transposed=edit.component.transposed)
            weight.copy_(merged.to(weight.dtype))
        explicit = reference(ids).logits
        assert (edited - base).abs().max() > 1e-2
        torch.testing.assert_close(edited, explicit, atol=2e-5, rtol=1e-4)
        abliterator.reset()
        assert torch.equal(model(ids).logits, base)
