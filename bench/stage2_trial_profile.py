"""Bench (GPU): where one stage-2 trial's time and GPU memory go, on a packed NVFP4 8B-shaped checkpoint.

Why: `stage2_gpu_vs_heretic.py` gives one number per trial; to make a trial faster one needs its parts. This
writes the 8B-shaped NVFP4 checkpoint directly in ModelOpt's layout (the 70B bench's writer: random codes,
sane scales; no stage 1 needed), then runs the real `abliterate` CLI in this process with timers (CUDA-synced)
around each part of a trial: the edit (`LoraAbliterator.apply`), the harmful generation and the harmless KL
pass (`Evaluator`'s two calls), each static decoder's prefill + decode loop and graph capture, plus GPU memory
peaks per phase; one trial (`--profile_trial`) also runs under `torch.profiler` (top kernels by GPU time).
Writes `--out` (JSON) and, next to it, the profiler table and `torch.cuda.memory_summary()`.

Device, one line (carry [".whl"]):

    pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site:. python bench/stage2_trial_profile.py --work /tmp/prof --out $OUT/stage2_trial_profile.json

CPU smoke test here: `.venv/bin/python bench/stage2_trial_profile.py --size tiny --work /tmp/proftiny --out /tmp/proftiny/p.json`
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

# The CLI sets this itself, but this process touches CUDA (the checkpoint writer) before the CLI runs, and the
# allocator reads it at its first allocation: without it here the reserved memory would not be the CLI's.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO))

import stage2_70b_shaped as writer_bench  # noqa: E402
import stage2_gpu_vs_heretic as common  # noqa: E402

SIZES = {"8b": {**common.SIZES["8b"], "vocab_size": 1024}, "tiny": writer_bench.SIZES["tiny"]}


class Recorder:
    """Synchronized wall times and GPU memory peaks of named calls, per trial."""

    def __init__(self, torch) -> None:
        self.torch = torch
        self.cuda = torch.cuda.is_available()
        self.events: list[dict] = []
        self.evaluate_calls = 0
        self.open_peaks: list[int] = []  # running GPU peaks of the calls now open, innermost last

    def enter(self) -> None:
        """Start a call's own GPU peak; the enclosing calls keep theirs (nested timers share one counter)."""
        if self.cuda:
            if self.open_peaks:
                self.open_peaks[-1] = max(self.open_peaks[-1], self.torch.cuda.max_memory_allocated())
            self.open_peaks.append(self.torch.cuda.memory_allocated())
            self.torch.cuda.reset_peak_memory_stats()

    def leave(self, event: dict) -> None:
        if self.cuda:
            peak = max(self.open_peaks.pop(), self.torch.cuda.max_memory_allocated())
            if self.open_peaks:
                self.open_peaks[-1] = max(self.open_peaks[-1], peak)
            event["gpu_allocated_bytes"] = self.torch.cuda.memory_allocated()
            event["gpu_reserved_bytes"] = self.torch.cuda.memory_reserved()  # where the reserved memory grows
            free, total = self.torch.cuda.mem_get_info()  # the device's whole use: minus reserved, what torch does not see
            event["device_used_bytes"] = total - free
            event["peak_gpu_allocated_bytes"] = peak

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def wrap(self, owner, name: str, label: str, describe=None):
        original = getattr(owner, name)
        recorder = self

        def timed(*args, **kwargs):
            recorder.sync()
            recorder.enter()
            started = time.perf_counter()
            result = original(*args, **kwargs)
            recorder.sync()
            event = {"what": label, "seconds": time.perf_counter() - started, "evaluate_call": recorder.evaluate_calls}
            if describe:
                event.update(describe(args, kwargs, result))
            recorder.leave(event)
            recorder.events.append(event)
            return result

        setattr(owner, name, timed)


def _decoder_facts(args, kwargs, result) -> dict:
    decoder, batch = args[0], args[1]
    return {"batch": decoder.batch, "prompt_len": int(batch.input_ids.shape[1]), "cache_len": decoder.cache_len,
            "steps": int(result.shape[1])}


def _prompt_count(args, kwargs, result) -> dict:
    return {"prompts": len(result) if isinstance(result, list) else None, "max_new_tokens": kwargs.get("max_new_tokens")}


