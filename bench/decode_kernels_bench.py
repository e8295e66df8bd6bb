"""Bench (GPU): the captured decode step's Triton kernels against what they replace, on a trial's shapes.

Why: `abliterate/evaluation/decode_attention.py` replaces SDPA, `fused_norm.py` transformers' RMSNorm and
`fused_rotary.py` its rotary embedding in the captured decode step; this checks them on the GPU (bf16, which Triton's interpreter cannot check on the CPU)
and times them. RMSNorm: rows of 4096 (batch 100, and 1), bf16, the share of outputs bit-identical to
transformers' `LlamaRMSNorm` and the largest difference in bf16 ulps. Attention at the 8B-shaped trial's
shape: batch 100, 32 query heads on 8 KV heads of 128, a 141-position static cache, rows left-padded by up to
8 positions, the cache filled to 41 .. 141 positions (the first and last decode step). Each timing is
`triton.testing.do_bench` of one call (median, ms). Error: max |ours - fp32 reference| over max |reference|.
Rotary: one decode step's q and k (batch 100, 32 + 8 heads of 128) in bf16, fp16 and fp32, the share of
outputs bit-identical to transformers' `apply_rotary_pos_emb`.

Device (no wheels needed): `python bench/decode_kernels_bench.py --out $OUT/decode_kernels_gpu.json`
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from abliterate.evaluation import decode_attention, fused_norm, fused_rotary  # noqa: E402


def norm_rows(rows: int) -> dict:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    import triton.testing

    generator = torch.Generator(device="cuda").manual_seed(1)
    norm = LlamaRMSNorm(4096, eps=1e-5).to("cuda", torch.bfloat16)
    norm.weight.data = (1 + 0.1 * torch.randn(4096, generator=generator, device="cuda")).to(torch.bfloat16)
    x = (torch.randn(rows, 1, 4096, generator=generator, device="cuda") * 2).to(torch.bfloat16)
    reference, ours = norm(x), fused_norm.rms_norm(x, norm.weight, norm.variance_epsilon)
    ulps = ((ours.float() - reference.float()).abs() / (reference.float().abs() * 2**-7).clamp_min(1e-30)).max().item()
    return {"rows": rows, "bit_exact_share": (ours == reference).float().mean().item(), "max_diff_bf16_ulps": ulps,
            "ours_ms": triton.testing.do_bench(lambda: fused_norm.rms_norm(x, norm.weight, norm.variance_epsilon)),
            "eager_ms": triton.testing.do_bench(lambda: norm(x))}


def _layout(tensor: torch.Tensor) -> list[int]:
    """Strides of the dims longer than 1 (a size-1 dim's stride does not place anything)."""
    return [stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True) if size > 1]


def rotary_rows(batch: int, dtype: torch.dtype) -> dict:
    """One decode step's rotary embedding (32 query heads, 8 KV heads of 128), against transformers' eager code."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    import triton.testing

    generator = torch.Generator(device="cuda").manual_seed(2)
    q = (torch.randn(batch, 1, 32 * 128, generator=generator, device="cuda") * 3).to(dtype).view(batch, 1, 32, 128).transpose(1, 2)
    k = (torch.randn(batch, 1, 8 * 128, generator=generator, device="cuda") * 3).to(dtype).view(batch, 1, 8, 128).transpose(1, 2)
    angles = torch.rand(batch, 1, 64, generator=generator, device="cuda") * 140
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    (q_ref, k_ref), (q_out, k_out) = apply_rotary_pos_emb(q, k, cos, sin), fused_rotary.rotary(q, k, cos, sin)
    exact = torch.cat([(q_out == q_ref).flatten(), (k_out == k_ref).flatten()]).float().mean().item()
    return {"dtype": str(dtype).removeprefix("torch."), "batch": batch, "bit_exact_share": exact,
            "strides_match": _layout(q_out) == _layout(q_ref) and _layout(k_out) == _layout(k_ref),
            "ours_ms": triton.testing.do_bench(lambda: fused_rotary.rotary(q, k, cos, sin)),
            "eager_ms": triton.testing.do_bench(lambda: apply_rotary_pos_emb(q, k, cos, sin))}  # fmt: skip


def case(batch, kv_heads, groups, dim, positions, filled, dtype, seed=0):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    query = torch.randn(batch, kv_heads, groups, dim, generator=generator, device="cuda", dtype=dtype)
    key, value = (torch.randn(batch, kv_heads, positions, dim, generator=generator, device="cuda", dtype=dtype)
                  for _ in range(2))  # fmt: skip
    mask = torch.zeros(batch, 1, 1, positions, device="cuda", dtype=dtype)
    padding = torch.randint(0, 9, (batch,), generator=generator, device="cuda")
    closed = (torch.arange(positions, device="cuda")[None, :] < padding[:, None]) | (
        torch.arange(positions, device="cuda")[None, :] >= filled)
    mask.masked_fill_(closed[:, None, None, :], torch.finfo(dtype).min)
    return query, key, value, mask


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "decode_kernels_gpu.json")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--positions", type=int, default=141)
    args = parser.parse_args()
    import triton.testing

    rows = []
    scale = 128**-0.5
    for dtype in (torch.bfloat16, torch.float16):
        for filled in (41, 64, 91, 128, 141):
            q, k, v, m = case(args.batch, 8, 4, 128, args.positions, filled, dtype)
            reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=m.float(), scale=scale)
            reference = reference.reshape(args.batch, 1, 32, 128)
            ours = decode_attention.decode_attention(q, k, v, m, scale)
            sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale).reshape(args.batch, 1, 32, 128)
            denominator = reference.abs().max().item()
            row = {
                "dtype": str(dtype).removeprefix("torch."), "filled": filled,
                "err_ours": (ours.float() - reference).abs().max().item() / denominator,
                "err_sdpa": (sdpa.float() - reference).abs().max().item() / denominator,
                "ours_ms": triton.testing.do_bench(lambda: decode_attention.decode_attention(q, k, v, m, scale)),
                "sdpa_ms": triton.testing.do_bench(
                    lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale).transpose(1, 2).contiguous()),
            }  # fmt: skip
            row["speedup"] = row["sdpa_ms"] / row["ours_ms"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    norms = [norm_rows(rows) for rows in (100, 1)]
    for row in norms:
        print(json.dumps(row), flush=True)
    rotaries = [rotary_rows(args.batch, dtype) for dtype in (torch.bfloat16, torch.float16, torch.float32)]
    for row in rotaries:
        print(json.dumps(row), flush=True)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__, "triton": __import__("triton").__version__,
        "shape": {"batch": args.batch, "kv_heads": 8, "query_heads": 32, "head_dim": 128, "positions": args.positions},
        "command": " ".join(["python"] + sys.argv), "attention": rows, "rms_norm": norms,
        "rotary": rotaries,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
