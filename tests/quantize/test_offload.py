"""The offload path (decoder layers forced to disk) exports the same checkpoint as the in-memory path."""

from __future__ import annotations

import json

import pytest
import torch

from tests.quantize.conftest import load_tensors, quantize_args, run_cli
from tests.tiny_models import llama_config


@pytest.mark.parametrize("layerwise", [False, True], ids=["one_pass", "layerwise"])
def test_disk_offload_matches_in_memory(quantized, tiny_model_dir, mix_yaml, work_dir, layerwise):
    """Max calibration sees the same activations either way, so the bytes must agree."""
    output = work_dir / f"nvfp4_offloaded_{layerwise}"
    (work_dir / "offload").mkdir(exist_ok=True)
    (work_dir / "offload" / "unrelated.txt").write_text("a user's file beside the offload data")
    printed = run_cli(
        quantize_args(tiny_model_dir, mix_yaml, output, "--format", "nvfp4", "--skip_layers", "*layers.1.mlp.down_proj",
                      "--offload_folder", str(work_dir / "offload"), "--max_cpu_memory", "0", "--clean_offload",
                      *(["--layerwise"] if layerwise else [])),
        offload=True,
    )
    assert "planned placement" in printed
    manifest = json.loads((output / "quantize_manifest.json").read_text())
    assert manifest["placement"]["layers_per_device"] == {"disk": 2}
    assert manifest["placement"]["device_map"]["model.embed_tokens"] == "cpu"
    assert manifest["quantization"]["layerwise"] is layerwise
    if layerwise:
        assert "Layerwise calibration" in printed or "pass 2" in printed

    offloaded, in_memory = load_tensors(output), load_tensors(quantized["nvfp4"])
    assert offloaded.keys() == in_memory.keys()
    for name, tensor in in_memory.items():
        other = offloaded[name]
        assert other.dtype == tensor.dtype and other.shape == tensor.shape, name
        assert torch.equal(other.view(torch.uint8), tensor.view(torch.uint8)) if tensor.dtype == torch.float8_e4m3fn \
            else torch.equal(other, tensor), name
    for name in ("hf_quant_config.json", "config.json"):
        assert json.loads((output / name).read_text()) == json.loads((quantized["nvfp4"] / name).read_text())
    # --clean_offload removed our work folder, and only it.
    assert list((work_dir / "offload").iterdir()) == [work_dir / "offload" / "unrelated.txt"]


def test_placement_plan_fills_budgets_in_order(tiny_model_dir):
    from accelerate import init_empty_weights
    from accelerate.utils import compute_module_sizes
    from transformers import AutoConfig, AutoModelForCausalLM

    from quantize.offload import build_max_memory, plan_placement

    config = AutoConfig.from_pretrained(tiny_model_dir)
    with init_empty_weights():
        sizes = compute_module_sizes(AutoModelForCausalLM.from_config(config), dtype=torch.bfloat16)
    non_layer = sizes[""] - sizes["model.layers"]
    # Room on the CPU for the non-layer modules and about one decoder layer: the other goes to disk.
    budget = non_layer + int(sizes["model.layers.0"] * 1.5)
    plan = plan_placement(config, torch.bfloat16, build_max_memory([], budget), batch_size=2, max_seq_len=32)
    assert sum(plan.layers_per_device.values()) == 2
    assert plan.layer_devices["model.layers.1"] == "disk"
    assert plan.device_map["lm_head"] == "cpu"
    everything_on_cpu = plan_placement(config, torch.bfloat16, build_max_memory([], 2**34), batch_size=2, max_seq_len=32)
    assert everything_on_cpu.layers_per_device == {"cpu": 2}
    assert everything_on_cpu.total_weight_bytes == sizes[""]


def test_placement_plan_with_gpus_keeps_non_layer_modules_on_the_first_gpu():
    """Planning needs no GPU: two budgeted GPUs, then disk; embeddings and head stay on cuda:0."""
    import io

    from accelerate import init_empty_weights
    from accelerate.utils import compute_module_sizes
    from rich.console import Console
    from transformers import AutoModelForCausalLM

    from quantize.offload import build_max_memory, plan_placement, print_placement

    config = llama_config(vocab_size=1000, num_hidden_layers=6)
    with init_empty_weights():
        sizes = compute_module_sizes(AutoModelForCausalLM.from_config(config), dtype=torch.bfloat16)
    layer = sizes["model.layers.0"]
    non_layer = sizes[""] - sizes["model.layers"]
    plan = plan_placement(config, torch.bfloat16, build_max_memory([non_layer + int(2.5 * layer), int(2.5 * layer)], 0),
                          batch_size=1, max_seq_len=16)
    assert plan.layers_per_device == {"cuda:0": 2, "cuda:1": 2, "disk": 2}
    assert [plan.device_map[name] for name in ("model.embed_tokens", "model.norm", "lm_head")] == [0, 0, 0]
    assert plan.main_device == "cuda:0"
    console = Console(file=io.StringIO(), width=150)
    print_placement(console, plan)
    printed = console.file.getvalue()
    assert "cuda:1" in printed and "disk" in printed and "cpu" in printed