def _profile_nth_apply(owner, call: int, recorder: Recorder, out_dir: Path) -> None:
    """The ``call``-th edit.apply (the one before the profiled evaluate) under torch.profiler, sorted by host time:
    the edit's factors are many small launches and host round trips, so its cost is where the host waits."""
    original, calls = owner.apply, [0]

    def apply(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] != call - 1:
            return original(self, *args, **kwargs)
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if recorder.cuda else [])
        with profile(activities=activities) as prof:
            result = original(self, *args, **kwargs)
            recorder.sync()
        (out_dir / "stage2_trial_profile_apply.txt").write_text(
            prof.key_averages().table(sort_by="cpu_time_total", row_limit=40, max_name_column_width=70)
            + "\n" + prof.key_averages().table(sort_by="cuda_time_total" if recorder.cuda else "self_cpu_time_total",
                                                row_limit=25, max_name_column_width=70))
        return result

    owner.apply = apply


def install(recorder: Recorder, profile_call: int, out_dir: Path) -> None:
    """Timers around the trial's parts; the ``profile_call``-th evaluate() runs under torch.profiler."""
    torch = recorder.torch
    from abliterate import direction_store
    from abliterate.edits import lora
    from abliterate.evaluation import evaluator, static_decode

    recorder.wrap(direction_store, "prompt_residuals", "residuals")  # before the trials: where the run's peak can be
    recorder.wrap(lora.LoraAbliterator, "__init__", "edit.inject")
    recorder.wrap(lora.LoraAbliterator, "apply", "edit.apply")
    _profile_nth_apply(lora.LoraAbliterator, profile_call, recorder, out_dir)
    recorder.wrap(lora.LoraAbliterator, "reset", "edit.reset")
    recorder.wrap(evaluator, "generate_greedy", "generate_greedy", _prompt_count)
    recorder.wrap(evaluator, "continuation_log_probs", "kl.continuation_log_probs")
    recorder.wrap(static_decode.StaticDecoder, "run", "static_decoder.run", _decoder_facts)
    recorder.wrap(static_decode.StaticDecoder, "_capture", "static_decoder.capture")
    recorder.wrap(evaluator.Evaluator, "_find_batch_size", "batch_size_probe")
    recorder.wrap(evaluator.Evaluator, "_count_false_refusals", "false_refusals")
    original = evaluator.Evaluator.evaluate

    def evaluate(self, model, **kwargs):
        recorder.evaluate_calls += 1
        recorder.sync()
        recorder.enter()
        started = time.perf_counter()
        if recorder.evaluate_calls == profile_call:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if recorder.cuda else [])
            with profile(activities=activities) as prof:
                result = original(self, model, **kwargs)
                recorder.sync()
            sort = "cuda_time_total" if recorder.cuda else "cpu_time_total"
            (out_dir / "stage2_trial_profile_kernels.txt").write_text(
                prof.key_averages().table(sort_by=sort, row_limit=150, max_name_column_width=90))
        else:
            result = original(self, model, **kwargs)
        recorder.sync()
        event = {"what": "evaluate", "seconds": time.perf_counter() - started, "evaluate_call": recorder.evaluate_calls,
                 "profiled": recorder.evaluate_calls == profile_call}
        if recorder.cuda:
            event["peak_gpu_reserved_bytes"] = torch.cuda.max_memory_reserved()
        recorder.leave(event)
        recorder.events.append(event)
        return result

    evaluator.Evaluator.evaluate = evaluate


def summarize(events: list[dict]) -> dict:
    """Seconds per part, summed per evaluate() call (call 1 is the unedited model; calls >= 2 are trials)."""
    per_call: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for event in events:
        per_call[event["evaluate_call"]][event["what"]] += event["seconds"]
    return {str(call): dict(parts) for call, parts in sorted(per_call.items())}


def peaks(events: list[dict]) -> dict:
    """The highest GPU allocation inside each part, per evaluate() call (GB): where the process peak comes from."""
    per_call: dict[int, dict[str, float]] = defaultdict(dict)
    for event in events:
        if "peak_gpu_allocated_bytes" in event:
            parts = per_call[event["evaluate_call"]]
            parts[event["what"]] = max(parts.get(event["what"], 0.0), round(event["peak_gpu_allocated_bytes"] / 1e9, 3))
    return {str(call): parts for call, parts in sorted(per_call.items())}


def _route_decode(choose) -> None:
    """The A/B arms' hook: ``choose(m, n, k, x_bytes)`` gives a launch shape, or None for the default dispatch."""
    from checkpoint_formats import nvfp4_matmul

    default = nvfp4_matmul.decode_config

    def decode_config(m: int, n: int, k: int, sm_count: int, x_bytes: int = 2):
        return choose(m, n, k, x_bytes) or default(m, n, k, sm_count, x_bytes)

    nvfp4_matmul.decode_config = decode_config


def use_pipelined_tile() -> None:
    """The A/B arm: M = 17-128 goes to the compiler-pipelined tile (``pipelined_config``) instead of the default."""
    from checkpoint_formats import nvfp4_matmul

    _route_decode(lambda m, n, k, x_bytes: nvfp4_matmul.pipelined_config(m, n, k) if 16 < m <= 128 and x_bytes == 2 else None)


