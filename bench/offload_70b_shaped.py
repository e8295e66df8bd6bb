"""Bench (GPU): stage 1's offload path at Llama-3.1-70B layer sizes: caps held? output identical? time per layer?

Writes a random bf16 Llama-3.1-70B-shaped model (hidden 8192, MLP 28672, 64 heads / 8 KV heads, vocab 128256)
cut to `--layers` of its 80 decoder layers, shard by shard (one 5 GB shard in RAM at a time), with the testbed's
tokenizer. Then quantizes it to NVFP4 through our real CLI, each run a child process:

  reference  `quantize_nvfp4.py --device cuda` (the whole model on the GPU)
  offload    `quantize_nvfp4_offload.py --max_gpu_memory 12GiB --max_cpu_memory 16GiB --offload_folder ...`
             (the plan puts decoder layers on the GPU, the CPU and the disk; recorded from its manifest)
  layerwise  the same caps + `--layerwise`

and compares every tensor of offload and layerwise with the reference's (names, dtypes, shapes, bytes; configs).
Per run: wall time, the CLI's own timings (load / calibrate / export, from quantize_manifest.json), seconds per
decoder layer, peak GPU memory (torch's allocator peak reported by the child at exit, and nvidia-smi by pid),
peak RSS (VmHWM at exit; RssAnon / RssFile sampled from /proc: file-backed pages are the mmapped safetensors and
accelerate's disk offload, which the kernel can drop), and the planned placement. Then an extrapolation to the
full 70B (80 layers) and 405B (126 layers, hidden 16384, MLP 53248, 128 heads) under the same caps and under a
one-H200 setting, from the plan (computed without weights) and the measured per-layer costs.

Disk: the source (~28 GB at 14 layers) + the reference output (~11 GB: NVFP4 layers, bf16 embeddings and head)
+ one offloaded output at a time (each is deleted once compared) + the offload folder (the disk layers): ~52 GB at
14 layers on the device's 64 GiB; a run that would not fit is skipped and says so (`--layers 12` then).

Device, one call (carry [".whl"], wheels as in bench/RESULTS.md):

    pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 python bench/offload_70b_shaped.py --work /tmp/off70 --out $OUT/offload_70b_shaped.json

CPU smoke test here (a tiny shape; caps scaled to it so layers still land on CPU and disk):

    .venv/bin/python bench/offload_70b_shaped.py --shape tiny --work /tmp/off_tiny --out /tmp/off_tiny/result.json

Beside --out it writes the same name with .md: the runs table and the extrapolation table (for bench/RESULTS.md and
the README's offload table).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
import traceback
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO))

import _child_measure as measure  # noqa: E402  (nvidia-smi poller, deadline, versions)

GIB = 1 << 30
TESTBED = REPO / "testbed" / "model"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "generation_config.json")
SHAPES = {
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=128256),
    "405b": dict(hidden_size=16384, intermediate_size=53248, num_hidden_layers=126, num_attention_heads=128,
                 num_key_value_heads=8, vocab_size=128256),
    # CPU smoke: vocab = the testbed tokenizer's; caps below are scaled to its layer size
    "tiny": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=80, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024),
}
DEFAULTS = {  # layers, GPU cap, CPU cap
    # 14 layers: the plan puts 3 on the GPU, 10 on the CPU, 1 on disk (16: 3 on disk, ~61 GB of disk at the peak)
    "70b": dict(layers=14, max_gpu_memory="12GiB", max_cpu_memory="16GiB", seq_len=256),
    # a tiny layer is 1.57 MiB (bf16); beside the non-layer modules, 3 MiB of planned activations (4 x 64 tokens)
    # and the streamed layer, a 9 MiB CPU holds 2 of the 4 layers, the other 2 go to disk
    "tiny": dict(layers=4, max_gpu_memory="8MiB", max_cpu_memory="9MiB", seq_len=64),
}
WEIGHT_STD = 0.02
SHARD_BYTES = 5 * 10**9

RUNNER = r'''
"""Our quantize CLI, reporting torch's GPU peak and the process's peak RSS at exit (bench/offload_70b_shaped.py)."""
import atexit, json, os, resource, sys

def _report():
    report = {"ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    try:
        status = open("/proc/self/status").read()
        report["vm_hwm_bytes"] = int(status.split("VmHWM:")[1].split()[0]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        report.update(max_memory_allocated=torch.cuda.max_memory_allocated(),
                      max_memory_reserved=torch.cuda.max_memory_reserved())
    with open(os.environ["BENCH_MEMORY_JSON"], "w") as f:
        json.dump(report, f)
atexit.register(_report)
from quantize.cli import seed_script_main
offload = sys.argv[1] == "offload"
del sys.argv[1]
sys.exit(seed_script_main(offload=offload, prog="quantize_nvfp4_offload.py" if offload else "quantize_nvfp4.py"))
'''


# ---------------------------------------------------------------- the source model

def layer_bytes(shape: dict, element_bytes: int = 2) -> int:
    h, inter = shape["hidden_size"], shape["intermediate_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    return (2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h) * element_bytes


def non_layer_bytes(shape: dict, element_bytes: int = 2) -> int:
    return (2 * shape["vocab_size"] * shape["hidden_size"] + shape["hidden_size"]) * element_bytes


def llama_config(shape: dict, layers: int):
    from transformers import LlamaConfig

    testbed = json.loads((TESTBED / "config.json").read_text())
    config = LlamaConfig(**{**shape, "num_hidden_layers": layers}, max_position_embeddings=8192, rms_norm_eps=1e-5,
                         rope_theta=500000.0, bos_token_id=testbed["bos_token_id"], eos_token_id=testbed["eos_token_id"],
                         pad_token_id=testbed["pad_token_id"], tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    config.dtype = "bfloat16"
    return config


def layer_tensors(shape: dict, index: int, randn):
    h, inter = shape["hidden_size"], shape["intermediate_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    prefix = f"model.layers.{index}."
    yield prefix + "input_layernorm.weight", None, (h,)
    yield prefix + "post_attention_layernorm.weight", None, (h,)
    for name, out_features in (("q_proj", h), ("k_proj", kv), ("v_proj", kv), ("o_proj", h)):
        yield f"{prefix}self_attn.{name}.weight", randn, (out_features, h)
    for name in ("gate_proj", "up_proj"):
        yield f"{prefix}mlp.{name}.weight", randn, (inter, h)
    yield f"{prefix}mlp.down_proj.weight", randn, (h, inter)


def write_source(out_dir: Path, shape: dict, layers: int, device: str, seed: int) -> dict:
    """A random bf16 Llama in HF layout, generated tensor by tensor; only the pending shard is held in RAM."""
    import torch

    from checkpoint_formats.writer import StreamingCheckpointWriter

    started = time.time()
    shutil.rmtree(out_dir, ignore_errors=True)
    generator = torch.Generator(device=device).manual_seed(seed)

    def randn(*size):
        return (torch.randn(size, device=device, generator=generator) * WEIGHT_STD).to(torch.bfloat16)

    writer = StreamingCheckpointWriter(out_dir, max_shard_bytes=SHARD_BYTES)
    h, vocab = shape["hidden_size"], shape["vocab_size"]
    writer.add("model.embed_tokens.weight", randn(vocab, h))
    for index in range(layers):
        for name, make, size in layer_tensors(shape, index, randn):
            writer.add(name, make(*size) if make else torch.ones(size, dtype=torch.bfloat16))
    writer.add("model.norm.weight", torch.ones(h, dtype=torch.bfloat16))
    writer.add("lm_head.weight", randn(vocab, h))
    shards = writer.close()
    llama_config(shape, layers).save_pretrained(out_dir)
    for name in TOKENIZER_FILES:
        if (TESTBED / name).is_file():
            shutil.copy(TESTBED / name, out_dir / name)
    return {"ok": True, "seconds": time.time() - started, "bytes": folder_bytes(out_dir), "shards": len(shards),
            "layers": layers, "generated_on": device, "peak_rss_bytes_of_bench": peak_rss_self()}


def output_bytes_estimate(shape: dict, layers: int) -> int:
    """An NVFP4 checkpoint: 4.5 bits per layer weight (codes + FP8 block scales), bf16 embeddings and head."""
    return int(layers * layer_bytes(shape) * 4.5 / 16) + non_layer_bytes(shape)


def offload_bytes_estimate(shape: dict, args) -> int:
    """accelerate's disk copy of the layers the plan sends to disk."""
    try:
        return planned(shape, args.layers, args.max_gpu_memory if args.device == "cuda" else None,
                       args.max_cpu_memory, args)["bytes_per_device"].get("disk", 0)
    except Exception:  # noqa: BLE001 - an estimate only
        return 0


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) if folder.is_dir() else 0


