"""Calibration cost vs a plain bf16 forward over the same tokens, as a ratio.

Both numbers are measured in one process on one device with one model, so the
ratio says what ModelOpt calibration (quantizer insertion, statistics, and on
GPU the first-call Triton compile) costs on top of the forward passes it needs
anyway. Models are random-initialised from a config, never downloaded:
``--model 8b`` has Llama-3-8B's shapes (bf16, ~16 GB, GPU), ``small`` is a
CPU-sized Llama, ``tiny`` only checks that the script runs.

    python bench/calibration_bench.py --device cuda --model 8b --out $OUT/calibration_bench_gpu.json
    python bench/calibration_bench.py --device cpu --model small --out bench/calibration_bench_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODEL_SHAPES = {
    # Llama-3-8B: hidden 4096, MLP 14336, 32 layers, 32 heads (8 KV heads), vocab 128256.
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
    "small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=4096, max_position_embeddings=2048),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, max_position_embeddings=1024),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", choices=list(MODEL_SHAPES), help="default: 8b on cuda, small on cpu")
    parser.add_argument("--small", action="store_true", help="toy size (same as --model tiny --max_samples 8)")
    parser.add_argument("--mix", default=str(REPO / "datasets_yaml" / "offline_mix.yaml"))
    parser.add_argument("--formats", default="nvfp4", help="comma-separated, from quantize.recipes.FORMATS")
    parser.add_argument("--max_samples", type=int, help="default: the mix's (cpu: 64)")
    parser.add_argument("--max_seq_len", type=int)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5,
                        help="plain forward passes and warm re-calibrations timed, alternating; the minimum of each is reported")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.small:
        args.model, args.max_samples = "tiny", args.max_samples or 8
    args.model = args.model or ("8b" if args.device == "cuda" else "small")
    if args.device == "cpu" and args.max_samples is None:
        args.max_samples = 64
    return args


def bench_tokenizer():
    """Byte-level BPE trained on the shipped corpora (no download); its ids fit any vocab >= 1024."""
    from testbed.tokenizer import train_tokenizer

    texts = []
    for name in ("general_text.jsonl", "chat_conversations.jsonl"):
        for line in (REPO / "datasets_yaml" / "corpora" / name).read_text().splitlines()[:300]:
            texts.append(line)
    return train_tokenizer(texts, vocab_size=1024)


def build_model(shape: str, device: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**MODEL_SHAPES[shape])
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval()


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def plain_pass_seconds(model, batches, device: str) -> float:
    synchronize(device)
    started = time.perf_counter()
    for ids, mask in batches:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    synchronize(device)
    return time.perf_counter() - started


def measure_format(shape: str, format_name: str, calibration_set, batch_size: int, pad_id: int, device: str,
                   repeats: int) -> dict:
    """Cold quantize once, then alternate plain passes and warm re-calibrations.

    Alternating (rather than all plain passes first) exposes both to the same
    load on a shared machine; the minimum of each series is reported.
    """
    import copy

    import modelopt.torch.quantization as mtq

    from quantize.calibrate import make_forward_loop
    from quantize.recipes import build_quant_config, get_recipe

    plain_model = build_model(shape, device)
    quant_model = copy.deepcopy(plain_model)
    batches = [(ids.to(device), mask.to(device)) for ids, mask in calibration_set.batches(batch_size, pad_id)]
    plain_pass_seconds(plain_model, batches[:1], device)  # warm-up: kernels, allocator
    loop = make_forward_loop(calibration_set, batch_size, pad_id, console=None)
    loop_times: list[float] = []

    def timed_loop(model):
        synchronize(device)
        started = time.perf_counter()
        loop(model)
        synchronize(device)
        loop_times.append(time.perf_counter() - started)

    synchronize(device)
    started = time.perf_counter()
    mtq.quantize(quant_model, build_quant_config(get_recipe(format_name)), timed_loop)
    synchronize(device)
    cold_total = time.perf_counter() - started
    plain_times = []
    for _ in range(repeats):
        plain_times.append(plain_pass_seconds(plain_model, batches, device))
        mtq.calibrate(quant_model, algorithm="max", forward_loop=timed_loop)
    plain = min(plain_times)
    warm = min(loop_times[1:])
    result = {
        "plain_forward_s": plain, "plain_forward_all_s": plain_times,
        "quantize_total_s": cold_total, "first_loop_s": loop_times[0],
        "recalibrate_loop_s": warm, "recalibrate_loop_all_s": loop_times[1:],
        "ratio_quantize_total_vs_forward": cold_total / plain,
        "ratio_recalibrate_loop_vs_forward": warm / plain,
        "parameters": sum(p.numel() for p in plain_model.parameters()),
    }
    if device == "cuda":
        result["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
    del plain_model, quant_model
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def device_description(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}"


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    from foundation.provenance import library_versions
    from quantize.calibration import build_calibration_set

    args = parse_args(argv)
    console = Console()
    tokenizer = bench_tokenizer()
    calibration_set = build_calibration_set(args.mix, tokenizer, max_samples=args.max_samples,
                                            max_seq_len=args.max_seq_len, console=Console(stderr=True, quiet=True))
    pad_id = tokenizer.pad_token_id
    tokens = sum(len(sample) for sample in calibration_set.samples)
    results = {
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join([str(Path(sys.argv[0]))] + (sys.argv[1:] if argv is None else argv)),
        "device": device_description(args.device), "model_shape": args.model, "model_config": MODEL_SHAPES[args.model],
        "mix": args.mix, "samples": len(calibration_set.samples), "tokens": tokens, "batch_size": args.batch_size,
        "libraries": library_versions(), "formats": {},
    }
    for format_name in [name.strip() for name in args.formats.split(",") if name.strip()]:
        results["formats"][format_name] = measure_format(args.model, format_name, calibration_set, args.batch_size,
                                                         pad_id, args.device, args.repeats)
        results["parameters"] = results["formats"][format_name]["parameters"]

    table = Table(title=f"calibration vs plain bf16 forward — {results['device']}, {args.model} "
                        f"({results['parameters'] / 1e6:.1f}M params), {len(calibration_set.samples)} samples / {tokens} tokens")
    for column in ("format", "plain fwd s", "quantize s", "ratio", "recalib loop s", "ratio (warm)"):
        table.add_column(column, justify="right")
    for format_name, row in results["formats"].items():
        table.add_row(format_name, f"{row['plain_forward_s']:.3f}", f"{row['quantize_total_s']:.3f}",
                      f"{row['ratio_quantize_total_vs_forward']:.2f}x", f"{row['recalibrate_loop_s']:.3f}",
                      f"{row['ratio_recalibrate_loop_vs_forward']:.2f}x")
    console.print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
