"""Calibration cost vs a plain bf16 forward over the same tokens, as ratios, with where the time goes.

One process, one device, one model. For each format it measures:

- ``cold``: ``mtq.quantize`` from the unquantized model (quantizer insertion + weight
  statistics + the first calibration pass), once per loop variant;
- ``warm``: further calibration passes of the quantized model (``mtq.calibrate``),
  alternating with plain bf16 passes over the same batches (minimum of each series);
- counts per pass: host syncs (CUDA: ``torch.cuda.set_sync_debug_mode``; CPU:
  device-to-host reads) and aten ops;
- one ``torch.profiler`` pass each of plain / every variant, grouped into GEMM kernels,
  other kernels, ModelOpt quantizers (kernels + host time), ModelOpt's quantized-module
  wrapper (host time around the GEMM) and our loop (batches, checks);
- that both variants produce bit-identical amax buffers.

Loop variants (``--variants``): ``modelopt`` = ModelOpt's own collection (three asserting
host syncs per quantizer call, weight amax recomputed every batch); ``sync_free`` = ours
without syncs or weight reductions but through ModelOpt's module forwards; ``fast_max`` =
ours with lean Linear forwards too, what ``quantize`` runs for max calibration
(``quantize/max_statistics.py``). Models are random-initialised from a config, never
downloaded: ``8b`` has Llama-3-8B's shapes (bf16, ~16 GB, GPU), ``small`` is CPU-sized,
``tiny`` only checks that the script runs.

    python bench/calibration_bench.py --device cuda --model 8b --out $OUT/calibration_bench_gpu.json
    python bench/calibration_bench.py --device cpu --small --out /tmp/calibration_bench_smoke.json
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import dataclasses
import gc
import json
import os
import platform
import re
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODEL_SHAPES = {
    # Llama-3-8B: hidden 4096, MLP 14336, 32 layers, 32 heads (8 KV heads), vocab 128256.
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
    # Llama-3-8B's module layout (32 layers, 224 quantized Linears, GQA 32/8) at CPU size: counts per batch match 8b.
    "8b_layout": dict(hidden_size=256, intermediate_size=896, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=1024, max_position_embeddings=2048),
    "small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=4096, max_position_embeddings=2048),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, max_position_embeddings=1024),
}
VARIANTS = {"modelopt": dict(fast_max=False), "sync_free": dict(fast_max=True, lean_linears=False),
            "fast_max": dict(fast_max=True, lean_linears=True)}
GEMM_KERNEL = re.compile(r"gemm|cutlass|nvjet|xmma|cublas|sm\d+_|matmul|addmm|aten::mm|aten::bmm", re.IGNORECASE)
QUANTIZER_RANGE, MODULE_RANGE = "modelopt::TensorQuantizer", "modelopt::QuantLinear"
FORWARD_RANGE = "quantize::calibration_forward"  # quantize.calibrate.FORWARD_RANGE (imported lazily there)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", choices=list(MODEL_SHAPES), help="default: 8b on cuda, small on cpu")
    parser.add_argument("--small", action="store_true", help="toy size (same as --model tiny --max_samples 8 --repeats 2)")
    parser.add_argument("--mix", default=str(REPO / "datasets_yaml" / "offline_mix.yaml"))
    parser.add_argument("--formats", default="nvfp4", help="comma-separated, from quantize.recipes.FORMATS")
    parser.add_argument("--variants", default="modelopt,sync_free,fast_max", help=f"comma-separated, from {list(VARIANTS)}")
    parser.add_argument("--max_samples", type=int, help="default: the mix's (cpu: 64)")
    parser.add_argument("--max_seq_len", type=int)
    parser.add_argument("--batch_sizes", default="8,32", help="comma-separated; every format is measured at each")
    parser.add_argument("--repeats", type=int, default=4,
                        help="plain passes and warm calibrations per variant, alternating; the minimum of each is reported")
    parser.add_argument("--no_profile", action="store_true", help="skip the torch.profiler attribution passes")
    parser.add_argument("--profile_batches", type=int, default=4,
                        help="batches (the longest) in the counted and the profiled passes; per-batch counts do not depend on it")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.small:
        args.model, args.max_samples = "tiny", args.max_samples or 8
        args.repeats = min(args.repeats, 2)
    args.model = args.model or ("8b" if args.device == "cuda" else "small")
    if args.device == "cpu" and args.max_samples is None:
        args.max_samples = 64
    args.variants = [name.strip() for name in args.variants.split(",") if name.strip()]
    args.batch_sizes = [int(size) for size in args.batch_sizes.split(",") if size.strip()]
    unknown = [name for name in args.variants if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown --variants {unknown}; choose from {list(VARIANTS)}")
    return args


def bench_tokenizer():
    """Byte-level BPE trained on the shipped corpora (no download); its ids fit any vocab >= 1024."""
    from testbed.tokenizer import train_tokenizer

    texts = []
    for name in ("general_text.jsonl", "chat_conversations.jsonl"):
        for line in (REPO / "datasets_yaml" / "corpora" / name).read_text().splitlines()[:300]:
            texts.append(line)
    return train_tokenizer(texts, vocab_size=1024)


def build_model(shape: str, device: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**MODEL_SHAPES[shape])
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval()


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(device: str, fn, *args) -> float:
    synchronize(device)
    started = time.perf_counter()
    fn(*args)
    synchronize(device)
    return time.perf_counter() - started


@torch.no_grad()
def plain_pass(model, batches) -> None:
    for ids, mask in batches:
        with torch.profiler.record_function(FORWARD_RANGE):
            model(input_ids=ids, attention_mask=mask, use_cache=False)


class OpCounter(contextlib.ContextDecorator):
    """aten ops per pass and host syncs (CUDA: the sync debug mode's warnings; CPU: device-to-host reads)."""

    def __init__(self, device: str):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counter.ops[func.overloadpacket.__name__] += 1
                return func(*args, **(kwargs or {}))

        self.device, self.mode, self.ops, self.syncs = device, Mode(), collections.Counter(), 0

    def __enter__(self):
        self._warnings = warnings.catch_warnings(record=True)
        self._recorded = self._warnings.__enter__()
        warnings.simplefilter("always")
        if self.device == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        if self.device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
            self.syncs = sum("synchroniz" in str(w.message) for w in self._recorded)
        else:
            self.syncs = self.ops["_local_scalar_dense"]
        self._warnings.__exit__(*exc)
        return False

    def summary(self, batches: int) -> dict:
        return {"host_syncs": self.syncs, "host_syncs_per_batch": self.syncs / batches,
                "aten_ops": sum(self.ops.values()), "aten_ops_per_batch": sum(self.ops.values()) / batches}


@contextlib.contextmanager
def modelopt_ranges():
    """Profiler ranges around every ModelOpt quantizer call and quantized-Linear forward (bench only)."""
    from modelopt.torch.quantization.nn import TensorQuantizer
    from modelopt.torch.quantization.nn.modules.quant_module import QuantLinearConvBase

    originals = {TensorQuantizer: TensorQuantizer.forward, QuantLinearConvBase: QuantLinearConvBase.forward}

    def wrap(function, name):
        def wrapper(*args, **kwargs):
            with torch.profiler.record_function(name):
                return function(*args, **kwargs)
        return wrapper

    TensorQuantizer.forward = wrap(originals[TensorQuantizer], QUANTIZER_RANGE)
    QuantLinearConvBase.forward = wrap(originals[QuantLinearConvBase], MODULE_RANGE)
    try:
        yield
    finally:
        for cls, forward in originals.items():
            cls.forward = forward


def profile_pass(device: str, fn) -> dict:
    """One profiled pass, grouped: GEMM / other kernels, ModelOpt quantizers, ModelOpt's module wrapper, our loop."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with modelopt_ranges(), profile(activities=activities) as prof:
        wall = timed(device, fn)
    events = prof.events()
    kernels = [e for e in events if e.device_type != DeviceType.CPU and e.name != "[memory]"]
    kernel_us = collections.Counter()
    for kernel in kernels:
        kernel_us[kernel.name] += kernel.time_range.elapsed_us()
    ranges = collections.defaultdict(list)
    for event in events:
        if event.device_type == DeviceType.CPU and event.name in (QUANTIZER_RANGE, MODULE_RANGE, FORWARD_RANGE):
            ranges[event.name].append(event)
    quantizer_host = sum(e.cpu_time_total for e in ranges[QUANTIZER_RANGE])
    module_host = sum(e.cpu_time_total for e in ranges[MODULE_RANGE])
    # What ModelOpt's quantized Linear costs on the host besides its quantizer calls and the GEMM op itself.
    gemm_host_in_modules = sum(child.cpu_time_total for e in ranges[MODULE_RANGE] for child in e.cpu_children
                               if child.name in ("aten::linear", "aten::matmul", "aten::addmm", "aten::mm"))
    quantizer_host_in_modules = sum(child.cpu_time_total for e in ranges[MODULE_RANGE] for child in e.cpu_children
                                    if child.name == QUANTIZER_RANGE)
    forward_host = sum(e.cpu_time_total for e in ranges[FORWARD_RANGE])
    top_ops = collections.Counter()
    for event in events:
        if event.device_type == DeviceType.CPU and event.name.startswith("aten::"):
            top_ops[event.name] += event.self_cpu_time_total
    gemm_kernel = sum(us for name, us in kernel_us.items() if GEMM_KERNEL.search(name))
    return {
        "wall_s": wall,
        "kernels": len(kernels), "kernel_s": sum(kernel_us.values()) / 1e6,
        "gemm_kernel_s": gemm_kernel / 1e6, "other_kernel_s": (sum(kernel_us.values()) - gemm_kernel) / 1e6,
        "modelopt_quantizer_kernel_s": sum(e.device_time_total for e in ranges[QUANTIZER_RANGE]) / 1e6,
        "modelopt_quantizer_calls": len(ranges[QUANTIZER_RANGE]),
        "modelopt_quantizer_host_s": quantizer_host / 1e6,
        "modelopt_module_host_s_excl_quantizers_and_gemm":
            (module_host - quantizer_host_in_modules - gemm_host_in_modules) / 1e6,
        "model_forward_host_s": forward_host / 1e6,
        "ours_loop_host_s_outside_forward": max(0.0, wall - forward_host / 1e6),
        "top_kernels_s": {name: us / 1e6 for name, us in kernel_us.most_common(12)},
        "top_host_ops_self_s": {name: us / 1e6 for name, us in top_ops.most_common(12)},
    }


def amax_buffers(model) -> dict[str, torch.Tensor]:
    from modelopt.torch.quantization.nn import TensorQuantizer

    return {name: module._amax.detach().clone() for name, module in model.named_modules()
            if isinstance(module, TensorQuantizer) and hasattr(module, "_amax")}


def measure_format(args, format_name: str, batch_size: int, calibration_set, pad_id: int) -> dict:
    import modelopt.torch.quantization as mtq

    from quantize.calibrate import make_forward_loop
    from quantize.recipes import build_quant_config, get_recipe

    device = args.device
    plain_model = build_model(args.model, device)
    batches = [(ids.to(device), mask.to(device)) for ids, mask in calibration_set.batches(batch_size, pad_id)]
    timed(device, plain_pass, plain_model, batches)  # warm-up: kernels, allocator
    loop_times: dict[str, list[float]] = {name: [] for name in args.variants}

    def timed_loop(name):
        loop = make_forward_loop(calibration_set, batch_size, pad_id, console=None, **VARIANTS[name])

        def run(model):
            loop_times[name].append(timed(device, loop, model))
        return run

    loops = {name: timed_loop(name) for name in args.variants}
    result: dict = {"cold": {}, "warm": {}, "counts": {}, "profile": {}}
    models = {}
    for name in reversed(args.variants):  # ours first: the first cold run pays any first-use cost
        models[name] = copy.deepcopy(plain_model)
        total = timed(device, mtq.quantize, models[name], build_quant_config(get_recipe(format_name)), loops[name])
        result["cold"][name] = {"quantize_total_s": total, "first_pass_s": loop_times[name][0],
                                "insertion_weights_and_finish_s": total - loop_times[name][0]}
    if len(models) > 1:
        reference = amax_buffers(models[args.variants[0]])
        result["amax_identical_across_variants"] = all(
            reference.keys() == amax_buffers(other).keys()
            and all(torch.equal(reference[key], value) for key, value in amax_buffers(other).items())
            for other in list(models.values())[1:])
    quant_model = models.pop(args.variants[-1])
    del models
    if device == "cuda":
        torch.cuda.empty_cache()

    plain_times, calibrate_times = [], {name: [] for name in args.variants}
    for _ in range(args.repeats):
        plain_times.append(timed(device, plain_pass, plain_model, batches))
        for name in args.variants:
            calibrate_times[name].append(timed(device, mtq.calibrate, quant_model, "max", loops[name]))
    plain = min(plain_times)
    result.update(format=format_name, batch_size=batch_size, plain_forward_s=plain, plain_forward_all_s=plain_times,
                  batches=len(batches), padded_tokens=sum(ids.numel() for ids, _ in batches),
                  parameters=sum(p.numel() for p in plain_model.parameters()))
    for name in args.variants:
        warm = min(loop_times[name][1:])
        cold = result["cold"][name]["quantize_total_s"]
        result["warm"][name] = {"pass_s": warm, "pass_all_s": loop_times[name][1:],
                                "calibrate_total_s": min(calibrate_times[name])}
        result[f"ratio_warm_pass_vs_forward_{name}"] = warm / plain
        result[f"ratio_cold_quantize_vs_forward_{name}"] = cold / plain
        result[f"ratio_warm_calibrate_total_vs_forward_{name}"] = min(calibrate_times[name]) / plain

    from modelopt.torch.quantization.model_calib import (
        enable_stats_collection,
        finish_stats_collection,
        weight_only_quantize,
    )

    # Counted and profiled passes run over the first (longest) batches only: the profiler's post-processing of a
    # full ModelOpt pass on an 8B model (~10^6 events) would take minutes.
    sample_order = sorted(range(len(calibration_set.samples)), key=lambda i: -len(calibration_set.samples[i]))
    subset = dataclasses.replace(calibration_set, samples=[
        calibration_set.samples[i] for i in sample_order[: args.profile_batches * batch_size]])
    sub_batches = batches[: args.profile_batches]

    def calibration_pass(name):
        """One pass in the state ModelOpt's max_calibrate runs our loop in."""
        loop = make_forward_loop(subset, batch_size, pad_id, console=None, **VARIANTS[name])

        def run():
            loop(quant_model)
        return run

    enable_stats_collection(quant_model)
    weight_only_quantize(quant_model)
    with OpCounter(device) as counter:
        plain_pass(plain_model, sub_batches)
    result["counts"]["plain"] = counter.summary(len(sub_batches))
    for name in args.variants:
        with OpCounter(device) as counter:
            calibration_pass(name)()
        result["counts"][name] = counter.summary(len(sub_batches))
    result["counts"]["batches"] = result["profile"]["batches"] = len(sub_batches)
    if not args.no_profile:
        result["profile"]["plain"] = profile_pass(device, lambda: plain_pass(plain_model, sub_batches))
        for name in args.variants:
            result["profile"][name] = profile_pass(device, calibration_pass(name))
    finish_stats_collection(quant_model)
    if device == "cuda":
        result["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
    return result  # the models go with this frame; main() empties the CUDA cache


def device_description(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}"


def print_table(console, results: dict) -> None:
    from rich.table import Table

    table = Table(title=f"calibration vs plain bf16 forward — {results['device']}, {results['model_shape']} "
                        f"({results['parameters'] / 1e6:.1f}M params), {results['samples']} samples / {results['tokens']} tokens")
    for column in ("format", "batch", "variant", "plain s", "cold s", "cold x", "warm s", "warm x", "syncs/batch"):
        table.add_column(column, justify="right")
    for row in results["runs"]:
        for name, warm in row["warm"].items():
            table.add_row(row["format"], str(row["batch_size"]), name, f"{row['plain_forward_s']:.3f}",
                          f"{row['cold'][name]['quantize_total_s']:.3f}", f"{row[f'ratio_cold_quantize_vs_forward_{name}']:.2f}x",
                          f"{warm['pass_s']:.3f}", f"{row[f'ratio_warm_pass_vs_forward_{name}']:.2f}x",
                          f"{row['counts'].get(name, {}).get('host_syncs_per_batch', 0):.1f}")
    console.print(table)


def write_json(path: str, results: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    from foundation.provenance import library_versions
    from quantize.calibration import build_calibration_set

    args = parse_args(argv)
    console = Console()
    tokenizer = bench_tokenizer()
    calibration_set = build_calibration_set(args.mix, tokenizer, max_samples=args.max_samples,
                                            max_seq_len=args.max_seq_len, console=Console(stderr=True, quiet=True))
    pad_id = tokenizer.pad_token_id
    results = {
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join([str(Path(sys.argv[0]))] + (sys.argv[1:] if argv is None else argv)),
        "device": device_description(args.device), "model_shape": args.model, "model_config": MODEL_SHAPES[args.model],
        "mix": args.mix, "samples": len(calibration_set.samples), "tokens": calibration_set.num_tokens,
        "batch_sizes": args.batch_sizes, "variants": {name: VARIANTS[name] for name in args.variants},
        "libraries": library_versions(), "runs": [], "summary": [],
    }
    for format_name in [name.strip() for name in args.formats.split(",") if name.strip()]:
        for batch_size in args.batch_sizes:
            run = measure_format(args, format_name, batch_size, calibration_set, pad_id)
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            results["runs"].append(run)
            results["parameters"] = run["parameters"]
            results["summary"].append({"format": format_name, "batch_size": batch_size, **{
                key: value for key, value in run.items() if key.startswith("ratio_") or key == "amax_identical_across_variants"}})
            if args.out:  # what is measured so far survives a later failure or timeout
                write_json(args.out, results)
    print_table(console, results)
    if args.out:
        write_json(args.out, results)
        console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