def peak_rss_self() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------- one quantize run, measured

def run_quantize(name: str, args, source: Path, output: Path, extra: list[str], offload: bool, env: dict) -> dict:
    runner = args.work / "quantize_runner.py"
    runner.write_text(RUNNER)
    command = [sys.executable, str(runner), "offload" if offload else "plain", "--input_model", str(source),
               "--output_model", str(output), "--format", "nvfp4", "--overwrite", "--max_samples", str(args.samples),
               "--max_seq_len", str(args.seq_len), "--batch_size", str(args.batch_size),
               "--min_calibration_samples", "1", *extra]
    if not offload:
        command += ["--device", args.device]
    log = args.work / f"{name}.log"
    shutil.rmtree(output, ignore_errors=True)
    child = measure.run_child(command, log, env, REPO, timeout=float("inf"), reserve=args.reserve_s, poll_rss=True)
    wall = child.wall_s
    result = {"ok": child.returncode == 0 and (output / "hf_quant_config.json").is_file(),
              "returncode": child.returncode, "timed_out": child.timed_out, "timeout_s": child.timeout_s,
              "wall_s": wall, "command": " ".join(command), "log": str(log), "gpu_memory_poll": child.memory,
              "rss_poll": child.rss, "child_report": child.torch_memory}
    manifest_path = output / "quantize_manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        result["timings_s"] = manifest.get("timings_s")
        placement = manifest.get("placement") or {}
        result["layers_per_device"] = placement.get("layers_per_device")
        result["bytes_per_device"] = placement.get("bytes_per_device")
        timings = result["timings_s"] or {}
        layers = args.layers
        result["seconds_per_layer"] = {key: timings[key] / layers for key in ("load", "calibrate", "export") if key in timings}
    result["output_bytes"] = folder_bytes(output)
    offload_dir = args.work / "offload"
    result["offload_folder_bytes_after"] = folder_bytes(offload_dir)
    if not result["ok"]:
        result["error_tail"] = log.read_text(errors="replace")[-3000:]
    report = result["child_report"] or {}
    print(f"{name}: ok={result['ok']} wall {wall:.1f} s, placement {result.get('layers_per_device')}, "
          f"timings {result.get('timings_s')}, torch GPU peak {report.get('max_memory_allocated')}, "
          f"VmHWM {report.get('vm_hwm_bytes')}", flush=True)
    return result


