"""The offload path (decoder layers forced to disk) exports the same checkpoint as the in-memory path."""

from __future__ import annotations

import json

import pytest
import torch

from foundation.errors import UserError
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

    from quantize.offload import build_max_memory, gpu_headroom, plan_placement, print_placement

    config = llama_config(vocab_size=1000, num_hidden_layers=6)
    with init_empty_weights():
        sizes = compute_module_sizes(AutoModelForCausalLM.from_config(config), dtype=torch.bfloat16)
    layer = sizes["model.layers.0"]
    non_layer = sizes[""] - sizes["model.layers"]
    plan = plan_placement(config, torch.bfloat16, build_max_memory([non_layer + int(2.5 * layer), int(2.5 * layer)], 0),
                          batch_size=1, max_seq_len=16)
    activations = plan.activation_bytes
    # The headroom comes out of each budget: cuda:0 streams the offloaded layers (two layers + activations kept
    # free), cuda:1 only runs its own (one layer + activations), so fewer layers fit than the raw budgets hold.
    assert plan.reserved_bytes == {"cuda:0": 2 * layer + activations, "cuda:1": layer + activations}
    assert plan.reserved_bytes["cuda:0"] == gpu_headroom(layer, activations, streams_layers=True)
    assert plan.layers_per_device == {"cuda:1": 1, "disk": 5}
    plan = plan_placement(config, torch.bfloat16, build_max_memory([non_layer + int(2.5 * layer) + 2 * layer + activations,
                                                                    int(2.5 * layer) + layer + activations], 0),
                          batch_size=1, max_seq_len=16)
    assert plan.layers_per_device == {"cuda:0": 2, "cuda:1": 2, "disk": 2}
    for device, count in plan.layers_per_device.items():  # placed weights + headroom never exceed a GPU's budget
        if device.startswith("cuda:"):
            index = int(device.split(":")[1])
            assert plan.bytes_per_device[device] + plan.reserved_bytes[device] <= plan.max_memory[index]
    assert [plan.device_map[name] for name in ("model.embed_tokens", "model.norm", "lm_head")] == [0, 0, 0]
    assert plan.main_device == "cuda:0"
    console = Console(file=io.StringIO(), width=150)
    print_placement(console, plan)
    printed = console.file.getvalue()
    assert "cuda:1" in printed and "disk" in printed and "cpu" in printed


def disk_weights_in_ram(model) -> list[str]:
    """Keys of accelerate's disk index that its loaders now also hold in memory (a writeback promoted them)."""
    from accelerate.utils.offload import PrefixedDataset

    promoted, seen = [], set()
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        for align_hook in getattr(hook, "hooks", [hook]):
            weights_map = getattr(align_hook, "weights_map", None)
            if isinstance(weights_map, PrefixedDataset) and id(weights_map.dataset) not in seen:
                seen.add(id(weights_map.dataset))
                loader = weights_map.dataset
                promoted += [key for key in (getattr(loader, "index", None) or {}) if key in loader.state_dict]
    return promoted


def test_max_calibration_keeps_disk_layers_on_disk(tiny_model_dir, mix_yaml, work_dir, monkeypatch):
    """ModelOpt 0.47's writeback copied every disk-offloaded weight into RAM during max calibration (18.8 GB of
    anonymous memory over --max_cpu_memory at 70B layer sizes, counting the CPU layers' copies): max only reads
    weights, so after calibration and export every disk weight is still only on disk."""
    from quantize.backends.modelopt import ModelOptBackend

    seen: dict[str, list[str]] = {}
    export = ModelOptBackend.export

    def inspecting_export(self, model, staging, settings):
        seen["after calibration"] = disk_weights_in_ram(model)
        result = export(self, model, staging, settings)
        seen["after export"] = disk_weights_in_ram(model)
        return result

    monkeypatch.setattr(ModelOptBackend, "export", inspecting_export)
    output = work_dir / "nvfp4_disk_stays_on_disk"
    run_cli(quantize_args(tiny_model_dir, mix_yaml, output, "--format", "nvfp4", "--offload_folder",
                          str(work_dir / "offload_stays"), "--max_cpu_memory", "0", "--clean_offload"), offload=True)
    assert seen == {"after calibration": [], "after export": []}
    placement = json.loads((output / "quantize_manifest.json").read_text())["placement"]
    assert placement["layers_per_device"] == {"disk": 2} and placement["cpu_writeback_bytes"] == 0
    # the writeback is ModelOpt's again once calibration is over
    from modelopt.torch.quantization.plugins import accelerate as plugin

    assert plugin._writeback_params_to_weights_map.__name__ == "_writeback_params_to_weights_map"


def test_weight_changing_algorithm_with_disk_layers_is_refused_before_the_load(tiny_model_dir):
    """gptq changes weights, and ModelOpt writes disk layers' changed weights into RAM: the CPU cap cannot hold."""
    from transformers import AutoConfig

    from quantize.offload import build_max_memory, plan_placement

    config = AutoConfig.from_pretrained(tiny_model_dir)
    with pytest.raises(UserError) as refused:
        plan_placement(config, torch.bfloat16, build_max_memory([], 0), batch_size=1, max_seq_len=8,
                       disk_writeback=True)
    assert refused.value.where == "--max_cpu_memory" and "--algorithm max" in str(refused.value)
    everything = plan_placement(config, torch.bfloat16, build_max_memory([], 1 << 30), batch_size=1, max_seq_len=8,
                                disk_writeback=True)
    assert everything.layers_per_device == {"cpu": 2} and everything.cpu_writeback_bytes == 0
