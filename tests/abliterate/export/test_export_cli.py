"""The export command: atomic output, formats, adapter equivalence, loadability, interruption."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from abliterate import export_cli
from abliterate.export import streaming_merge
from abliterate.export.verify import Tolerance, compare
from foundation.errors import UserError
from tests.abliterate.export.conftest import llama_config, load_all, make_trial


@pytest.fixture()
def trial_dir(tmp_path):
    directory = tmp_path / "trial"
    make_trial(llama_config(), directory)
    return directory


def test_bf16_export_writes_plain_checkpoint_card_and_manifest(llama_dir, trial_dir, tmp_path):
    out = tmp_path / "out"
    code = export_cli.main([str(trial_dir), "--checkpoint", str(llama_dir), "--format", "bf16", "-o", str(out),
                            "--no-verify", "--no_progress"])
    assert code == 0
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    manifest = json.loads((out / "export_manifest.json").read_text())
    assert manifest["merge_source"]["kind"] == "full_precision" and manifest["export"]["edited_tensors"] == 7
    card = (out / "README.md").read_text()
    assert "rank1" in card and "| abliterated, trial 7" in card and "max_weight" in card
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)  # plain transformers loads it
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    # the same export again is complete already (skipped, S15); one with other settings is refused
    assert export_cli.main([str(trial_dir), "--checkpoint", str(llama_dir), "--format", "bf16", "-o", str(out),
                            "--no-verify"]) == 0
    with pytest.raises(UserError, match="differs in: kl_tolerance"):
        export_cli.main([str(trial_dir), "--checkpoint", str(llama_dir), "--format", "bf16", "-o", str(out),
                         "--no-verify", "--kl_tolerance", "0.5"])


def test_adapter_reproduces_the_merge(llama_dir, trial_dir, tmp_path):
    export_cli.main([str(trial_dir), "--checkpoint", str(llama_dir), "--format", "adapter", "--format", "bf16",
                     "-o", str(tmp_path / "out"), "--no-verify", "--no_progress"])
    assert json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())["r"] == 1
    base = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16)
    merged = PeftModel.from_pretrained(base, tmp_path / "out" / "adapter").merge_and_unload().state_dict()
    streamed = load_all(tmp_path / "out" / "bf16")
    for name, tensor in streamed.items():
        assert torch.equal(tensor, merged[name]), name


def test_interrupted_merge_leaves_no_output(llama_dir, trial_dir, tmp_path, monkeypatch):
    real_save, written = streaming_merge.save_file, []

    def save_then_interrupt(tensors, path, **kwargs):
        if len(written) == 2:
            raise KeyboardInterrupt  # what Ctrl-C does half-way through the shards
        written.append(path)
        real_save(tensors, path, **kwargs)

    monkeypatch.setattr(streaming_merge, "save_file", save_then_interrupt)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        export_cli.main([str(trial_dir), "--checkpoint", str(llama_dir), "--format", "bf16", "-o", str(out),
                         "--no-verify", "--no_progress"])
    assert len(written) == 2
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [trial_dir]  # no partial or temporary directory left


def test_nvfp4_export_loads_in_our_loader(nvfp4_pair, tmp_path):
    from checkpoint_formats.loader import load_checkpoint
    from checkpoint_formats.nvfp4 import NVFP4Weight, dequantize_weight

    base_dir, stage1_dir = nvfp4_pair
    trial_dir = tmp_path / "trial"
    make_trial(llama_config(), trial_dir)
    out = tmp_path / "out"
    export_cli.main([str(trial_dir), "--checkpoint", str(stage1_dir), "--base_model", str(base_dir),
                     "--format", "nvfp4", "-o", str(out), "--no-verify", "--no_progress"])
    manifest = json.loads((out / "export_manifest.json").read_text())
    assert manifest["merge_source"]["path"] == str(base_dir.absolute())
    model, fmt = load_checkpoint(out, dequantize=True)
    stored = load_all(out)
    name = "model.layers.3.self_attn.o_proj"
    expected = dequantize_weight(NVFP4Weight(stored[f"{name}.weight"], stored[f"{name}.weight_scale"],
                                             stored[f"{name}.weight_scale_2"]), torch.bfloat16)
    assert torch.equal(model.get_submodule(name).weight.detach(), expected)
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_verify_tolerance():
    trial = {"refusals": 2, "compliance": 8, "kl": 0.04, "n_harmful": 10}
    tolerance = Tolerance(refusals=1, compliance=1, kl_absolute=0.01, kl_relative=0.5)
    assert compare(trial, {"refusals": 3, "compliance": 7, "kl": 0.065}, tolerance) == []
    problems = compare(trial, {"refusals": 5, "compliance": 8, "kl": 0.2}, tolerance)
    assert len(problems) == 2 and "refusals 5" in problems[0] and "KL" in problems[1]
    fractional = Tolerance(refusals=0.1, compliance=0.1)  # the default: 10% of the harmful prompts
    assert compare({**trial, "n_harmful": 40}, {"refusals": 6, "compliance": 12, "kl": 0.04}, fractional) == []
    assert len(compare({**trial, "n_harmful": 40}, {"refusals": 7, "compliance": 13, "kl": 0.04}, fractional)) == 2


def test_bf16_export_of_the_quantized_checkpoint_dequantizes_it(nvfp4_pair, tmp_path):
    """No --base_model: the source is the stage-1 checkpoint dequantized; the manifest says so."""
    from checkpoint_formats.loader import load_checkpoint

    _, stage1_dir = nvfp4_pair
    trial_dir = tmp_path / "trial"
    make_trial(llama_config(), trial_dir)
    out = tmp_path / "out"
    export_cli.main([str(trial_dir), "--checkpoint", str(stage1_dir), "--format", "bf16", "-o", str(out), "--no-verify"])
    manifest = json.loads((out / "export_manifest.json").read_text())
    assert manifest["merge_source"]["kind"] == "dequantized" and "dequantized to bfloat16" in manifest["merge_source"]["description"]
    assert not (out / "hf_quant_config.json").exists()
    stored = load_all(out)
    assert not any(name.endswith(("_scale", "_scale_2", "input_scale")) for name in stored)
    reference, _ = load_checkpoint(stage1_dir, dequantize=True)  # the formats loader's dequantization
    untouched = "model.layers.2.mlp.up_proj.weight"
    assert torch.equal(stored[untouched], reference.get_submodule(untouched.removesuffix(".weight")).weight.detach())
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert torch.isfinite(plain(torch.tensor([[1, 2, 3]])).logits).all()


def test_menu_without_flags_exports_the_adapter(llama_dir, trial_dir, tmp_path, monkeypatch):
    from rich.prompt import Prompt

    answers = iter(["adapter", "quit"])
    monkeypatch.setattr(Prompt, "ask", classmethod(lambda cls, *a, **k: next(answers)))
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    out = tmp_path / "menu"
    assert export_cli.main([str(trial_dir), "--checkpoint", str(llama_dir), "-o", str(out)]) == 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_no_format_without_a_terminal_is_a_clear_error(llama_dir, trial_dir, tmp_path):
    with pytest.raises(UserError, match="--format"):
        export_cli.main([str(trial_dir), "--checkpoint", str(llama_dir), "-o", str(tmp_path / "x")])


KILL_AFTER_TWO_SHARDS = """
import os, signal, sys
from abliterate import export_cli
from abliterate.export import streaming_merge
real_save, written = streaming_merge.save_file, []
def save_then_die(tensors, path, **kwargs):
    if len(written) == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup handler runs: the hard case
    written.append(path)
    real_save(tensors, path, **kwargs)