# ---------------------------------------------------------------- comparing two checkpoints

def tensor_index(folder: Path) -> dict[str, Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {name: folder / shard for name, shard in json.loads(index.read_text())["weight_map"].items()}
    from safetensors import safe_open

    names: dict[str, Path] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as handle:
            names.update({name: shard for name in handle.keys()})
    return names


def compare_checkpoints(reference: Path, candidate: Path) -> dict:
    """Every tensor of `candidate` against `reference`: same names, dtype, shape and bytes; each difference named."""
    import torch
    from safetensors import safe_open

    started = time.time()
    ref_index, cand_index = tensor_index(reference), tensor_index(candidate)
    missing, extra = sorted(set(ref_index) - set(cand_index)), sorted(set(cand_index) - set(ref_index))
    differences = []
    handles: dict[Path, object] = {}

    def get(path: Path, name: str):
        if path not in handles:
            handles[path] = safe_open(str(path), "pt")
        return handles[path].get_tensor(name)

    for name in sorted(set(ref_index) & set(cand_index)):
        a, b = get(ref_index[name], name), get(cand_index[name], name)
        if a.dtype != b.dtype or a.shape != b.shape:
            differences.append({"name": name, "reference": f"{a.dtype} {tuple(a.shape)}", "candidate": f"{b.dtype} {tuple(b.shape)}"})
            continue
        bytes_a, bytes_b = a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
        if not torch.equal(bytes_a, bytes_b):
            entry = {"name": name, "dtype": str(a.dtype), "shape": list(a.shape)}
            if a.dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn):
                diff = (a.float() - b.float()).abs()
                entry.update(elements_different=int((diff > 0).sum()), max_abs_diff=float(diff.max()))
            else:
                entry["elements_different"] = int((a != b).sum())
            differences.append(entry)
    handles.clear()
    configs = {}
    for file in ("config.json", "hf_quant_config.json"):
        ref_json = json.loads((reference / file).read_text()) if (reference / file).is_file() else None
        cand_json = json.loads((candidate / file).read_text()) if (candidate / file).is_file() else None
        configs[file] = ref_json == cand_json
    identical = not missing and not extra and not differences and all(configs.values())
    return {"identical": identical, "tensors_compared": len(set(ref_index) & set(cand_index)), "missing": missing,
            "extra": extra, "different": differences[:50], "n_different": len(differences), "configs_equal": configs,
            "seconds": time.time() - started}


