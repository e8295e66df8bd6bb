"""NemotronH through `quant-abliterate run`: ModelOpt NVFP4 (exclusions repaired) -> search -> NVFP4 re-export -> reload.

The tiny hybrid has one of each editable kind: a Mamba out_proj, an attention
o_proj, a dense MLP down_proj, MoE experts (stored per expert on disk, fused in
transformers) and a shared expert. The checkpoint keeps NemotronH's own
``backbone.*`` names from stage 1 to the re-export, and each export passes our
servability check.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open

from pipelines import runner
from tests.abliterate.tiny_chat import HARMFUL, HARMLESS, write_prompts

pytest.importorskip("modelopt.torch.quantization")


def write_tiny_nemotron(directory):
    from transformers import NemotronHConfig, NemotronHForCausalLM

    from testbed.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(HARMFUL + HARMLESS + ["Sure, here is how. Sorry, I cannot help."] * 4, vocab_size=300)
    config = NemotronHConfig(vocab_size=len(tokenizer), hidden_size=64, layers_block_type=["mamba", "attention", "mlp", "moe"] * 2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
                             mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=16, n_groups=1, n_routed_experts=4,
                             num_experts_per_tok=2, moe_intermediate_size=32, moe_shared_expert_intermediate_size=32,
                             n_group=1, topk_group=1, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                             architectures=["NemotronHForCausalLM"])
    torch.manual_seed(0)
    NemotronHForCausalLM(config).to(torch.bfloat16).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("nemotron_e2e")
    model = write_tiny_nemotron(root / "model")
    spec = write_prompts(root / "prompts")
    pipeline = root / "nemotron.yaml"
    pipeline.write_text(
        f"name: nemotron-h-tiny\nmodel: {model}\noutput_dir: {root / 'run'}\n"
        "stages:\n"
        "  - quantize:\n      format: nvfp4\n      max_samples: 16\n      batch_size: 4\n      device: cpu\n"
        f"  - abliterate:\n      device_map: cpu\n      prompts: {spec}\n      n_trials: 2\n      n_startup_trials: 2\n"
        "      max_response_length: 8\n      seed: 3\n"
        "  - export:\n      formats: [nvfp4]\n      verify: true\n"
    )
    assert runner.main([str(pipeline)]) == 0
    return root / "run"


def test_stage1_writes_servable_backbone_checkpoint(run_dir):
    from checkpoint_formats.servability import check_servable

    checkpoint = run_dir / "quantize" / "checkpoint"
    quant = json.loads((checkpoint / "hf_quant_config.json").read_text())["quantization"]
    assert "lm_head" in quant["exclude_modules"] and not any("\x00" in e for e in quant["exclude_modules"])
    assert check_servable(checkpoint) == []
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as tensors:
        assert "backbone.layers.7.mixer.experts.0.up_proj.weight_scale_2" in tensors.keys()


def test_every_editable_component_is_found_and_export_rewrites_in_backbone_names(run_dir):
    from abliterate.architectures import discover
    from abliterate.artifacts import read_chosen_trial
    from checkpoint_formats.loader import load_checkpoint
    from checkpoint_formats.servability import check_servable

    exported = run_dir / "export" / "nvfp4"
    model, _ = load_checkpoint(exported)
    kinds = {component.module_name.split(".", 3)[-1] for component in discover(model).components}
    assert kinds == {"mixer.out_proj", "mixer.o_proj", "mixer.down_proj", "mixer.experts",
                     "mixer.shared_experts.down_proj"}
    assert check_servable(exported) == []
    report = json.loads((exported / "export_manifest.json").read_text())
    assert report["verify"]["passed"] is True
    trial = read_chosen_trial(run_dir / "abliterate" / "trial")
    requantized = report["export"]["requantized_weights"]
    assert requantized and all(name.startswith("backbone.") for name in requantized)
    # The seeded search's chosen trial reaches one layer of every kind (layers 4-7): each is rewritten on disk.
    rewritten = {re.sub(r"\.\d+\.", ".", re.sub(r"^backbone\.layers\.\d+\.", "", name)).removesuffix(".weight")
                 for name in requantized}
    assert {"mixer.out_proj", "mixer.o_proj", "mixer.down_proj", "mixer.experts.down_proj",
            "mixer.shared_experts.down_proj"} <= rewritten, sorted(requantized)
    assert len(requantized) >= len(trial.edits)
    with safe_open(str(exported / "model.safetensors"), "pt") as tensors:
        assert all(not name.startswith("model.") for name in tensors.keys())
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(1, 9)[None]).logits).all()
