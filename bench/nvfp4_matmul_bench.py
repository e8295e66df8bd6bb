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
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from checkpoint_formats import nvfp4
from checkpoint_formats import nvfp4_launch_shapes as shapes
from checkpoint_formats import nvfp4_matmul as mm
from checkpoint_formats import split_k_workspace

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (1024, 4096), (768, 2048), (2048, 768)]  # (N=out, K=in)
TOKENS = [1, 4, 16, 64, 100, 128, 2048, 4096]
SWEEP_TOKENS = [1, 4, 16, 64, 128]
PREFILL_CONFIG = mm.KernelConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)


def _eager_ms(fn) -> float:
    """Eager time: includes host launch overhead where it exceeds the GPU work."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=10, rep=40, return_mode="median"))


_FLUSH: list[torch.Tensor] = []


_CAPTURE: list[torch.cuda.Stream] = []


def _gpu_ms(fn, reps: int = 50) -> float:
    """GPU time of ``fn`` replayed from a CUDA graph, L2 flushed before each replay, median.

    The warm-up runs on the capture stream, as the static decoder's does: a split-K launch finds that stream's
    self-cleaning workspace there (``split_k_workspace`` hands none out during a capture), so the graph holds the
    one-launch path. Until 2026-12-03 the warm-up ran on the default stream and every split-K row timed the
    zero-fill-and-cast fallback instead.
    """
    if not _FLUSH:
        _FLUSH.append(torch.empty(256 << 20, dtype=torch.int8, device="cuda"))
        _CAPTURE.append(torch.cuda.Stream())
    stream = _CAPTURE[0]
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
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


def measure_shape(n: int, k: int, tokens: list[int] = TOKENS) -> list[dict]:
    """The public nvfp4_linear (its own dispatch) against bf16 F.linear, at each M of ``tokens``."""
    q, w32, w16 = _weights(n, k)
    args = (q.packed, q.weight_scale, q.weight_scale_2)
    exact = bool(torch.equal(mm.dequantize(*args, torch.bfloat16), w16))
    rows = []
    for m in tokens:
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
            if config.split_k > 1:  # A/B in this run: the same launch shape with zero fill + cast kernels
                with mock.patch.object(split_k_workspace, "workspace_for", lambda *unused: None):
                    row["ours_fill_and_cast_ms"] = _gpu_ms(lambda x=x: mm.fused_matmul(x, *args, None, config))
        row["err_after_replays"] = _error(mm.nvfp4_linear(x, *args), ref)  # a dirty split-K workspace would show
        row["split_k_workspaces_clean"] = all(
            not (w.sums.any() or w.arrivals.any()) for w in split_k_workspace._current.values())
        row["speedup"] = row["bf16_ms"] / row["ours_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(3, 5, k, device="cuda", dtype=torch.bfloat16)
    biased = mm.nvfp4_linear(x, *args, bias)
    rows.append({"n": n, "k": k, "check": "3-D x with bias", "err": _error(biased, x.float() @ w32.T + bias.float())})
    return rows


def dtype_checks() -> list[dict]:
    """The dispatch's decode kernels on fp16 and fp32 x too (bf16 is the main table), with bias, odd N and K."""
    rows = []
    for (n, k), dtype, m in itertools.product([(4096, 4096), (200, 784)], (torch.float16, torch.float32), (1, 3, 16, 100)):
        q, w32, _ = _weights(n, k)
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        bias = torch.randn(n, device="cuda", dtype=dtype)
        out = mm.nvfp4_linear(x, q.packed, q.weight_scale, q.weight_scale_2, bias)
        config = mm.decode_config(m, n, k, mm._sm_count(x.device))
        rows.append({"n": n, "k": k, "m": m, "dtype": str(dtype), "config": config.__dict__,
                     "err": _error(out, x.float() @ w32.T + bias.float())})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _decode_candidates(m: int, k: int, kinds: frozenset[str]):
    """Launch shapes to time at M tokens: CUDA-core GEMV (tiny M), tensor-core dot variants, split K or not."""
    C = mm.KernelConfig
    if "dot" in kinds:
        yield from _hand_prefetched_candidates(m)
    if "pipelined" in kinds:
        bm = max(16, shapes.next_pow2(m))
        tiles = [(16, 256), (32, 128), (32, 256), (64, 128), (64, 64)] if bm == 16 else [(32, 128), (64, 64), (64, 128), (128, 64)]
        for (bn, bk), stages, split in itertools.product(tiles, (3, 4, 5), (1, 2, 4)):
            warps = 8 if bm * bn >= 128 * 64 else 4
            yield C(bm, bn, bk, split, warps, stages, kernel="pipelined")
    if "swap" in kinds:
        yield from _swap_candidates(m)
    if "wide_swap" in kinds:
        yield from _wide_swap_candidates(m)
    if "wgmma" in kinds:
        yield from _wgmma_candidates(m)