# ---------------------------------------------------------------- extrapolation

def planned(shape: dict, layers: int, gpu_cap: str | None, cpu_cap: str, args) -> dict:
    """What our planner would do with the full model under these caps (meta tensors, no weights)."""
    import torch

    from quantize.offload import build_max_memory, parse_memory, plan_placement

    gpus = [parse_memory(gpu_cap, "--max_gpu_memory")] if gpu_cap else []
    plan = plan_placement(llama_config(shape, layers), torch.bfloat16,
                          build_max_memory(gpus, parse_memory(cpu_cap, "--max_cpu_memory")),
                          batch_size=args.batch_size, max_seq_len=args.seq_len)
    return {"layers_per_device": dict(plan.layers_per_device), "bytes_per_device": plan.bytes_per_device,
            "total_weight_bytes": plan.total_weight_bytes, "main_device_need_bytes": plan.main_device_need(),
            "main_device_shortfall_bytes": plan.main_device_shortfall()}


def extrapolate(args, shape: dict, runs: dict) -> dict:
    """Seconds and memory for full models from this run: resident layers cost what the reference's cost, offloaded
    layers what the offload run's cost beyond that (CPU and disk pooled: one measured number), scaled by layer
    bytes (the measured shape's layer -> each model's; fixed costs such as the first Triton compile are spread over
    the layers, so the full-model seconds are upper bounds); memory: the caps bound resident weights, one streamed layer and the activations come on top."""
    reference, offload = runs.get("reference", {}), runs.get("offload", {})
    ref_t, off_t = reference.get("timings_s") or {}, offload.get("timings_s") or {}
    placement = offload.get("layers_per_device") or {}
    on_gpu = sum(count for device, count in placement.items() if device.startswith("cuda"))
    offloaded = sum(count for device, count in placement.items() if not device.startswith("cuda"))
    per_layer: dict = {}
    for key in ("load", "calibrate", "export"):
        if key in ref_t and key in off_t and offloaded:
            resident = ref_t[key] / args.layers
            per_layer[key] = {"resident_s": resident, "offloaded_s": max((off_t[key] - on_gpu * resident) / offloaded, resident)}
    settings = {"bench caps": (args.max_gpu_memory, args.max_cpu_memory),
                "one H200 (140 GiB) + 128 GiB RAM": ("120GiB", "100GiB"),
                "one H100 (80 GiB) + 256 GiB RAM": ("70GiB", "200GiB")}
    models = {"llama-3.1-70b": dict(SHAPES["70b"]), "llama-3.1-405b": dict(SHAPES["405b"])}
    measured_gpu = (offload.get("child_report") or {}).get("max_memory_allocated")
    out: dict = {"method": extrapolate.__doc__.replace("\n    ", " ").strip(), "per_layer_measured": per_layer,
                 "calibration_tokens": args.samples * args.seq_len, "models": {}}
    for model_name, model_shape in models.items():
        scale = layer_bytes(model_shape) / layer_bytes(shape)  # the measured shape's layers -> this model's
        entry = {"layer_bytes": layer_bytes(model_shape), "weights_bytes": layer_bytes(model_shape) * model_shape[
            "num_hidden_layers"] + non_layer_bytes(model_shape), "settings": {}}
        for label, (gpu_cap, cpu_cap) in settings.items():
            try:
                plan = planned(model_shape, model_shape["num_hidden_layers"], gpu_cap, cpu_cap, args)
            except Exception as error:  # noqa: BLE001
                entry["settings"][label] = {"error": repr(error)}
                continue
            counts = plan["layers_per_device"]
            resident = sum(n for device, n in counts.items() if device.startswith("cuda"))
            off = sum(n for device, n in counts.items() if not device.startswith("cuda"))
            seconds = {key: scale * (resident * value["resident_s"] + off * value["offloaded_s"]) for key, value in per_layer.items()}
            entry["settings"][label] = {
                "caps": {"gpu": gpu_cap, "cpu": cpu_cap}, **plan, "seconds": seconds,
                "total_s": sum(seconds.values()) if seconds else None,
                "disk_needed_bytes": plan["bytes_per_device"].get("disk", 0),
                "gpu_peak_bytes_estimate": None if measured_gpu is None or label != "bench caps" else
                measured_gpu + layer_bytes(model_shape) - layer_bytes(shape),
            }
        out["models"][model_name] = entry
    return out


