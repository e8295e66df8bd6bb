"""Peak memory and time: streaming merge vs the reference's full in-memory reload-and-merge.

Builds a many-shard random Llama checkpoint from a config (written tensor by
tensor, never held whole), a chosen-trial artifact editing every layer's
o_proj and down_proj, then runs each variant in its own subprocess and reads
its peak RSS (``resource.getrusage``) and wall time:

- ``streaming``: ``StreamingMerger`` + ``export_full_precision`` (one shard at a time);
- ``in_memory``: ``from_pretrained`` the whole model on the CPU, the edit as PEFT
  LoRA adapters, ``merge_and_unload``, ``save_pretrained`` (what heretic does).

Usage: python bench/streaming_merge_bench.py --out bench_out/merge.json [--small]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build_model(directory: Path, *, hidden: int, layers: int, intermediate: int, vocab: int, shard_mb: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from checkpoint_formats.writer import StreamingCheckpointWriter

    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256), vocab_size=vocab,
                         tie_word_embeddings=False, architectures=["LlamaForCausalLM"], dtype="bfloat16")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    writer = StreamingCheckpointWriter(directory, max_shard_bytes=shard_mb * 1024**2)
    generator = torch.Generator().manual_seed(0)
    parameters = 0
    for name, parameter in model.state_dict().items():
        values = torch.randn(parameter.shape, generator=generator).mul_(0.02) if parameter.ndim > 1 else torch.ones(parameter.shape)
        writer.add(name, values.to(torch.bfloat16))
        parameters += parameter.numel()
    shards = writer.close()
    config.save_pretrained(directory)
    return {"parameters": parameters, "shards": len(shards), "bytes": sum(p.stat().st_size for p in shards)}


def build_trial(model_dir: Path, trial_dir: Path) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from abliterate.architectures import discover
    from abliterate.artifacts import write_chosen_trial
    from abliterate.edits.kernel import KernelParameters
    from abliterate.edits.plan import (
        PER_LAYER,
        AbliterationParameters,
        edit_directions,
        plan_edits,
    )

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        components = discover(AutoModelForCausalLM.from_config(config)).components
    layers, hidden = config.num_hidden_layers, config.hidden_size
    directions = torch.nn.functional.normalize(torch.randn(layers + 1, hidden, generator=torch.Generator().manual_seed(1)), dim=-1)
    kernel = KernelParameters(max_weight=1.0, max_weight_position=layers / 2, min_weight=0.5, min_weight_distance=layers)
    parameters = AbliterationParameters(PER_LAYER, None, {"attn": kernel, "mlp": kernel})
    edits = plan_edits(parameters, components)
    trial_dir.mkdir(parents=True, exist_ok=True)
    write_chosen_trial(trial_dir, header={"model": str(model_dir), "method": "rank1", "rank": 1, "svd_seed": 0,
                                          "trial_number": 0, "parameters": parameters.to_dict(), "metrics": {}},
                       edits=edits, directions=directions, edit_vectors=edit_directions(parameters, directions))
    return len(edits)


def run_streaming(model_dir: Path, trial_dir: Path, out_dir: Path) -> None:
    from abliterate.artifacts import read_chosen_trial
    from abliterate.export.formats_out import export_full_precision
    from abliterate.export.streaming_merge import StreamingMerger

    merger = StreamingMerger.from_directory(model_dir, read_chosen_trial(trial_dir))
    out_dir.mkdir(parents=True)
    export_full_precision(merger, out_dir, show_progress=False)


def run_in_memory(model_dir: Path, trial_dir: Path, out_dir: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from abliterate.artifacts import read_chosen_trial
    from abliterate.edits.delta import abliteration_factors

    trial = read_chosen_trial(trial_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    modules = [name.removesuffix(".weight") for name in trial.edits]
    peft_model = get_peft_model(model, LoraConfig(r=1, lora_alpha=1, target_modules=modules, lora_dropout=0.0))
    for module in modules:
        record, layer = trial.edits[f"{module}.weight"], peft_model.base_model.model.get_submodule(module)
        left, right = abliteration_factors(layer.base_layer.weight, trial.directions[record.direction], record.strength)
        layer.lora_A["default"].weight.data.copy_(right)
        layer.lora_B["default"].weight.data.copy_(left)
    peft_model.merge_and_unload().save_pretrained(out_dir)


def child(variant: str, model_dir: Path, trial_dir: Path, out_dir: Path) -> None:
    # Both variants import the same libraries before the clock starts: the numbers are the work, not imports.
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import abliterate.export.formats_out  # noqa: F401

    baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    {"streaming": run_streaming, "in_memory": run_in_memory}[variant](model_dir, trial_dir, out_dir)
    seconds = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"variant": variant, "seconds": seconds, "peak_rss_bytes": peak_kib * 1024,
                      "baseline_rss_bytes": baseline_kib * 1024}))


def measure(variant: str, model_dir: Path, trial_dir: Path, work: Path) -> dict:
    out_dir = work / f"out-{variant}"
    shutil.rmtree(out_dir, ignore_errors=True)
    measured = _run_child(["--child", variant, "--model", str(model_dir), "--trial", str(trial_dir),
                           "--child_out", str(out_dir)])
    shutil.rmtree(out_dir, ignore_errors=True)
    return measured


def _run_child(arguments: list[str]) -> dict:
    result = subprocess.run([sys.executable, __file__, *arguments], capture_output=True, text=True, cwd=REPO)
    if result.returncode:
        raise SystemExit(f"{' '.join(arguments[:2])} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _work(run: dict) -> int:
    return max(run["peak_rss_bytes"] - run["baseline_rss_bytes"], 1024**2)  # floor: a toy run may add ~0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="where to write the JSON result")
    parser.add_argument("--work", type=Path, default=Path("/tmp/streaming_merge_bench"), help="scratch directory")
    parser.add_argument("--small", action="store_true", help="toy size (seconds) to check that the bench runs")
    parser.add_argument("--device", default="cpu", help="the merge runs on the CPU by design; kept for a uniform CLI")
    parser.add_argument("--shard_mb", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None, help="override the layer count (model size)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--child", choices=("build", "streaming", "in_memory"), help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--trial", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child_out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "build":
        model = build_model(args.model, **json.loads(args.size))
        print(json.dumps({"model": model, "edits": build_trial(args.model, args.trial)}))
        return
    if args.child:
        child(args.child, args.model, args.trial, args.child_out)
        return
    # 1B class: Llama hidden 2048, 16 layers, MLP 5632, vocab 32000 = 0.85B parameters, 1.7 GB in bf16
    # (--layers 32: 1.5B, 3.1 GB). The streaming peak should not grow with --layers; the in-memory one does.
    size = dict(hidden=256, layers=4, intermediate=688, vocab=4096, shard_mb=1) if args.small else \
        dict(hidden=2048, layers=16, intermediate=5632, vocab=32000, shard_mb=100)
    if args.shard_mb:
        size["shard_mb"] = args.shard_mb
    if args.layers:
        size["layers"] = args.layers
    shutil.rmtree(args.work, ignore_errors=True)
    model_dir, trial_dir = args.work / "model", args.work / "trial"
    # Built in a child too: a forked child inherits its parent's peak RSS (Linux keeps maxrss across
    # fork + exec), so this process must stay small for the children's numbers to be theirs.
    built = _run_child(["--child", "build", "--model", str(model_dir), "--trial", str(trial_dir),
                        "--size", json.dumps(size)])
    model, edits = built["model"], built["edits"]
    runs = [measure(variant, model_dir, trial_dir, args.work)
            for _ in range(args.repeats) for variant in ("streaming", "in_memory")]
    best = {v: min((r for r in runs if r["variant"] == v), key=lambda r: r["seconds"]) for v in ("streaming", "in_memory")}
    result = {
        "model": {**size, **model, "edited_weights": edits}, "runs": runs,
        "peak_rss_ratio_in_memory_over_streaming": best["in_memory"]["peak_rss_bytes"] / best["streaming"]["peak_rss_bytes"],
        "time_ratio_in_memory_over_streaming": best["in_memory"]["seconds"] / best["streaming"]["seconds"],
        # the same ratio without the memory both processes hold before any work (imported libraries)
        "work_rss_ratio_in_memory_over_streaming": _work(best["in_memory"]) / _work(best["streaming"]),
    }
    for variant, run in best.items():
        print(f"{variant:>10}: {run['seconds']:7.1f} s, peak RSS {run['peak_rss_bytes'] / 1024**3:6.2f} GiB "
              f"({_work(run) / 1024**3:.2f} GiB above the {run['baseline_rss_bytes'] / 1024**3:.2f} GiB after imports)")
    print(f"model: {model['parameters'] / 1e9:.2f}B parameters, {model['shards']} shards, {model['bytes'] / 1024**3:.2f} GiB; "
          f"peak RSS ratio (in-memory / streaming) {result['peak_rss_ratio_in_memory_over_streaming']:.2f}, "
          f"(above imports: {result['work_rss_ratio_in_memory_over_streaming']:.2f}), "
          f"time ratio {result['time_ratio_in_memory_over_streaming']:.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