def _wgmma_candidates(m: int):
    """The Gluon tile (codes decoded into the wgmma fragment, copies in a ring STAGES deep, the MMA left in flight):
    BLOCK_N and BLOCK_K 64 or 128, ring depths that fit in shared memory, split K (8 too at M <= 16, where the
    2026-12-03 sweeps' winners on square and wide weights took the largest split offered, 4)."""
    bm = max(16, shapes.next_pow2(m))
    splits = (1, 2, 4, 8) if m <= 16 else (1, 2, 4)
    for bn, bk, stages, split in itertools.product((128, 64), (64, 128), (3, 4, 6), splits):
        if stages * shapes.wgmma_stage_bytes(bm, bn, bk) <= shapes.WGMMA_SHARED_BYTES:
            yield mm.KernelConfig(bm, bn, bk, split, bn // 16, stages, kernel="wgmma")


def _swap_candidates(m: int):
    """out^T = W x^T (the decoded weight as the MMA's register operand), hand-prefetched and pipelined."""
    C = mm.KernelConfig
    bm = max(16, shapes.next_pow2(m))
    for bn, bk, split in itertools.product((64, 128), (64, 128), (1, 2, 4)):
        warps = 4 if bn == 64 else 8
        yield C(bm, bn, bk, split, warps, 3, kernel="dot", join=True, swap=True)
        yield C(bm, bn, bk, split, warps, 4, kernel="pipelined", swap=True)


def _wide_swap_candidates(m: int):
    """A wider swap space around the first sweep's winners (BLOCK_N to 256, BLOCK_K down to 32, 4 or 8 warps)."""
    C = mm.KernelConfig
    bm = max(16, shapes.next_pow2(m))
    for (bn, warps), bk, split in itertools.product(((64, 4), (128, 4), (128, 8), (256, 8)), (32, 64, 128), (1, 2, 4)):
        yield C(bm, bn, bk, split, warps, 3, kernel="dot", join=True, swap=True)
    for bn, bk, split, stages in itertools.product((128, 256), (64, 128), (1, 2, 4), (3, 5)):
        yield C(bm, bn, bk, split, 8, stages, kernel="pipelined", swap=True)


def _hand_prefetched_candidates(m: int):
    """The hand-prefetched kernels' launch shapes (the sweep that tuned ``decode_config``)."""
    C = mm.KernelConfig
    if m <= 4:
        bm = shapes.next_pow2(m)
        for bn, bk, split in [(16, 1024, 1), (16, 1024, 2), (16, 1024, 4), (16, 512, 4), (16, 256, 1),
                              (32, 512, 2), (32, 512, 4), (8, 1024, 1), (8, 512, 2)]:  # fmt: skip
            yield C(bm, bn, bk, split, kernel="gemv")
    if m <= 16:
        for bn, bk, split in [(16, 512, 1), (16, 512, 2), (16, 256, 1), (16, 256, 2), (16, 256, 4), (32, 256, 2),
                              (32, 128, 1), (32, 128, 4)]:  # fmt: skip
            yield C(16, bn, bk, split, kernel="dot", join=True)
    elif m <= 64:
        for bn, bk, split in [(32, 128, 1), (32, 128, 2), (32, 128, 4), (16, 128, 2), (32, 256, 2)]:
            yield C(64, bn, bk, split, kernel="dot", join=True)
    else:
        for bn, bk, split in [(32, 128, 1), (32, 128, 2), (32, 128, 4), (64, 128, 2), (16, 128, 2)]:
            yield C(128, bn, bk, split, 8, kernel="dot", join=True)
        yield C(64, 32, 128, 2, 4, kernel="dot", join=True)


def sweep_cell(n: int, k: int, m: int, deadline: float, kinds: frozenset[str]) -> dict | None:
    """Every candidate decode launch shape at (N, K, M) (error: fp32 output vs the fp32 reference), timed
    against bf16; the dispatch's own choice first. None when the deadline passed before any was timed."""
    q, w32, w16 = _weights(n, k)
    args = (q.packed, q.weight_scale, q.weight_scale_2)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ w32.T
    timed = []
    chosen = mm.decode_config(m, n, k, mm._sm_count(x.device))
    candidates = [chosen] + [c for c in _decode_candidates(m, k, kinds) if c != chosen]
    for config in candidates:
        if time.monotonic() > deadline:
            break
        try:
            err = _error(mm.fused_matmul(x, *args, None, config, torch.float32), ref)
            ms = _gpu_ms(lambda x=x, config=config: mm.fused_matmul(x, *args, None, config))
        except Exception as exc:  # a candidate that fails to compile is reported, not fatal
            timed.append((None, config.__dict__, repr(exc)[:300]))
            continue
        timed.append((ms, {**config.__dict__, "dispatch": config == chosen}, err))
    if not timed:
        return None
    timed.sort(key=lambda t: float("inf") if t[0] is None else t[0])
    row = {"n": n, "k": k, "m": m, "bf16_ms": _gpu_ms(lambda x=x: F.linear(x, w16)), "timed": timed}
    print(json.dumps({**row, "timed": timed[:3]}), flush=True)
    return row


def sweep_shape(n: int, k: int, deadline: float, kinds: frozenset[str], skip_prefill: bool = True) -> list[dict]:
    """``sweep_cell`` at every SWEEP_TOKENS M, then (unless skipped) the fused prefill kernel at M = 2048."""
    rows = [row for m in SWEEP_TOKENS if (row := sweep_cell(n, k, m, deadline, kinds)) is not None]
    if skip_prefill:
        return rows
    q, w32, _ = _weights(n, k)
    args = (q.packed, q.weight_scale, q.weight_scale_2)
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


def _cell(text: str) -> tuple[int, int, int]:
    """'100:14336x4096' -> (M, N, K); ValueError otherwise."""
    m, nk = text.split(":")
    n, k = nk.split("x")
    return int(m), int(n), int(k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("nvfp4_matmul_gpu.json"))
    parser.add_argument("--sweep", action="store_true", help="also time candidate launch shapes (tuning)")
    parser.add_argument("--sweep-budget-s", type=float, default=150.0)
    parser.add_argument("--skip-main", action="store_true")
    parser.add_argument("--sweep-kernels", default="dot,pipelined", help="comma list of dot (hand-prefetched, GEMV), pipelined, swap (W as the MMA's first operand), wide_swap and wgmma")
    parser.add_argument("--sweep-first", action="store_true", help="run the sweep before the main table")
    parser.add_argument("--sweep-cells", default="",
                        help="M:NxK,... swept in this order instead of every shape at SWEEP_TOKENS (e.g. 100:14336x4096)")
    parser.add_argument("--shapes", default="", help="NxK,... of the main table (default: all of SHAPES)")
    parser.add_argument("--tokens", default="", help="M,... of the main table (default: all of TOKENS)")
    args = parser.parse_args()
    try:
        cells = [_cell(text) for text in args.sweep_cells.split(",")] if args.sweep_cells else []
    except ValueError:
        parser.error(f"--sweep-cells {args.sweep_cells!r}: write M:NxK cells separated by commas, e.g. 100:14336x4096,16:4096x4096")
    try:
        shapes_main = [tuple(int(v) for v in text.split("x")) for text in args.shapes.split(",")] if args.shapes else SHAPES
        tokens_main = [int(text) for text in args.tokens.split(",")] if args.tokens else TOKENS
        if any(len(shape) != 2 for shape in shapes_main):
            raise ValueError
    except ValueError:
        parser.error(f"--shapes {args.shapes!r} / --tokens {args.tokens!r}: write e.g. --shapes 4096x4096,14336x4096 --tokens 4,16,100")
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

    def sweep() -> None:
        deadline = time.monotonic() + args.sweep_budget_s
        kinds = frozenset(args.sweep_kernels.split(","))
        if args.sweep_cells:
            for m, n, k in cells:
                if (row := sweep_cell(n, k, m, deadline, kinds)) is not None:
                    report["sweep"].append(row)
                    save()
            return
        for n, k in SHAPES:
            report["sweep"] += sweep_shape(n, k, deadline, frozenset(args.sweep_kernels.split(",")))
            save()

    if args.sweep and args.sweep_first:
        sweep()
    if not args.skip_main:
        report["dtype_checks"] = dtype_checks()
        save()
        for n, k in shapes_main:
            report["results"] += measure_shape(n, k, tokens_main)
            save()
    if args.sweep and not args.sweep_first:
        sweep()
    save()


if __name__ == "__main__":
    main()
