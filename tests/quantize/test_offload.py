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
    assert manifest["placement"]["budgets"] == {"cpu": 0}  # no GPU here; one entry per visible GPU on a GPU host
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
    three = llama_config(vocab_size=config.vocab_size, num_hidden_layers=3)
    with init_empty_weights():
        three_sizes = compute_module_sizes(AutoModelForCausalLM.from_config(three), dtype=torch.bfloat16)
    layer, three_non_layer = three_sizes["model.layers.0"], three_sizes[""] - three_sizes["model.layers"]
    activations = plan_placement(three, torch.bfloat16, build_max_memory([], 2**34), batch_size=2, max_seq_len=32).activation_bytes
    # Room on the CPU for the non-layer modules, the activations and 2.5 decoder layers: one layer's room is kept
    # for the disk layer streamed in for its forward, so one layer stays on the CPU and two go to disk.
    budget = three_non_layer + activations + int(layer * 2.5)
    plan = plan_placement(three, torch.bfloat16, build_max_memory([], budget), batch_size=2, max_seq_len=32)
    assert plan.layers_per_device == {"cpu": 1, "disk": 2}
    assert plan.layer_devices["model.layers.0"] == "cpu"
    assert plan.layer_devices["model.layers.1"] == "disk"
    assert plan.device_map["lm_head"] == "cpu"
    # Room for all three: nothing goes to disk, so nothing is streamed and no room is kept for it.
    roomy = plan_placement(three, torch.bfloat16, build_max_memory([], three_non_layer + activations + int(layer * 3.5)),
                           batch_size=2, max_seq_len=32)
    assert roomy.layers_per_device == {"cpu": 3}
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
    activations = plan_placement(config, torch.bfloat16, build_max_memory([2**40], 0), batch_size=1, max_seq_len=16).activation_bytes
    # cuda:0 keeps room for the layer streamed onto it from disk and the activations beside two layers of its own
    main_budget = non_layer + activations + layer + int(2.5 * layer)
    plan = plan_placement(config, torch.bfloat16, build_max_memory([main_budget, int(2.5 * layer)], 0),
                          batch_size=1, max_seq_len=16)
    assert plan.layers_per_device == {"cuda:0": 2, "cuda:1": 2, "disk": 2}
    assert [plan.device_map[name] for name in ("model.embed_tokens", "model.norm", "lm_head")] == [0, 0, 0]
    assert plan.main_device == "cuda:0"
    console = Console(file=io.StringIO(), width=150)
    print_placement(console, plan)
    printed = console.file.getvalue()
    assert "cuda:1" in printed and "disk" in printed and "cpu" in printed


def test_placement_at_70b_layer_sizes_keeps_the_gpu_peak_within_its_cap():
    """Llama-3.1-70B shapes cut to 14 layers under --max_gpu_memory 12GiB --max_cpu_memory 16GiB (issue 16): layers on
    GPU, CPU and disk, and the GPU's planned weights + the one streamed layer + activations fit the cap. The plan
    built on accelerate's map put 11.9 GiB of weights on the 12 GiB GPU, before any streamed layer or activation."""
    from transformers import LlamaConfig

    from quantize.offload import GIB, build_max_memory, plan_placement

    config = LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=14, num_attention_heads=64,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
    plan = plan_placement(config, torch.bfloat16, build_max_memory([12 * GIB], 16 * GIB), batch_size=4, max_seq_len=256)
    assert set(plan.layers_per_device) == {"cuda:0", "cpu", "disk"}
    gpu_peak = plan.bytes_per_device["cuda:0"] + plan.largest_layer_bytes + plan.activation_bytes
    assert gpu_peak <= 12 * GIB
    assert plan.bytes_per_device["cpu"] <= 16 * GIB
    assert plan.activation_bytes > 4 * 256 * 128256 * 2  # the batch's logits at a 128k vocabulary count
    assert plan.main_device_need() == gpu_peak and plan.main_device_shortfall() == 0
    layer_order = [plan.layer_devices[f"model.layers.{index}"] for index in range(14)]
    assert layer_order == sorted(layer_order, key=["cuda:0", "cpu", "disk"].index)  # in order: GPU, then CPU, then disk


