"""NVFP4 weight-only matmul (checkpoint_formats.nvfp4_matmul) against bf16 F.linear, on one GPU.

For each weight shape (N, K) and token count M it checks the result against
dequantize-then-fp32-matmul and times ours against F.linear with the weight
already dequantized to bf16: GPU time from CUDA-graph replay with the L2
flushed before each replay (median of 50), and eager time from
triton.testing.do_bench (median), which includes host launch overhead. Error metric: max |out - ref| / max |ref|, ref = x.float() @ W.float().T;
it is reported for our bf16 output, for the bf16 baseline (both include the
output's bf16 rounding, up to 2^-9 of an element) and, on the decode path,
for our kernel writing fp32 (the kernel's own error). ``--sweep`` also times
candidate decode launch shapes and a fused prefill kernel, to tune the
heuristics in the module.

    PYTHONPATH=. python bench/nvfp4_matmul_bench.py --out bench/nvfp4_matmul_gpu.json [--sweep]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from checkpoint_formats import nvfp4
from checkpoint_formats import nvfp4_matmul as mm

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (768, 2048), (2048, 768)]  # (N=out, K=in)
TOKENS = [1, 4, 16, 64, 128, 2048, 4096]
SWEEP_TOKENS = [1, 4, 16, 64, 128]
PREFILL_CONFIG = mm.KernelConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)


def _eager_ms(fn) -> float:
    """Eager time: includes host launch overhead where it exceeds the GPU work."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=10, rep=40, return_mode="median"))


_FLUSH: list[torch.Tensor] = []


def _gpu_ms(fn, reps: int = 50) -> float:
    """GPU time of ``fn`` replayed from a CUDA graph, L2 flushed before each replay, median."""
    if not _FLUSH:
        _FLUSH.append(torch.empty(256 << 20, dtype=torch.int8, device="cuda"))
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    events = []
    for _ in range(reps + 5):
        _FLUSH[0].zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) for start, end in events[5:])
    return times[len(times) // 2]


def _error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).abs().max() / ref.abs().max())


def _weights(n: int, k: int) -> tuple[nvfp4.NVFP4Weight, torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(n * 7 + k)
    q = nvfp4.quantize_weight(torch.randn(n, k, device="cuda", generator=gen) * 0.02)
    return q, nvfp4.dequantize_weight(q, torch.float32), nvfp4.dequantize_weight(q, torch.bfloat16)


def measure_shape(n: int, k: int) -> list[dict]:
    """The public nvfp4_linear (its own dispatch) against bf16 F.linear, every M."""
    q, w32, w16 = _weights(n, k)
    args = (q.packed, q.weight_scale, q.weight_scale_2)
    exact = bool(torch.equal(mm.dequantize(*args, torch.bfloat16), w16))
    rows = []
    for m in TOKENS:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ w32.T
        ours = mm.nvfp4_linear(x, *args)
        row = {
            "n": n, "k": k, "m": m,
            "path": "decode" if m <= mm.DECODE_MAX_M else "prefill",
            "ours_ms": _gpu_ms(lambda x=x: mm.nvfp4_linear(x, *args)),
            "bf16_ms": _gpu_ms(lambda x=x: F.linear(x, w16)),
            "ours_eager_ms": _eager_ms(lambda x=x: mm.nvfp4_linear(x, *args)),
            "bf16_eager_ms": _eager_ms(lambda x=x: F.linear(x, w16)),
            "err": _error(ours, ref),
            "err_bf16_baseline": _error(F.linear(x, w16), ref),
            "dequant_bf16_bit_exact": exact,
        }  # fmt: skip
        if m <= mm.DECODE_MAX_M:
            config = mm.decode_config(m, n, k, mm._sm_count(x.device))
            row["config"] = config.__dict__
            row["err_fp32_out"] = _error(mm.fused_matmul(x, *args, None, config, torch.float32), ref)
        row["speedup"] = row["bf16_ms"] / row["ours_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(3, 5, k, device="cuda", dtype=torch.bfloat16)
    biased = mm.nvfp4_linear(x, *args, bias)
    rows.append({"n": n, "k": k, "check": "3-D x with bias", "err": _error(biased, x.float() @ w32.T + bias.float())})
    return rows


def _decode_candidates(m: int, k: int):
    block_m = 16 if m <= 16 else 64 if m <= 64 else 128
    warps, stages = (8, 3) if block_m == 128 else (4, 4)
    for block_n, split in itertools.product((32, 64, 128), (1, 2, 4, 8)):
        if k // (128 * split) >= 2:
            yield mm.KernelConfig(block_m, block_n, 128, split, warps, stages)


def sweep_shape(n: int, k: int, deadline: float) -> list[dict]:
    """Every candidate decode launch shape, and the fused kernel at prefill sizes, timed."""
    q, w32, _ = _weights(n, k)
    args = (q.packed, q.weight_scale, q.weight_scale_2)
    rows = []
    for m in SWEEP_TOKENS:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        timed = []
        for config in _decode_candidates(m, k):
            if time.monotonic() > deadline:
                return rows
            timed.append((_gpu_ms(lambda x=x, config=config: mm.fused_matmul(x, *args, None, config)), config.__dict__))
        timed.sort(key=lambda t: t[0])
        rows.append({"n": n, "k": k, "m": m, "best": timed[:5], "worst_ms": timed[-1][0]})
        print(json.dumps(rows[-1]), flush=True)
    x = torch.randn(2048, k, device="cuda", dtype=torch.bfloat16)
    out = mm.fused_matmul(x, *args, None, PREFILL_CONFIG)
    rows.append({
        "n": n, "k": k, "m": 2048, "fused_prefill": PREFILL_CONFIG.__dict__,
        "ms": _gpu_ms(lambda: mm.fused_matmul(x, *args, None, PREFILL_CONFIG)),
        "dequant_then_cublas_ms": _gpu_ms(lambda x=x: mm.nvfp4_linear(x, *args)),
        "dequant_only_ms": _gpu_ms(lambda: mm.dequantize(*args, torch.bfloat16)),
        "err": _error(out, x.float() @ w32.T),
    })  # fmt: skip
    print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("nvfp4_matmul_gpu.json"))
    parser.add_argument("--sweep", action="store_true", help="also time candidate launch shapes (tuning)")
    parser.add_argument("--sweep-budget-s", type=float, default=150.0)
    parser.add_argument("--skip-main", action="store_true")
    args = parser.parse_args()
    if not mm.available("cuda"):
        sys.exit("needs Triton and a CUDA GPU of sm_80+")
    import triton

    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "command": " ".join(sys.argv),
        "error_metric": "max|out - ref| / max|ref|, ref = x.float() @ dequantize_weight(fp32).T",
        "timing": "*_ms: CUDA-graph replay, L2 flushed, median of 50; *_eager_ms: triton.testing.do_bench median; bf16 x",
        "results": [],
        "sweep": [],
    }

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")

    if not args.skip_main:
        for n, k in SHAPES:
            report["results"] += measure_shape(n, k)
            save()
    if args.sweep:
        deadline = time.monotonic() + args.sweep_budget_s
        for n, k in SHAPES:
            report["sweep"] += sweep_shape(n, k, deadline)
            save()
    save()


if __name__ == "__main__":
    main()
