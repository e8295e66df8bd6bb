"""Bench (GPU, Hopper): is the Gluon wgmma decode tile right, call after call, in every launch shape it takes?

Why: the tile streams codes, scales and x through a ring of shared-memory stages filled by asynchronous copies,
with two barriers a step; a stage refilled too early, or a split-K sum read before another split's adds landed,
shows up as a call that is wrong now and then, not in a single call. So each case runs many times on the same
inputs and reports the worst call: the bf16 output's error against an fp32 reference, the fp32 output's largest
difference from the Triton tile's (both sum in K order: rounding only), and whether the split-K workspace was left
clean. Cases cover the ring depths, both tile widths and depths, split K 1-8 (unequal last split), partial
M and N tiles, a bias, and x rows further apart than K; then a LoRA side path added in the epilogue (ranks 1-16,
split and unsplit, the dispatch's own launch shapes), and its time per call against the packed matmul plus
PEFT-style ``addmm`` (both replayed from CUDA graphs, as a trial's decode steps are).

Device: `python bench/nvfp4_wgmma_check.py --out $OUT/nvfp4_wgmma_check_gpu.json`
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from checkpoint_formats import nvfp4, split_k_workspace  # noqa: E402
from checkpoint_formats import nvfp4_matmul as mm  # noqa: E402

# (N, K, M, block_m, block_n, block_k, stages, split_k, bias, extra x columns: rows of x further apart than K)
CASES = [
    (4096, 4096, 100, 128, 128, 64, 4, 4, False, 0),
    (14336, 4096, 100, 128, 128, 64, 6, 1, False, 0),
    (14336, 4096, 128, 128, 64, 128, 3, 2, True, 0),
    (4096, 14336, 100, 128, 64, 64, 4, 3, False, 0),  # unequal splits: 4864, 4864, 4608
    (1024, 4096, 64, 64, 64, 128, 4, 8, False, 0),
    (4096, 4096, 16, 16, 64, 64, 6, 4, True, 0),
    (14336, 4096, 5, 16, 128, 128, 4, 2, False, 0),
    (1000, 4096, 33, 64, 128, 64, 3, 1, True, 0),  # partial N and M tiles
    (4096, 4096, 100, 128, 64, 128, 4, 2, False, 256),  # x a column slice of a wider tensor (stride 4352)
]


def check(case: tuple, calls: int) -> dict:
    n, k, m, bm, bn, bk, stages, split, with_bias, extra = case
    config = mm.KernelConfig(bm, bn, bk, split, bn // 16, stages, kernel="wgmma")
    generator = torch.Generator(device="cuda").manual_seed(n + k + m)
    weight = nvfp4.quantize_weight(torch.randn(n, k, device="cuda", generator=generator) * 0.02)
    args = (weight.packed, weight.weight_scale, weight.weight_scale_2)
    x = torch.randn(m, k + extra, device="cuda", dtype=torch.bfloat16, generator=generator)[:, :k]
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=generator) if with_bias else None
    reference = x.float() @ nvfp4.dequantize_weight(weight, torch.float32).T + (bias.float() if with_bias else 0)
    scale = reference.abs().max()
    triton_tile = mm.KernelConfig(bm, bn, bk, split, bn // 16, 3, kernel="dot", join=True, swap=True)
    triton_fp32 = mm.fused_matmul(x, *args, bias, triton_tile, torch.float32)
    errors = torch.empty(calls, device="cuda")
    fp32_diff = torch.empty(calls, device="cuda")
    for call in range(calls):
        errors[call] = (mm.fused_matmul(x, *args, bias, config).float() - reference).abs().max() / scale
        fp32_diff[call] = (mm.fused_matmul(x, *args, bias, config, torch.float32) - triton_fp32).abs().max()
    workspace = split_k_workspace.workspace_for(x.device, m * n, 1)
    clean = workspace is None or not (workspace.sums.any() or workspace.arrivals.any())
    errors, fp32_diff = errors.cpu(), fp32_diff.cpu()
    return {"n": n, "k": k, "m": m, "config": config.__dict__, "bias": with_bias, "x_stride": x.stride(0),
            "calls": calls,
            "ran_wgmma": mm._wgmma_runs(x, weight.packed, weight.weight_scale),
            "max_error": float(errors.max()), "wrong_calls": int((errors > 0.05).sum()),
            "max_fp32_diff_vs_triton_tile": float(fp32_diff.max()), "workspace_clean": bool(clean)}  # fmt: skip


# (N, K, M, side path rank, split_k or None for the dispatch's own launch shape, bias)
SIDE_CASES = [
    (4096, 4096, 100, 1, None, False),  # o_proj at the harmful batch, as a trial runs it
    (4096, 14336, 100, 1, None, False),  # down_proj
    (4096, 14336, 7, 3, None, True),
    (4096, 4096, 128, 5, 1, False),  # unsplit: the side path in the plain store
    (4096, 14336, 100, 2, 3, True),  # unequal splits: added by split 0 only
    (14336, 4096, 33, 16, 2, False),  # the largest rank, partial M tile
]


def check_side(case: tuple, calls: int) -> dict:
    """The side path in the epilogue: against the fp32 reference x W^T + bias + scaling (x A^T) B^T, call after call."""
    from checkpoint_formats import low_rank_triton

    n, k, m, rank, split, with_bias = case
    generator = torch.Generator(device="cuda").manual_seed(n + k + m + rank)
    weight = nvfp4.quantize_weight(torch.randn(n, k, device="cuda", generator=generator) * 0.02)
    args = (weight.packed, weight.weight_scale, weight.weight_scale_2)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=generator)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=generator) if with_bias else None
    lora_a = torch.randn(rank, k, device="cuda", dtype=torch.bfloat16, generator=generator) * 0.02
    lora_b = torch.randn(n, rank, device="cuda", dtype=torch.bfloat16, generator=generator) * 0.5
    scaling = 0.75
    reference = x.float() @ nvfp4.dequantize_weight(weight, torch.float32).T + (bias.float() if with_bias else 0)
    reference = reference + scaling * (x.float() @ lora_a.float().T) @ lora_b.float().T
    scale = reference.abs().max()
    config = mm.decode_config(m, n, k, mm._sm_count(x.device), 2)
    if split is not None:
        config = mm.KernelConfig(config.block_m, config.block_n, config.block_k, split, config.num_warps,
                                 config.num_stages, kernel="wgmma")  # fmt: skip
    errors = torch.empty(calls, device="cuda")
    for call in range(calls):
        if split is None:
            out = mm.nvfp4_linear_with_side_path(x, *args, bias, lora_a, lora_b, scaling)
        else:
            down = low_rank_triton.down_projection(x, lora_a, scaling)
            out = mm.fused_matmul(x, *args, bias, config, side=(down, lora_b.contiguous()))
        errors[call] = (out.float() - reference).abs().max() / scale
    down = low_rank_triton.down_projection(x, lora_a, scaling).sum(0)
    down_error = (down - scaling * x.float() @ lora_a.float().T).abs().max()
    errors = errors.cpu()
    return {"n": n, "k": k, "m": m, "rank": rank, "config": config.__dict__, "bias": with_bias, "calls": calls,
            "dispatch": split is None, "max_error": float(errors.max()), "wrong_calls": int((errors > 0.05).sum()),
            "down_projection_max_abs_error": float(down_error)}  # fmt: skip


def time_side(n: int, k: int, m: int, rank: int = 1, calls: int = 64, reps: int = 20) -> dict:
    """us per call of the fused side path, of the packed matmul alone, and of the matmul + F.linear + addmm."""
    import torch.nn.functional as F

    generator = torch.Generator(device="cuda").manual_seed(7)
    weight = nvfp4.quantize_weight(torch.randn(n, k, device="cuda", generator=generator) * 0.02)
    args = (weight.packed, weight.weight_scale, weight.weight_scale_2)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=generator)
    lora_a = torch.randn(rank, k, device="cuda", dtype=torch.bfloat16, generator=generator)
    lora_b = torch.randn(n, rank, device="cuda", dtype=torch.bfloat16, generator=generator)

    def fused():
        return mm.nvfp4_linear_with_side_path(x, *args, None, lora_a, lora_b, 1.0)

    def alone():
        return mm.nvfp4_linear(x, *args)

    def addmm():
        return torch.addmm(mm.nvfp4_linear(x, *args), F.linear(x, lora_a), lora_b.T, alpha=1.0)

    times = {}
    for name, fn in (("fused_us", fused), ("matmul_alone_us", alone), ("matmul_plus_addmm_us", addmm)):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(calls):
                fn()
        graph.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times[name] = start.elapsed_time(end) * 1000 / (reps * calls)
    return {"n": n, "k": k, "m": m, "rank": rank, **times}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "nvfp4_wgmma_check_gpu.json")
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        sys.exit("needs a Hopper GPU (sm_90)")
    rows = []
    for case in CASES:
        rows.append(check(case, args.calls))
        print(json.dumps(rows[-1]), flush=True)
    side_rows = []
    for case in SIDE_CASES:
        side_rows.append(check_side(case, args.calls))
        print(json.dumps(side_rows[-1]), flush=True)
    side_times = [time_side(n, k, m) for n, k, m in ((4096, 4096, 100), (4096, 14336, 100), (4096, 4096, 16))]
    for row in side_times:
        print(json.dumps(row), flush=True)
    ok = all(r["ran_wgmma"] and r["wrong_calls"] == 0 and r["workspace_clean"] and r["max_error"] < 1e-2 for r in rows)
    ok = ok and all(r["wrong_calls"] == 0 and r["max_error"] < 1e-2 and r["down_projection_max_abs_error"] < 1e-3
                    for r in side_rows)  # fmt: skip
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "gpu": torch.cuda.get_device_name(),
              "torch": torch.__version__, "command": " ".join(["python"] + sys.argv),
              "wrong": "max|out - ref| / max|ref| > 0.05 (bf16 rounding is ~3e-3)", "all_right": ok, "rows": rows, "side_path_rows": side_rows,
              "side_path_us_per_call": side_times}
    print("all right:", ok)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
