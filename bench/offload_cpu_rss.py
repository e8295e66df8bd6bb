"""Bench (CPU): anonymous RSS by phase (load / calibrate / export) of the offload path, one-pass vs --layerwise.

Writes a random bf16 Llama (default hidden 1024, MLP 4096, 8 layers, the testbed tokenizer) into --work and runs
our CLI in this process (``quantize_nvfp4_offload.py`` flags) with caps that put some decoder layers on the CPU
and the rest on disk. A sampler thread reads RssAnon / RssFile from /proc/self/status every 20 ms; the phase is set
by wrappers around stage.load_model and the backend's calibrate / export. It also reports, after calibration,
how many disk-offloaded tensors were copied into accelerate's in-memory weights_map (ModelOpt's writeback).

    nice /work/main/.venv/bin/python bench/offload_cpu_rss.py --work /tmp/cpurss --out /tmp/cpurss/result.json [--layerwise]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch


def status() -> dict:
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile"):
            values[key] = int(value.split()[0]) * 1024
    return values


class Sampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.phase = "start"
        self.peaks: dict[str, dict] = {}
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            now, peak = status(), self.peaks.setdefault(self.phase, {"RssAnon": 0, "RssFile": 0})
            for key, value in now.items():
                peak[key] = max(peak[key], value)
            self.halt.wait(0.02)


def write_model(directory: Path, hidden: int, intermediate: int, layers: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    testbed = json.loads((REPO / "testbed" / "model" / "config.json").read_text())
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=hidden // 128, num_key_value_heads=max(1, hidden // 512),
                         vocab_size=testbed["vocab_size"], max_position_embeddings=1024, tie_word_embeddings=False,
                         bos_token_id=testbed["bos_token_id"], eos_token_id=testbed["eos_token_id"],
                         pad_token_id=testbed["pad_token_id"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (REPO / "testbed" / "model" / name).is_file():
            shutil.copy(REPO / "testbed" / "model" / name, directory / name)
    del model


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--max_cpu_memory", default="150MiB")
    parser.add_argument("--layerwise", action="store_true")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--emulate_gpu_copies", action="store_true",
                        help="make ModelOpt's offload writeback store copies, as its .to(cpu) of a weight materialized "
                             "on the GPU does (on a CPU machine the tensor it stores is accelerate's own memmap)")
    args = parser.parse_args()
    if args.emulate_gpu_copies:
        emulate_gpu_copies()
    torch.set_num_threads(1)
    source = args.work / "source"
    if not (source / "config.json").is_file():
        write_model(source, args.hidden, args.intermediate, args.layers)

    from quantize import stage
    from quantize.backends import modelopt as backend_module
    from quantize.cli import main as cli_main

    sampler = Sampler()
    marks: dict[str, dict] = {}
    promoted: dict = {}

    def phased(name, function):
        def wrapper(*a, **k):
            sampler.phase = name
            marks[f"{name}_start"] = status()
            try:
                return function(*a, **k)
            finally:
                marks[f"{name}_end"] = status()
                sampler.phase = f"after_{name}"
        return wrapper

    original_calibrate = backend_module.ModelOptBackend.calibrate

    def calibrate_and_count(self, model, *a, **k):
        model = original_calibrate(self, model, *a, **k)
        promoted.update(count_promoted(model))
        return model

    stage.load_model = phased("load", stage.load_model)
    backend_module.ModelOptBackend.calibrate = phased("calibrate", calibrate_and_count)
    backend_module.ModelOptBackend.export = phased("export", backend_module.ModelOptBackend.export)
    sampler.start()
    started = time.time()
    output = args.work / ("out-layerwise" if args.layerwise else "out-offload")
    argv = ["--input_model", str(source), "--output_model", str(output), "--format", "nvfp4", "--overwrite",
            "--max_samples", str(args.samples), "--max_seq_len", "128", "--batch_size", "2", "--min_calibration_samples", "1",
            "--offload_folder", str(args.work / "offload"), "--max_cpu_memory", args.max_cpu_memory, "--clean_offload",
            *(["--layerwise"] if args.layerwise else [])]
    code = cli_main(argv, offload=True, prog="quantize_nvfp4_offload.py")
    sampler.halt.set()
    sampler.join()
    manifest = json.loads((output / "quantize_manifest.json").read_text()) if (output / "quantize_manifest.json").is_file() else {}
    result = {"returncode": code, "layerwise": args.layerwise, "seconds": time.time() - started,
              "shape": {"hidden": args.hidden, "intermediate": args.intermediate, "layers": args.layers},
              "max_cpu_memory": args.max_cpu_memory, "placement": manifest.get("placement", {}).get("layers_per_device"),
              "bytes_per_device": manifest.get("placement", {}).get("bytes_per_device"),
              "peaks_by_phase": sampler.peaks, "marks": marks, "weights_map_after_calibration": promoted}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    mb = 1 << 20
    for phase, peak in sampler.peaks.items():
        print(f"{phase:18s} peak RssAnon {peak['RssAnon'] / mb:8.1f} MiB  RssFile {peak['RssFile'] / mb:8.1f} MiB")
    print(json.dumps({"placement": result["placement"], "weights_map": promoted}))
    return code


def emulate_gpu_copies() -> None:
    from modelopt.torch.quantization.plugins import accelerate as plugin

    original = plugin._writeback_params_to_weights_map

    def copying_writeback(module, align_hook):
        for name, parameter in list(module._parameters.items()):
            if parameter is not None and not parameter.is_meta:
                module._parameters[name] = torch.nn.Parameter(parameter.detach().clone(), requires_grad=False)
        return original(module, align_hook)

    plugin._writeback_params_to_weights_map = copying_writeback


def count_promoted(model) -> dict:
    """Disk-offloaded tensors that now live in accelerate's in-memory state_dict, and their bytes."""
    from accelerate.utils.offload import PrefixedDataset

    count = size = disk_keys = 0
    seen = set()
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        hooks = getattr(hook, "hooks", [hook])
        for h in hooks:
            weights_map = getattr(h, "weights_map", None)
            if not isinstance(weights_map, PrefixedDataset) or id(weights_map.dataset) in seen:
                continue
            seen.add(id(weights_map.dataset))
            loader = weights_map.dataset
            index = getattr(loader, "index", {}) or {}
            disk_keys += len(index)
            for key in index:
                if key in loader.state_dict:
                    count += 1
                    size += loader.state_dict[key].numel() * loader.state_dict[key].element_size()
    return {"disk_keys": disk_keys, "disk_keys_in_memory": count, "disk_bytes_in_memory": size}


if __name__ == "__main__":
    sys.exit(main())