def use_kernel_table(sweep_json: Path) -> dict:
    """The A/B arm: each (M, N, K) that a matmul sweep timed gets that cell's fastest launch shape.

    ``sweep_json`` is bench/nvfp4_matmul_bench.py's output (``--sweep --sweep-cells``); other shapes keep the
    default dispatch. Returns the table used, for the result file.
    """
    import dataclasses

    from checkpoint_formats import nvfp4_matmul

    fields = {f.name for f in dataclasses.fields(nvfp4_matmul.KernelConfig)}
    table = {}
    for row in json.loads(sweep_json.read_text())["sweep"]:
        timed = [t for t in row.get("timed", []) if t[0] is not None]
        if timed:
            table[(row["m"], row["n"], row["k"])] = nvfp4_matmul.KernelConfig(**{f: v for f, v in timed[0][1].items() if f in fields})
    _route_decode(lambda m, n, k, x_bytes: table.get((m, n, k)) if x_bytes == 2 else None)
    return {f"{m}:{n}x{k}": config.__dict__ for (m, n, k), config in table.items()}


_OWN_CODE = ("/abliterate/", "/checkpoint_formats/", "/transformers/", "/peft/", "/bench/")


def _site(frames: list[dict]) -> str:
    """The innermost frame in our code or the model libraries' (``file:line function``), where an allocation came from."""
    for frame in frames:
        name = frame.get("filename", "")
        if any(part in name for part in _OWN_CODE):
            return f"{name.split('/site-packages/')[-1].split('/work/')[-1]}:{frame.get('line')} {frame.get('name')}"
    return "(no project frame)"


def reserved_by_pool(snapshot: dict) -> list[dict]:
    """Reserved and allocated bytes per memory pool at the end of the run (the default pool is (0, 0); CUDA
    graphs' private pools have their own ids).

    Why: reserved memory above the allocated is either free blocks the default pool cannot hand out (holes) or
    memory kept by a captured graph's pool; the summary does not say which."""
    pools: dict[str, dict] = {}
    for segment in snapshot["segments"]:
        pool = pools.setdefault(str(tuple(segment.get("segment_pool_id", (0, 0)))), {
            "segments": 0, "reserved_bytes": 0, "allocated_bytes": 0, "largest_free_block_bytes": 0})
        pool["segments"] += 1
        pool["reserved_bytes"] += segment["total_size"]
        pool["allocated_bytes"] += segment["allocated_size"]
        free = [block["size"] for block in segment["blocks"] if block["state"] == "inactive"]
        pool["largest_free_block_bytes"] = max([pool["largest_free_block_bytes"], *free])
    return [{"pool": pool, **facts} for pool, facts in sorted(pools.items(), key=lambda item: -item[1]["reserved_bytes"])]