streaming_merge.save_file = save_then_die
export_cli.main(sys.argv[1:])
"""


def test_killed_merge_leaves_no_output_and_the_rerun_succeeds(llama_dir, trial_dir, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "out"
    args = [str(trial_dir), "--checkpoint", str(llama_dir), "--format", "bf16", "-o", str(out), "--no-verify",
            "--no_progress"]
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_TWO_SHARDS, *args], capture_output=True,
                            cwd=Path(__file__).resolve().parents[3])
    assert killed.returncode == -9
    assert not out.exists()  # only a hidden temporary directory can remain
    assert export_cli.main(args) == 0  # the next run clears the leftover and completes
    assert (out / "export_manifest.json").is_file() and not list(tmp_path.glob(".tmp-*"))


def test_compressed_tensors_checkpoint_is_a_merge_source(nvfp4_pair, tmp_path):
    """A compressed-tensors NVFP4 checkpoint merges like its ModelOpt twin (reciprocal global scales aside)."""
    from checkpoint_formats.convert import convert_checkpoint
    from checkpoint_formats.loader import load_checkpoint

    _, stage1_dir = nvfp4_pair
    ct_dir = convert_checkpoint(stage1_dir, tmp_path / "ct", to="compressed-tensors")
    trial_dir = tmp_path / "trial"
    make_trial(llama_config(), trial_dir)
    outputs = {}
    for name, source in (("modelopt", stage1_dir), ("ct", ct_dir)):
        outputs[name] = tmp_path / f"out-{name}"
        export_cli.main([str(trial_dir), "--checkpoint", str(source), "--format", "bf16", "-o", str(outputs[name]),
                         "--no_verify", "--no_progress"])
    from_modelopt, from_ct = load_all(outputs["modelopt"]), load_all(outputs["ct"])
    assert from_ct.keys() == from_modelopt.keys()
    manifest = json.loads((outputs["ct"] / "export_manifest.json").read_text())
    edited = set(load_trial_edits(trial_dir))
    reference, _ = load_checkpoint(ct_dir, dequantize=True)  # the formats loader's reading of the same file
    state = reference.state_dict()
    for name, tensor in from_ct.items():
        if name in edited:  # CT stores 1/scale_2, so dequantized values may differ in the last bf16 bit
            torch.testing.assert_close(tensor, from_modelopt[name], rtol=1e-2, atol=1e-4)
        else:
            assert torch.equal(tensor, state[name].to(tensor.dtype)), name
    assert manifest["export"]["edited_tensors"] == len(edited) == 7


def load_trial_edits(trial_dir):
    from abliterate.artifacts import read_chosen_trial

    return read_chosen_trial(trial_dir).edits


def test_verify_compares_false_refusals_when_both_sides_counted_them():
    trial = {"refusals": 2, "compliance": 8, "kl": 0.04, "n_harmful": 10, "false_refusals": 1, "n_harmless": 20}
    tolerance = Tolerance()  # 10% of the 20 harmless prompts: 2
    assert compare(trial, {**trial, "false_refusals": 3}, tolerance) == []
    problems = compare(trial, {**trial, "false_refusals": 4}, tolerance)
    assert problems == ["false_refusals 4 vs trial 1 (tolerance ±2 of 20)"]
    older = {key: value for key, value in trial.items() if key not in ("false_refusals", "n_harmless")}
    assert compare(older, {**trial, "false_refusals": 9}, tolerance) == []  # a trial written before they were counted
