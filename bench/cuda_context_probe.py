"""Bench (GPU): what the CUDA context and the libraries a trial loads cost in GPU memory, outside torch's allocator.

Why: nvidia-smi counted ~0.9 GB more for our stage-2 process than torch's reserved memory
(bench/stage2_gpu_vs_heretic.json), about 12% of the process, and the issue's memory target counts it. This
process loads the same pieces one at a time and reads its own GPU memory from nvidia-smi after each (with
torch's reserved memory subtracted): the bare context, cuBLAS (a bf16 matmul), cuDNN (a masked bf16 SDPA, as
transformers' sdpa runs the prefill), torch's flash SDPA, one Triton kernel, cuBLAS on a second stream and in a
CUDA graph, cuSOLVER (the edit's randomized SVD) and the NVFP4 matmul kernels.

Device: `python bench/cuda_context_probe.py --out $OUT/cuda_context_probe_gpu.json`
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from _child_measure import GpuMemoryPoller  # noqa: E402


def process_gpu_bytes() -> int | None:
    """This process's GPU memory as nvidia-smi reports it (None where it lists no process)."""
    for row in GpuMemoryPoller._query(["--query-compute-apps=pid,used_memory"]):
        if len(row) == 2 and row[0] == str(os.getpid()) and row[1].isdigit():
            return int(row[1]) * 2**20
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "cuda_context_probe_gpu.json")
    args = parser.parse_args()
    steps = []

    def record(what: str) -> None:
        torch.cuda.synchronize()
        used = process_gpu_bytes()
        reserved = torch.cuda.memory_reserved()
        steps.append({"after": what, "process_bytes": used, "torch_reserved_bytes": reserved,
                      "outside_torch_bytes": None if used is None else used - reserved})
        print(json.dumps(steps[-1]), flush=True)

    torch.zeros(1, device="cuda")
    record("context (first tensor)")
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    (a @ a).sum().item()
    record("cuBLAS bf16 matmul")
    q = torch.randn(100, 8, 41, 128, device="cuda", dtype=torch.bfloat16)
    mask = torch.zeros(100, 1, 41, 141, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(100, 8, 141, 128, device="cuda", dtype=torch.bfloat16)
    F.scaled_dot_product_attention(q, kv, kv, attn_mask=mask)
    record("SDPA with a mask (default backend: cuDNN on sm90)")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        F.scaled_dot_product_attention(q, kv[:, :, :41], kv[:, :, :41], is_causal=True)
    record("SDPA flash backend")
    from abliterate.evaluation import decode_attention

    grouped = torch.randn(100, 8, 4, 128, device="cuda", dtype=torch.bfloat16)
    decode_attention.decode_attention(grouped, kv, kv, mask[:, :, :1], 128**-0.5)
    record("one Triton kernel (decode attention)")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        (a @ a).sum().item()
    torch.cuda.current_stream().wait_stream(side)
    record("cuBLAS on a second stream (as the capture stream)")
    graph, static_in = torch.cuda.CUDAGraph(), torch.randn(100, 4096, device="cuda", dtype=torch.bfloat16)
    with torch.cuda.stream(side):
        static_in @ a  # warm-up on the capture stream
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph, stream=side):
        static_out = static_in @ a
    graph.replay()
    del static_out
    record("a CUDA graph of one matmul, captured and replayed")
    thin = torch.randn(14336, 11, device="cuda")
    torch.linalg.qr(thin)
    record("cuSOLVER QR of a thin fp32 matrix (the edit's randomized SVD)")
    torch.linalg.svd(thin.T.contiguous(), full_matrices=False)
    record("cuSOLVER SVD of an 11 x 14336 fp32 matrix")
    from checkpoint_formats import nvfp4, nvfp4_matmul

    weight = nvfp4.quantize_weight(torch.randn(14336, 4096, device="cuda") * 0.02)
    stored = (weight.packed, weight.weight_scale, weight.weight_scale_2)
    for rows in (1, 4, 16, 100, 2048):
        nvfp4_matmul.nvfp4_linear(torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16), *stored)
    record("the NVFP4 matmul kernels (GEMV, decode tiles, dequantize + cuBLAS)")
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "gpu": torch.cuda.get_device_name(),
              "torch": torch.__version__, "cuda_module_loading": os.environ.get("CUDA_MODULE_LOADING"),
              "command": " ".join(["python"] + sys.argv), "steps": steps}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