def memory_at_peak(snapshot: dict, max_entries: int, top: int = 25) -> dict:
    """Replay the allocator's trace: the live allocations at the highest allocated total, grouped by site (GB).

    Why: the process peak is a moment, and ``memory_summary`` says how much but not whose; this names the
    tensors that stand at that moment (the weights, the KV caches, the graph pools' blocks, the transients).
    """
    events = [event for trace in snapshot["device_traces"] for event in trace]
    live: dict[int, tuple[int, str]] = {}
    total = peak = 0
    at_peak: dict[int, tuple[int, str]] = {}
    for event in events:
        action = event["action"]
        if action == "alloc":
            live[event["addr"]] = (event["size"], _site(event.get("frames", [])))
            total += event["size"]
            if total > peak:
                peak, at_peak = total, dict(live)
        elif action == "free_completed" and event["addr"] in live:
            total -= live.pop(event["addr"])[0]
    sites: dict[str, int] = defaultdict(int)
    for size, site in at_peak.values():
        sites[site] += size
    ranked = sorted(sites.items(), key=lambda item: -item[1])
    return {"events": len(events), "trace_complete": len(events) < max_entries, "peak_gb": round(peak / 1e9, 3),
            "sites_gb": {site: round(size / 1e9, 4) for site, size in ranked[:top]},
            "rest_gb": round(sum(size for _, size in ranked[top:]) / 1e9, 4)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="8b")
    parser.add_argument("--work", type=Path, default=Path("/tmp/stage2_profile"))
    parser.add_argument("--out", type=Path, default=BENCH / "stage2_trial_profile.json")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--profile_trial", type=int, default=2, help="which trial runs under torch.profiler (0: none)")
    parser.add_argument("--max_new_tokens", type=int, default=100)
    parser.add_argument("--max_test_prompts", type=int, default=100)
    parser.add_argument("--kernel", choices=("default", "pipelined"), default="default",
                        help="decode tile for M = 17-128 (an A/B of the two in one run on one machine)")
    parser.add_argument("--kernel_table", type=Path, default=None,
                        help="a matmul sweep JSON: each swept (M, N, K) uses its fastest launch shape (an A/B arm)")
    parser.add_argument("--step_kernels", choices=("triton", "torch"), default="triton",
                        help="torch: the decode step's attention and RMSNorm as before the Triton kernels (an A/B arm)")
    parser.add_argument("--memory_history", type=int, default=0, metavar="ENTRIES",
                        help="record the allocator's trace (up to ENTRIES events) and name the allocations at the peak")
    parser.add_argument("--sibling_fusion", action="store_true",
                        help="load with checkpoint_formats.sibling_fusion (q/k/v and gate/up in one matmul each)")
    parser.add_argument("--no_lockstep", action="store_true",
                        help="compute each component's edit factors on its own (batched_factors' lockstep off)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more abliterate flags")
    args = parser.parse_args()
    if args.kernel_table and not args.kernel_table.is_file():
        parser.error(f"--kernel_table {args.kernel_table}: no such file (write one with bench/nvfp4_matmul_bench.py --sweep)")
    import torch

    args.work = args.work.resolve()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = SIZES[args.size]
    checkpoint = args.work / "model-nvfp4"
    written = writer_bench.write_checkpoint(checkpoint, shape, shape["num_hidden_layers"], device, seed=0)
    print(f"checkpoint: {written['bytes'] / 1e9:.2f} GB in {written['seconds']:.1f} s", flush=True)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    prompts = common.write_prompts(args.work / "prompts", None, args.max_test_prompts)
    recorder = Recorder(torch)
    if args.kernel == "pipelined":
        use_pipelined_tile()
    kernel_table = use_kernel_table(args.kernel_table) if args.kernel_table else None
    if args.step_kernels == "torch":
        from abliterate.evaluation import decode_attention

        decode_attention.available = lambda device: False  # SDPA and transformers' RMSNorm in the decode step
    if args.no_lockstep:
        from abliterate.edits import lora

        lora.LoraAbliterator._in_place_on_gpu = lambda self, component: False
    install(recorder, args.profile_trial + 1 if args.profile_trial else 0, args.out.parent)
    command = ["abliterate", "--model", str(checkpoint), "--prompts", prompts["spec"], "--n_trials", str(args.trials),
               "--n_startup_trials", str(args.trials), "--max_response_length", str(args.max_new_tokens),
               "--device_map", "auto" if device == "cuda" else "cpu", "--out", str(args.work / "out"),
               "--study_dir", str(args.work / "study"), "--overwrite", "--select", "best_kl_under 0.05", "--no-plot",
               *(["--load_as", "packed"] if device == "cuda" else []), *(["--sibling_fusion"] if args.sibling_fusion else []),
               *args.extra]
    from pipelines.cli import main as cli

    if args.memory_history and device == "cuda":
        torch.cuda.memory._record_memory_history(max_entries=args.memory_history, stacks="python")
    started = time.perf_counter()
    try:
        code = cli(command)
    except SystemExit as exit_:
        code = exit_.code
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "gpu": common.gpu_name(), "versions": common.versions(),
        "command": "python bench/stage2_trial_profile.py " + " ".join(sys.argv[1:]), "cli": command, "exit_code": code,
        "cli_seconds": time.perf_counter() - started, "checkpoint": written, "per_evaluate_call": summarize(recorder.events),
        "peak_gb_per_evaluate_call": peaks(recorder.events), "kernel": args.kernel, "step_kernels": args.step_kernels,
        "kernel_table": kernel_table, "sibling_fusion": args.sibling_fusion, "lockstep": not args.no_lockstep,
        "events": recorder.events,
    }
    if device == "cuda":
        result["peak_gpu_allocated_bytes"] = torch.cuda.max_memory_allocated()
        result["reserved_by_pool"] = reserved_by_pool(torch.cuda.memory._snapshot())
        (args.out.parent / "stage2_trial_profile_memory.txt").write_text(torch.cuda.memory_summary())
        if args.memory_history:
            result["memory_at_peak"] = memory_at_peak(torch.cuda.memory._snapshot(), args.memory_history)
            torch.cuda.memory._record_memory_history(enabled=None)
            print(json.dumps(result["memory_at_peak"], indent=1), flush=True)
    args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    for call, parts in result["per_evaluate_call"].items():
        print(call, {name: round(seconds, 3) for name, seconds in parts.items()}, flush=True)
    return 0 if code in (0, None) else 1


if __name__ == "__main__":
    sys.exit(main())
