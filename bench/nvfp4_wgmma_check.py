"""Bench (GPU, Hopper): is the Gluon wgmma decode tile right, call after call, in every launch shape it takes?

Why: the tile streams codes, scales and x through a ring of shared-memory stages filled by asynchronous copies,
with two barriers a step; a stage refilled too early, or a split-K sum read before another split's adds landed,
shows up as a call that is wrong now and then, not in a single call. So each case runs many times on the same
inputs and reports the worst call: the bf16 output's error against an fp32 reference, the fp32 output's largest
difference from the Triton tile's (both sum in K order: rounding only), and whether the split-K workspace was left
clean. Cases cover the ring depths, both tile widths and depths, split K 1-8 (unequal last split), partial
M and N tiles, a bias, and x rows further apart than K.

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
# Rows spread over six decades: small rows' block scales are E4M3 subnormals (below 2^-6) and must decode exactly
SPREAD_CASE = (4096, 4096, 16, 16, 64, 128, 4, 1, False, 0)


def check(case: tuple, calls: int, spread: bool = False) -> dict:
    n, k, m, bm, bn, bk, stages, split, with_bias, extra = case
    config = mm.KernelConfig(bm, bn, bk, split, bn // 16, stages, kernel="wgmma")
    generator = torch.Generator(device="cuda").manual_seed(n + k + m)
    dense = torch.randn(n, k, device="cuda", generator=generator) * 0.02
    if spread:
        dense *= torch.logspace(-6, 0, n, device="cuda")[:, None]
    weight = nvfp4.quantize_weight(dense)
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
    out32 = mm.fused_matmul(x, *args, bias, config, torch.float32)
    row_error = ((out32 - reference).abs().amax(0) / reference.abs().amax(0).clamp_min(1e-30)).max()
    subnormal_scales = int((weight.weight_scale.float() < 2.0**-6).sum())
    return {"n": n, "k": k, "m": m, "config": config.__dict__, "bias": with_bias, "x_stride": x.stride(0),
            "calls": calls, "rows_spread": spread, "subnormal_block_scales": subnormal_scales,
            "max_row_relative_fp32_error": float(row_error),
            "ran_wgmma": mm._wgmma_runs(x, weight.packed, weight.weight_scale),
            "max_error": float(errors.max()), "wrong_calls": int((errors > 0.05).sum()),
            "max_fp32_diff_vs_triton_tile": float(fp32_diff.max()), "workspace_clean": bool(clean)}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "nvfp4_wgmma_check_gpu.json")
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        sys.exit("needs a Hopper GPU (sm_90)")
    rows = []
    for case, spread in [(case, False) for case in CASES] + [(SPREAD_CASE, True)]:
        rows.append(check(case, args.calls, spread))
        print(json.dumps(rows[-1]), flush=True)
    ok = all(r["ran_wgmma"] and r["wrong_calls"] == 0 and r["workspace_clean"] and r["max_error"] < 1e-2
             and r["max_row_relative_fp32_error"] < 1e-4 for r in rows)  # fmt: skip
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "gpu": torch.cuda.get_device_name(),
              "torch": torch.__version__, "command": " ".join(["python"] + sys.argv),
              "wrong": "max|out - ref| / max|ref| > 0.05 (bf16 rounding is ~3e-3)", "all_right": ok, "rows": rows}
    print("all right:", ok)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
