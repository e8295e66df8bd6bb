"""Every model family users abliterate, through the whole job: NVFP4 stage 1 -> stage 2 -> NVFP4 export -> reload.

Each family is a tiny random model (``tiny_models.family_config``) quantized by
ModelOpt 0.47 on the CPU, searched with 2 trials by the stage-2 CLI, merged
and re-quantized by the export CLI, then read back by our loader. What can
break per family is naming and layout (fused experts, Mixtral's
``block_sparse_moe``, MLA, linear attention), so the checks are about names:
every component discovery finds is edited, every edit lands on a tensor that
changed, every other tensor is byte-identical, and the export keeps the
checkpoint's own names. A family we cannot support is refused before work.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from tiny_chat import HARMFUL, HARMLESS, write_prompts
from transformers import AutoModelForCausalLM

from abliterate import cli as abliterate_cli
from abliterate import export_cli
from abliterate.architectures import discover
from abliterate.artifacts import read_chosen_trial
from abliterate.edits.plan import plan_edits
from checkpoint_formats.loader import load_checkpoint
from foundation.errors import UserError
from testbed.tokenizer import train_tokenizer
from tests.tiny_models import family_config

SUPPORTED = ["llama", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "qwen2_moe", "qwen3_moe", "mixtral", "phimoe",
             "deepseek_v3", "qwen3_next"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    mtq = pytest.importorskip("modelopt.torch.quantization")  # one ModelOpt import for the module
    root = tmp_path_factory.mktemp("families")
    tokenizer = train_tokenizer(HARMFUL + HARMLESS + ["Sure, here is how. Sorry, I cannot help."] * 4, vocab_size=300)
    return mtq, tokenizer, write_prompts(root / "prompts"), root


def _base_model(family: str, tokenizer, directory):
    config = family_config(family, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    # quantize a reloaded copy: ModelOpt's export fails on a model save_pretrained has written ("device 'bfloat16'")
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).eval()


def _stage1(mtq, model, tokenizer, directory) -> None:
    from modelopt.torch.export import export_hf_checkpoint

    ids = torch.randint(0, len(tokenizer), (4, 16), generator=torch.Generator().manual_seed(0))
    mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, lambda m: [m(row[None]) for row in ids])
    export_hf_checkpoint(model, export_dir=str(directory))
    tokenizer.save_pretrained(directory)


def _stored(directory) -> dict[str, torch.Tensor]:
    with safe_open(str(directory / "model.safetensors"), "pt") as tensors:
        return {name: tensors.get_tensor(name) for name in tensors.keys()}


@pytest.fixture(scope="module", params=SUPPORTED)
def family_run(request, workspace):
    mtq, tokenizer, spec, root = workspace
    family = request.param
    base, stage1, trial, out = (root / family / part for part in ("base", "stage1", "trial", "nvfp4"))
    _stage1(mtq, _base_model(family, tokenizer, base), tokenizer, stage1)
    assert abliterate_cli.main([
        "--model", str(stage1), "--prompts", str(spec), "--out", str(trial), "--n_trials", "2",
        "--n_startup_trials", "2", "--max_response_length", "3", "--kl_tokens", "2", "--dtypes", "float32",
        "--device_map", "cpu", "--batch_size", "4", "--method", "rank1"]) == 0
    assert export_cli.main([str(trial), "--checkpoint", str(stage1), "--base_model", str(base), "--format", "nvfp4",
                            "-o", str(out), "--no-verify", "--no_progress"]) == 0
    return family, stage1, read_chosen_trial(trial), out


def test_every_component_is_edited_and_the_export_reloads(family_run):
    family, stage1, chosen, out = family_run
    searched = discover(load_checkpoint(stage1, dequantize=True, dtype=torch.float32)[0]).components
    reloaded, fmt = load_checkpoint(out, dequantize=True, dtype=torch.float32)
    assert "nvfp4" in fmt.describe().lower()
    assert [c.parameter_path for c in discover(reloaded).components] == [c.parameter_path for c in searched]
    # The trial edits exactly the components its kernels give a strength, and those are all the components.
    planned = {edit.component.parameter_path for edit in plan_edits(chosen.parameters, searched)}
    assert set(chosen.edits) == planned
    assert {c.group for c in searched} == {edit.group for edit in chosen.edits.values()} == {"attn", "mlp"}
    ids = torch.randint(0, 200, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(reloaded(ids).logits).all()
    packed, _ = load_checkpoint(out, dequantize=False)  # fused experts stay packed
    assert sum(p.numel() for p in packed.parameters()) < sum(p.numel() for p in reloaded.parameters())


def test_export_keeps_stage1_names_and_bytes_except_the_edit(family_run):
    family, stage1, chosen, out = family_run
    before, after = _stored(stage1), _stored(out)
    assert set(after) == set(before), "the export writes the checkpoint's own names"
    changed = {name for name in before if not torch.equal(before[name].view(torch.uint8) if before[name].dim() else
                                                          before[name], after[name].view(torch.uint8)
                                                          if after[name].dim() else after[name])}
    assert changed and all(name.rsplit(".", 1)[0].endswith(("o_proj", "down_proj", "w2", "out_proj", "dense"))
                           or ".experts." in name for name in changed), sorted(changed)[:5]
    if family in {"mixtral", "phimoe"}:
        assert not any(".mlp." in name for name in after)
        assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in changed
        assert "model.layers.1.block_sparse_moe.experts.3.w1.weight" not in changed  # w1/w3 are read, not written
    # The router stays excluded under the name it is stored as (ModelOpt writes PhiMoE's as block_sparse_moe.router).
    excluded = json.loads((out / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"]
    ignored = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    assert sorted(excluded) == sorted(ignored)
    if family in {"mixtral", "phimoe"}:
        assert "model.layers.1.block_sparse_moe.gate" in excluded and not any("router" in e for e in excluded)


@pytest.fixture(scope="module")
def gpt_oss_export(workspace):
    mtq, tokenizer, _, root = workspace
    base, stage1 = root / "gpt_oss" / "base", root / "gpt_oss" / "stage1"
    _stage1(mtq, _base_model("gpt_oss", tokenizer, base), tokenizer, stage1)  # what a user may bring from elsewhere
    return base, stage1


def test_gpt_oss_is_refused_before_work_in_stage_1_and_stage_2(gpt_oss_export, workspace, tmp_path, monkeypatch):
    base, stage1 = gpt_oss_export
    _, _, spec, _ = workspace
    from quantize import stage as quantize_stage
    from quantize.cli import main as quantize_main

    def no_work(*args, **kwargs):
        raise AssertionError("stage 1 read the tokenizer before refusing the family")

    monkeypatch.setattr(quantize_stage, "load_tokenizer", no_work)
    mix = tmp_path / "mix.yaml"
    mix.write_text("datasets:\n  - name: general\n    path: corpus.jsonl\n    text_column: text\n")
    with pytest.raises(UserError, match="'gpt_oss' is not supported for NVFP4.*fused, transposed") as caught:
        quantize_main(["--input_model", str(base), "--output_model", str(tmp_path / "q"), "--dataset_yaml", str(mix)])
    assert caught.value.where == f"--input_model {base}"
    with pytest.raises(UserError, match="'gpt_oss' is not supported for NVFP4") as caught:
        abliterate_cli.main(["--model", str(stage1), "--prompts", str(spec), "--out", str(tmp_path / "t"),
                             "--n_trials", "2", "--dtypes", "float32", "--device_map", "cpu"])
    assert caught.value.where == str(stage1 / "config.json")
    assert json.loads((stage1 / "config.json").read_text())["model_type"] == "gpt_oss"
    assert not (tmp_path / "t").exists()