def test_every_visible_gpu_gets_a_budget_one_size_or_one_each(monkeypatch):
    """--max_gpu_memory budgets all visible GPUs (not only cuda:0): one size for all, or a list with one per GPU."""
    from foundation.errors import UserError
    from quantize.offload import build_max_memory, default_budgets, gpu_budget_flags

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert default_budgets("2GiB", "0") == ([2 << 30] * 3, 0)
    assert default_budgets("1GiB,2GiB, 3GiB", "5GiB") == ([1 << 30, 2 << 30, 3 << 30], 5 << 30)
    assert build_max_memory([1, 2, 3], 4) == {0: 1, 1: 2, 2: 3, "cpu": 4, "disk": 1 << 50}
    with pytest.raises(UserError, match=r"--max_gpu_memory.*2 budgets for 3 visible GPU"):
        default_budgets("1GiB,2GiB", "0")
    with pytest.raises(UserError, match="--max_gpu_memory"):
        gpu_budget_flags("1GiB,lots", 2)
    assert gpu_budget_flags(None, 2) == [None, None]


def test_a_per_gpu_budget_list_is_accepted_by_the_settings_and_a_bad_one_named(tiny_model_dir):
    from foundation.errors import UserError
    from quantize.settings import build_parser, settings_from_args

    def parse(argv):
        return settings_from_args(build_parser().parse_args(argv))

    settings = parse(["--model", str(tiny_model_dir), "--offload_folder", "off", "--max_gpu_memory", "20GiB,80GiB"])
    assert settings.max_gpu_memory == "20GiB,80GiB"
    with pytest.raises(UserError, match=r"--max_gpu_memory.*one per GPU"):
        parse(["--model", str(tiny_model_dir), "--offload_folder", "off", "--max_gpu_memory", "20GiB,many"])


def test_placement_over_three_gpus_then_cpu_then_disk_uses_every_gpu():
    """The plan a 3-GPU host gets (planning needs no GPU): layers fill cuda:0, cuda:1, cuda:2, then CPU, then disk.

    cuda:0's budget also holds the non-layer modules, the activations and the one streamed layer."""
    from accelerate import init_empty_weights
    from accelerate.utils import compute_module_sizes
    from transformers import AutoModelForCausalLM

    from quantize.offload import build_max_memory, plan_placement

    config = llama_config(vocab_size=1000, num_hidden_layers=10)
    with init_empty_weights():
        sizes = compute_module_sizes(AutoModelForCausalLM.from_config(config), dtype=torch.bfloat16)
    layer = sizes["model.layers.0"]
    non_layer = sizes[""] - sizes["model.layers"]
    activations = plan_placement(config, torch.bfloat16, build_max_memory([], 2**40), batch_size=1,
                                 max_seq_len=16).activation_bytes
    main = non_layer + activations + layer + int(2.5 * layer)  # + the streamed layer: 2 placed layers fit
    plan = plan_placement(config, torch.bfloat16,
                          build_max_memory([main, int(2.5 * layer), int(1.5 * layer)], int(2.5 * layer)),
                          batch_size=1, max_seq_len=16)
    assert plan.layers_per_device == {"cuda:0": 2, "cuda:1": 2, "cuda:2": 1, "cpu": 2, "disk": 3}
    order = [plan.layer_devices[f"model.layers.{i}"] for i in range(10)]
    assert order == sorted(order, key=("cuda:0", "cuda:1", "cuda:2", "cpu", "disk").index)


def test_placement_warns_when_the_gpu_cap_cannot_hold_what_never_leaves_it():
    """405B's embeddings and head (8.4 GB) + a streamed 6.4 GB layer cannot fit 12 GiB: the plan says so and by how much."""
    import io

    from rich.console import Console
    from transformers import LlamaConfig

    from quantize.offload import GIB, build_max_memory, plan_placement, print_placement

    config = LlamaConfig(hidden_size=16384, intermediate_size=53248, num_hidden_layers=3, num_attention_heads=128,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
    plan = plan_placement(config, torch.bfloat16, build_max_memory([12 * GIB], 16 * GIB), batch_size=4, max_seq_len=256)
    assert plan.layers_per_device.get("cuda:0", 0) == 0
    assert plan.main_device_shortfall() == plan.main_device_need() - 12 * GIB > 0
    console = Console(file=io.StringIO(), width=400)
    print_placement(console, plan)
    printed = console.file.getvalue()
    assert "warning:" in printed and "Raise --max_gpu_memory to at least" in printed


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
