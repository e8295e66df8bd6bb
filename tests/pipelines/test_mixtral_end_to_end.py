"""Mixtral through `quant-abliterate run`: ModelOpt NVFP4 -> search -> NVFP4 re-export -> reload.

Mixtral is the family whose checkpoint and transformers 5 module layout differ:
on disk ``block_sparse_moe.gate`` and per-expert ``experts.E.w1/w2/w3``, in the
model ``mlp.gate`` and fused ``experts.gate_up_proj`` / ``down_proj``. The
chain must load the one into the other, edit the fused experts, and write the
edit back in the checkpoint's own names (``w2`` rewritten, ``w1``/``w3`` not),
each export passing our servability check.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from pipelines import cli
from tests.abliterate.tiny_chat import HARMFUL, HARMLESS, write_prompts
from tests.tiny_models import family_config

pytest.importorskip("modelopt.torch.quantization")


def write_tiny_mixtral(directory):
    from transformers import AutoModelForCausalLM

    from testbed.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(HARMFUL + HARMLESS + ["Sure, here is how. Sorry, I cannot help."] * 4, vocab_size=300)
    config = family_config("mixtral", vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixtral_e2e")
    model = write_tiny_mixtral(root / "model")
    spec = write_prompts(root / "prompts")
    pipeline = root / "mixtral.yaml"
    pipeline.write_text(
        f"name: mixtral-tiny\nmodel: {model}\noutput_dir: {root / 'run'}\n"
        "stages:\n"
        "  - quantize:\n      format: nvfp4\n      max_samples: 16\n      batch_size: 4\n      device: cpu\n"
        f"  - abliterate:\n      device_map: cpu\n      prompts: {spec}\n      n_trials: 2\n      n_startup_trials: 2\n"
        "      max_response_length: 4\n      seed: 3\n"
        "  - export:\n      formats: [nvfp4]\n      verify: true\n"
    )
    assert cli.main(["run", str(pipeline)]) == 0
    return root / "run"


def _names(checkpoint) -> list[str]:
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as tensors:
        return list(tensors.keys())


def test_stage1_writes_a_servable_checkpoint_in_mixtrals_own_names(run_dir):
    from checkpoint_formats.servability import check_servable

    checkpoint = run_dir / "quantize" / "checkpoint"
    assert check_servable(checkpoint) == []
    names = _names(checkpoint)
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight_scale_2" in names
    assert not any(".mlp." in name for name in names)
    quant = json.loads((checkpoint / "hf_quant_config.json").read_text())["quantization"]
    assert {"lm_head", "model.layers.0.block_sparse_moe.gate"} <= set(quant["exclude_modules"])


def test_fused_experts_are_edited_and_the_export_rewrites_w2_in_checkpoint_names(run_dir):
    from abliterate.architectures import discover
    from checkpoint_formats.loader import load_checkpoint
    from checkpoint_formats.servability import check_servable

    exported = run_dir / "export" / "nvfp4"
    assert check_servable(exported) == []
    report = json.loads((exported / "export_manifest.json").read_text())
    assert report["verify"]["passed"] is True
    requantized = report["export"]["requantized_weights"]
    # The seeded search's chosen trial edits the experts of some layer: every expert's w2 is rewritten, w1/w3 never.
    assert any(".block_sparse_moe.experts." in name and name.endswith(".w2.weight") for name in requantized)
    assert not any(name.endswith((".w1.weight", ".w3.weight")) for name in requantized), requantized
    assert set(_names(exported)) == set(_names(run_dir / "quantize" / "checkpoint"))
    model, _ = load_checkpoint(exported)
    kinds = {component.module_name.split(".", 3)[-1] for component in discover(model).components}
    assert kinds == {"self_attn.o_proj", "mlp.experts"}
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(1, 9)[None]).logits).all()