# ---------------------------------------------------------------- the tables (bench/RESULTS.md, the README's offload table)

def markdown_tables(result: dict) -> str:
    def gib(value) -> str:
        return "-" if value is None else f"{value / GIB:.2f}"

    def sec(value) -> str:
        return "-" if value is None else f"{value:.1f}"

    shape = result["shape"]
    lines = [f"{result['gpu']}, {result['date']}: Llama-3.1-70B-shaped bf16 model, {shape['num_hidden_layers']} of 80 "
             f"layers ({result['write'].get('bytes', 0) / 1e9:.1f} GB, written in {sec(result['write'].get('seconds'))} s), "
             f"{result['samples']} samples x {result['seq_len']} tokens; caps GPU {result['caps']['gpu']}, CPU "
             f"{result['caps']['cpu']}.", "",
             "| run | placement (layers) | wall s | load s | calibrate s | export s | s / layer (calib + export) | "
             "peak GPU GiB (torch / nvidia-smi) | peak RSS GiB (anon / all) | identical to reference |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, run in result["runs"].items():
        if not run.get("ok"):
            lines.append(f"| {name} | {run.get('skipped') or 'failed'} | {sec(run.get('wall_s'))} | | | | | | | |")
            continue
        timings, per_layer = run.get("timings_s") or {}, run.get("seconds_per_layer") or {}
        report, rss = run.get("child_report") or {}, run.get("rss_poll") or {}
        placement = ", ".join(f"{device} {count}" for device, count in (run.get("layers_per_device") or {"all on": result.get("device", "one device")}).items())
        comparison = result["comparisons"].get(name)
        same = "-" if name == "reference" else "not compared" if comparison is None else (
            "yes" if comparison.get("identical") else f"no: {comparison.get('n_different')} tensors")
        lines.append(f"| {name} | {placement} | {sec(run.get('wall_s'))} | {sec(timings.get('load'))} | "
                     f"{sec(timings.get('calibrate'))} | {sec(timings.get('export'))} | "
                     f"{sec((per_layer.get('calibrate') or 0) + (per_layer.get('export') or 0))} | "
                     f"{gib(report.get('max_memory_allocated'))} / {gib((run.get('gpu_memory_poll') or {}).get('peak_bytes'))} | "
                     f"{gib(rss.get('peak_RssAnon_bytes'))} / {gib(report.get('vm_hwm_bytes'))} | {same} |")
    extrapolation = result.get("extrapolation") or {}
    if extrapolation.get("models"):
        lines += ["", "| model | caps (GPU / CPU) | layers GPU / CPU / disk | disk needed GB | load + calibrate + export s "
                  f"(at {extrapolation.get('calibration_tokens')} calibration tokens) |", "|---|---|---|---|---|"]
        for model, entry in extrapolation["models"].items():
            for setting in entry["settings"].values():
                if "error" in setting:
                    continue
                counts = setting["layers_per_device"]
                layers = " / ".join(str(sum(n for d, n in counts.items() if d.startswith(kind))) for kind in ("cuda", "cpu", "disk"))
                seconds = setting.get("seconds") or {}
                total = " + ".join(f"{seconds[key]:.0f}" for key in ("load", "calibrate", "export") if key in seconds)
                lines.append(f"| {model} | {setting['caps']['gpu']} / {setting['caps']['cpu']} | {layers} | "
                             f"{setting['disk_needed_bytes'] / 1e9:.0f} | {total or '-'} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main

def step(name: str, function, *args) -> dict:
    started = time.time()
    try:
        return function(*args)
    except Exception:  # noqa: BLE001 - every step's failure is recorded, not fatal
        return {"ok": False, "seconds": time.time() - started, "error_tail": traceback.format_exc()[-3000:], "step": name}


def caps_check(run: dict, args, shape: dict) -> dict:
    """Did the run stay within its caps? GPU: torch's allocator peak vs --max_gpu_memory (+ the margin);
    CPU: peak anonymous RSS vs --max_cpu_memory (+ the margin)."""
    from quantize.offload import parse_memory

    report = run.get("child_report") or {}
    gpu_cap, cpu_cap = parse_memory(args.max_gpu_memory, "--max_gpu_memory"), parse_memory(args.max_cpu_memory, "--max_cpu_memory")
    gpu_peak = report.get("max_memory_allocated")
    anon = (run.get("rss_poll") or {}).get("peak_RssAnon_bytes")
    try:  # the planner's own estimate of the main device's peak (the samples may be shorter than --seq_len)
        plan = planned(shape, args.layers, args.max_gpu_memory if args.device == "cuda" else None, args.max_cpu_memory, args)
    except Exception as error:  # noqa: BLE001
        plan = {"error": repr(error)}
    return {"planned_main_device_need_bytes": plan.get("main_device_need_bytes"),
            "planned_layers_per_device": plan.get("layers_per_device"),"gpu_cap_bytes": gpu_cap, "gpu_margin_bytes": args.gpu_margin, "gpu_peak_allocated_bytes": gpu_peak,
            "gpu_reserved_bytes": report.get("max_memory_reserved"), "gpu_nvidia_smi_bytes": (run.get("gpu_memory_poll") or {}).get("peak_bytes"),
            "gpu_within": None if gpu_peak is None else gpu_peak <= gpu_cap + args.gpu_margin,
            "cpu_cap_bytes": cpu_cap, "cpu_margin_bytes": args.cpu_margin, "cpu_peak_anon_bytes": anon,
            "cpu_within": None if not anon else anon <= cpu_cap + args.cpu_margin}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=("70b", "tiny"), default="70b")
    parser.add_argument("--layers", type=int, help="decoder layers written (default: 14 for 70b, 4 for tiny)")
    parser.add_argument("--max_gpu_memory", help="cap for the offloaded runs (default 12GiB; tiny: 8MiB)")
    parser.add_argument("--max_cpu_memory", help="cap for the offloaded runs (default 16GiB; tiny: 9MiB)")
    parser.add_argument("--samples", type=int, default=8, help="calibration samples")
    parser.add_argument("--seq_len", type=int, help="calibration --max_seq_len (default 256; tiny: 64)")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--runs", default="reference,offload,layerwise", help="comma-separated subset, in this order")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None)
    parser.add_argument("--work", type=Path, default=Path("/tmp/offload_70b"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget_s", type=float, default=570, help="the whole bench ends by then (600 s a device call)")
    parser.add_argument("--reserve_s", type=float, default=30, help="seconds kept after a child for comparing and writing")
    parser.add_argument("--gpu_margin", type=int, default=2 * GIB, help="bytes above --max_gpu_memory still called within")
    parser.add_argument("--cpu_margin", type=int, default=4 * GIB, help="bytes above --max_cpu_memory still called within")
    parser.add_argument("--keep", action="store_true", help="keep the source model and outputs")
    args = parser.parse_args()
    started = time.time()
    measure.DEADLINE[0] = started + args.budget_s
    import torch

    defaults = DEFAULTS[args.shape]
    args.layers = args.layers or defaults["layers"]
    args.max_gpu_memory = args.max_gpu_memory or defaults["max_gpu_memory"]
    args.max_cpu_memory = args.max_cpu_memory or defaults["max_cpu_memory"]
    args.seq_len = args.seq_len or defaults["seq_len"]
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.shape == "tiny":
        args.gpu_margin, args.cpu_margin = min(args.gpu_margin, 64 << 20), args.cpu_margin
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    shape = SHAPES[args.shape]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    source, offload_dir = args.work / "source-bf16", args.work / "offload"
    result: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "gpu": measure.gpu_name(),
                    "versions": measure.versions(), "command": "python bench/offload_70b_shaped.py " + " ".join(sys.argv[1:]),
                    "shape": {**shape, "num_hidden_layers": args.layers}, "layer_bytes": layer_bytes(shape),
                    "caps": {"gpu": args.max_gpu_memory, "cpu": args.max_cpu_memory}, "samples": args.samples, "device": args.device,
                    "seq_len": args.seq_len, "batch_size": args.batch_size, "cpu_count": os.cpu_count(), "runs": {},
                    "comparisons": {}}

    def save() -> None:
        result["total_seconds"] = time.time() - started
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
        try:
            args.out.with_suffix(".md").write_text(markdown_tables(result))
        except Exception as error:  # noqa: BLE001 - the JSON is what counts
            print(f"markdown table failed: {error!r}", flush=True)

    result["write"] = write = step("write", write_source, source, shape, args.layers, args.device, args.seed)
    if args.device == "cuda":
        torch.cuda.empty_cache()
    print(f"write: ok={write.get('ok')} {write.get('bytes', 0) / 1e9:.2f} GB in {write.get('seconds', 0):.1f} s", flush=True)
    result["disk_free_after_write_bytes"] = shutil.disk_usage(args.work).free
    save()
    outputs = {name: args.work / f"out-{name}" for name in ("reference", "offload", "layerwise")}
    offload_flags = ["--offload_folder", str(offload_dir), "--max_gpu_memory", args.max_gpu_memory,
                     "--max_cpu_memory", args.max_cpu_memory, "--clean_offload"]
    flags = {"reference": ([], False), "offload": (offload_flags, True), "layerwise": ([*offload_flags, "--layerwise"], True)}
    for name in [n.strip() for n in args.runs.split(",") if n.strip()]:
        if not write.get("ok"):
            break
        if measure.time_left(reserve=args.reserve_s) <= 5:
            result["runs"][name] = {"ok": False, "skipped": "no time left in --budget_s"}
            continue
        needed = output_bytes_estimate(shape, args.layers) + (
            offload_bytes_estimate(shape, args) if flags[name][1] else 0) + GIB
        free = shutil.disk_usage(args.work).free
        if free < needed:
            result["runs"][name] = {"ok": False, "skipped": f"needs ~{needed / 1e9:.1f} GB of disk, {free / 1e9:.1f} GB free"}
            save()
            continue
        extra, offload = flags[name]
        run = result["runs"][name] = step(name, run_quantize, name, args, source, outputs[name], extra, offload, env)
        if offload:
            run["caps_check"] = caps_check(run, args, shape)
        if name != "reference" and run.get("ok") and result["runs"].get("reference", {}).get("ok"):
            comparison = result["comparisons"][name] = step("compare", compare_checkpoints, outputs["reference"], outputs[name])
            print(f"compare {name}: identical={comparison.get('identical')} ({comparison.get('n_different')} different: "
                  f"{[d['name'] for d in comparison.get('different', [])][:5]})", flush=True)
            if not args.keep:
                shutil.rmtree(outputs[name], ignore_errors=True)
        save()
    result["extrapolation"] = step("extrapolate", extrapolate, args, shape, result["runs"])
    result["complete"] = all(run.get("ok") for run in result["runs"].values()) and all(
        c.get("identical") for c in result["comparisons"].values())
    save()
    if not args.keep:
        shutil.rmtree(source, ignore_errors=True)
        shutil.rmtree(offload_dir, ignore_errors=True)
        for output in outputs.values():
            shutil.rmtree(output, ignore_errors=True)
    print(json.dumps({name: {"ok": run.get("ok"), "wall_s": run.get("wall_s"), "placement": run.get("layers_per_device"),
                             "caps": run.get("caps_check")} for name, run in result["runs"].items()}, indent=1, default=str))
    print(f"comparisons: { {name: c.get('identical') for name, c in result['comparisons'].items()} }")
    print(markdown_tables(result))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
