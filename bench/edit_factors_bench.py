"""Bench (GPU): what writing one trial's edit costs on an 8B-shaped model, and which part of it.

Why: a stage-2 trial on the H200 spent 0.085-0.25 s in ``LoraAbliterator.apply`` (bench/stage2_trial_profile.py,
2026-12-03), beside a 1.6 s evaluation. The default ``norm_preserving`` edit runs a randomized SVD per component
(``edits.delta``): a few products with the weight, three QRs of a thin sketch and one small SVD. This times the
whole factor computation per shape and, apart, its small factorizations: the float64-Gram ones it runs on a GPU
(``edits.thin_linalg``), cuSOLVER's QR and SVD, and LAPACK's on the CPU (with the copies).

Device: `python bench/edit_factors_bench.py --out $OUT/edit_factors_gpu.json`
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from abliterate.edits import thin_linalg  # noqa: E402
from abliterate.edits.delta import abliteration_factors  # noqa: E402

# (hidden, in): an 8B model's edited components, o_proj and down_proj, 32 of each
SHAPES = {"o_proj 4096x4096": (4096, 4096), "down_proj 4096x14336": (4096, 14336)}
SKETCH = 11  # rank 3 + the randomized SVD's oversampling of 8


def _seconds(fn, repeats: int) -> float:
    """Median wall seconds of ``fn`` with the device drained before and after each call."""
    times = []
    for _ in range(repeats + 1):  # the first call warms libraries up and is dropped
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def measure(hidden: int, columns: int, repeats: int) -> dict:
    generator = torch.Generator(device="cuda").manual_seed(hidden + columns)
    weight = torch.randn(hidden, columns, device="cuda", generator=generator) * 0.02
    direction = torch.nn.functional.normalize(torch.randn(hidden, device="cuda", generator=generator), dim=0)
    tall = torch.randn(max(hidden, columns), SKETCH, device="cuda", generator=generator)
    wide = torch.randn(SKETCH, max(hidden, columns), device="cuda", generator=generator)
    return {
        "hidden": hidden, "in": columns,
        "norm_preserving_s": _seconds(lambda: abliteration_factors(weight, direction, 1.0, method="norm_preserving",
                                                                   rank=3), repeats),
        "rank1_s": _seconds(lambda: abliteration_factors(weight, direction, 1.0, method="rank1"), repeats),
        "gram_basis_s": _seconds(lambda: thin_linalg.gram_range_basis(tall), repeats),  # what the edit runs on a GPU
        "gram_svd_s": _seconds(lambda: thin_linalg.gram_svd(wide), repeats),
        "qr_gpu_s": _seconds(lambda: torch.linalg.qr(tall), repeats),
        "qr_cpu_with_copies_s": _seconds(lambda: torch.linalg.qr(tall.cpu()).Q.to("cuda"), repeats),
        "svd_gpu_s": _seconds(lambda: torch.linalg.svd(wide, full_matrices=False), repeats),
        "svd_cpu_with_copies_s": _seconds(lambda: [t.to("cuda") for t in torch.linalg.svd(wide.cpu(),
                                                                                          full_matrices=False)], repeats),
        "weight_pass_s": _seconds(lambda: weight @ tall[:columns], repeats),  # one product of W with a thin matrix
    }  # fmt: skip


def whole_trial(repeats: int) -> dict:
    """One 8B trial's 64 norm-preserving factors from NVFP4 weights dequantized on demand (as stage 2 holds
    them): one component after another, and in lockstep (``batched_factors``); checks both give the same bits."""
    from abliterate.edits.batched_factors import FactorJob, factors_in_lockstep
    from checkpoint_formats import nvfp4

    generator = torch.Generator(device="cuda").manual_seed(0)
    packed = []
    for hidden, columns in [SHAPES["o_proj 4096x4096"], SHAPES["down_proj 4096x14336"]] * 32:
        weight = torch.randn(hidden, columns, device="cuda", generator=generator) * 0.02
        packed.append(nvfp4.quantize_weight(weight))
    del weight
    directions = torch.nn.functional.normalize(torch.randn(64, 4096, device="cuda", generator=generator), dim=-1)
    jobs = [FactorJob(lambda q=q: nvfp4.dequantize_weight(q, torch.float32), direction, 0.9)
            for q, direction in zip(packed, directions)]

    def one_by_one():
        return [abliteration_factors(job.load(), job.direction, job.strength, method="norm_preserving", rank=3)
                for job in jobs]

    def lockstep():
        return factors_in_lockstep(jobs, method="norm_preserving", rank=3, seed=0)

    same = all(torch.equal(a, b) for pair, other in zip(one_by_one(), lockstep()) for a, b in zip(pair, other))
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    alone_s = _seconds(one_by_one, repeats)
    alone_peak = torch.cuda.max_memory_allocated() - base
    torch.cuda.reset_peak_memory_stats()
    together_s = _seconds(lockstep, repeats)
    together_peak = torch.cuda.max_memory_allocated() - base
    return {"components": len(jobs), "bitwise_equal": same, "one_by_one_s": alone_s, "lockstep_s": together_s,
            "one_by_one_peak_extra_bytes": alone_peak, "lockstep_peak_extra_bytes": together_peak}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "edit_factors_gpu.json")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    rows = {name: measure(*shape, args.repeats) for name, shape in SHAPES.items()}
    for name, row in rows.items():
        print(name, json.dumps({key: round(value * 1e3, 3) for key, value in row.items() if key.endswith("_s")}),
              "(ms)", flush=True)
    per_trial = 32 * sum(row["norm_preserving_s"] for row in rows.values())
    trial = whole_trial(args.repeats)
    print("one 8B trial, dequantized on demand:", json.dumps(trial), flush=True)
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "gpu": torch.cuda.get_device_name(),
              "torch": torch.__version__, "command": " ".join(["python"] + sys.argv),
              "timing": "median wall seconds of --repeats calls, device synchronized around each",
              "shapes": rows, "norm_preserving_seconds_per_8b_trial": per_trial, "whole_trial": trial}  # fmt: skip
    print("norm_preserving factors of 32 o_proj + 32 down_proj:", round(per_trial, 4), "s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
