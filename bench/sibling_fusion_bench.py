"""Bench (GPU): q/k/v and gate/up in one NVFP4 matmul each (``sibling_fusion``) against their members' own calls.

Why: ``sibling_fusion`` only pays if one launch over the group's rows beats the members' launches; this times both
on the 8B shapes (q 4096, k and v 1024 rows; gate and up 14336 rows; K 4096) at decode sizes, each group's calls
replayed from one CUDA graph (the bench's ``_gpu_ms``: L2 flushed before each replay), and checks that the fused
columns equal the members' outputs within bf16 rounding.

Device: `python bench/sibling_fusion_bench.py --out $OUT/sibling_fusion_gpu.json`
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

import nvfp4_matmul_bench as matmul_bench  # noqa: E402

from checkpoint_formats import nvfp4  # noqa: E402
from checkpoint_formats import nvfp4_matmul as mm  # noqa: E402

GROUPS = {"q/k/v": (4096, 1024, 1024), "gate/up": (14336, 14336)}
K = 4096
TOKENS = (1, 16, 64, 100, 128)


def measure(name: str, rows: tuple[int, ...], m: int) -> dict:
    generator = torch.Generator(device="cuda").manual_seed(sum(rows) + m)
    weights = [torch.randn(n, K, device="cuda", generator=generator) * 0.02 for n in rows]
    shared = max(w.abs().max() for w in weights) / (6 * 448)
    members = [nvfp4.quantize_weight(w, weight_scale_2=shared) for w in weights]
    fused = nvfp4.NVFP4Weight(torch.cat([q.packed for q in members]),
                              torch.cat([q.weight_scale.view(torch.uint8) for q in members]).view(torch.float8_e4m3fn),
                              members[0].weight_scale_2)  # fmt: skip
    x = torch.randn(m, K, device="cuda", dtype=torch.bfloat16, generator=generator)

    def separate():
        return [mm.nvfp4_linear(x, q.packed, q.weight_scale, q.weight_scale_2) for q in members]

    def together():
        return mm.nvfp4_linear(x, fused.packed, fused.weight_scale, fused.weight_scale_2)

    parts = torch.cat(separate(), dim=-1).float()
    difference = (together().float() - parts).abs().max() / parts.abs().max()
    return {"group": name, "rows": list(rows), "k": K, "m": m, "separate_us": matmul_bench._gpu_ms(separate) * 1e3,
            "fused_us": matmul_bench._gpu_ms(together) * 1e3, "max_relative_difference": float(difference)}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=BENCH / "sibling_fusion_gpu.json")
    args = parser.parse_args()
    if not mm.available("cuda"):
        sys.exit("needs Triton and a CUDA GPU of sm_80+")
    rows = []
    for name, members in GROUPS.items():
        for m in TOKENS:
            rows.append(measure(name, members, m))
            row = rows[-1]
            print(f"{name:8s} M={m:4d} separate {row['separate_us']:7.1f} us  fused {row['fused_us']:7.1f} us  "
                  f"difference {row['max_relative_difference']:.1e}", flush=True)  # fmt: skip
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "gpu": torch.cuda.get_device_name(),
              "torch": torch.__version__, "command": " ".join(["python"] + sys.argv), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
