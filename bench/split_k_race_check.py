"""Bench (GPU): does every split-K decode matmul include every split, call after call?

Why: the 2026-12-03 09:09 matmul table (bench/nvfp4_matmul_gpu.json) has one row, 14336 x 4096 at M = 4, whose
first call was wrong (error 0.62 of the largest output, about one split's share missing) while its later calls
were right: the split that arrives last at a tile may read the fp32 sums before another split's adds have landed
(``split_k_workspace``). This runs each split-K launch shape of the 8B decode many times on the same inputs and
counts the calls whose output is off by more than rounding.

Device: `python bench/split_k_race_check.py --out $OUT/split_k_race_check_gpu.json`
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

from checkpoint_formats import nvfp4  # noqa: E402
from checkpoint_formats import nvfp4_matmul as mm  # noqa: E402

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (1024, 4096)]
TOKENS = [4, 16, 64, 100, 128]


def check(n: int, k: int, m: int, calls: int) -> dict:
    generator = torch.Generator(device="cuda").manual_seed(n + k + m)
    weight = nvfp4.quantize_weight(torch.randn(n, k, device="cuda", generator=generator) * 0.02)
    args = (weight.packed, weight.weight_scale, weight.weight_scale_2)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=generator)
    reference = (x.float() @ nvfp4.dequantize_weight(weight, torch.float32).T)
    scale = reference.abs().max()
    errors = torch.empty(calls, device="cuda")
    for call in range(calls):
        errors[call] = (mm.nvfp4_linear(x, *args).float() - reference).abs().max() / scale
    errors = errors.cpu()
    config = mm.decode_config(m, n, k, mm._sm_count(x.device))
    return {"n": n, "k": k, "m": m, "split_k": config.split_k, "calls": calls,
            "wrong_calls": int((errors > 0.05).sum()), "max_error": float(errors.max()),
            "median_error": float(errors.median())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "split_k_race_check_gpu.json")
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    rows = []
    for (n, k) in SHAPES:
        for m in TOKENS:
            if mm.decode_config(m, n, k, mm._sm_count(torch.device("cuda"))).split_k > 1:
                rows.append(check(n, k, m, args.calls))
                print(json.dumps(rows[-1]), flush=True)
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "gpu": torch.cuda.get_device_name(),
              "torch": torch.__version__, "command": " ".join(["python"] + sys.argv),
              "wrong": "max|out - ref| / max|ref| > 0.05 (rounding is ~3e-3)", "rows": rows,
              "wrong_calls": sum(row["wrong_calls"] for row in rows), "calls": sum(row["calls"] for row in rows)}
    print("wrong calls:", result["wrong_calls"], "of", result["calls"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
