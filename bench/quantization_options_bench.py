"""Memory and time per trial of each stage-2 ``--quantization`` option on one model.

Builds a random bf16 Llama from a config (no Hub), saves it with a small
tokenizer, then runs every option in its own subprocess (so peak memory is
that option's alone) through the real loading path (``load_model`` with a
``QuantizationRequest``) and the real LoRA edit (``LoraAbliterator``). Per option:

- ``load_s``: load + quantize time; ``model_gib``: GPU memory held by the loaded
  model (CUDA) or the storage of its tensors (CPU); ``peak_gib``: peak GPU memory
  during load and trials (CUDA) / peak RSS (CPU);
- ``trial_s``: median seconds of a proxy trial: write the edit into the adapters,
  a forward pass over ``batch x prompt_tokens`` (the KL part), greedy generation
  of ``new_tokens`` for the batch (the refusal part), reset;
- ``logit_rel_error``: ||logits - logits_bf16|| / ||logits_bf16|| of the unedited
  model on the forward batch (what the quantization costs before any edit);
- options the device cannot run are recorded with the refusal message.

Usage (GPU): python bench/quantization_options_bench.py --device cuda --out $OUT/quant_options.json
Smoke test (CPU): python bench/quantization_options_bench.py --device cpu --small --out /tmp/quant_options.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

OPTIONS = ["none", "bnb_4bit", "nvfp4", "torchao_int4_weight_only", "torchao_int8_weight_only", "torchao_int8_dynamic",
           "torchao_float8_weight_only", "torchao_float8_dynamic", "torchao_autoquant"]
SIZES = {  # hidden, intermediate, layers, vocab
    "small": (256, 512, 2, 1024),
    "medium": (1024, 2816, 4, 2048),  # Linear-dominated, still CPU-sized (~49M parameters)
    "default": (4096, 14336, 8, 32000),  # Llama-3-8B layer shapes, 8 of its 32 layers (~2.0B parameters)
}


def build_model(directory: Path, hidden: int, intermediate: int, layers: int, vocab: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from testbed.tokenizer import train_tokenizer

    texts = ["How do I bake bread?", "Tell me a story about a cat.", "Explain how rain forms.", "Write a poem."] * 8
    tokenizer = train_tokenizer(texts, vocab_size=300)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=hidden // 128 if hidden >= 1024 else 4, num_key_value_heads=max(1, hidden // 512),
                         max_position_embeddings=4096, tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def storage_bytes(tensor) -> int:
    """Bytes a tensor really stores: tensor subclasses (torchao) are summed over their inner tensors."""
    if hasattr(tensor, "__tensor_flatten__") and type(tensor).__module__.startswith("torchao"):
        names, _ = tensor.__tensor_flatten__()
        return sum(storage_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def model_bytes(model) -> int:
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += storage_bytes(tensor)
    return total


def run_one(option: str, model_dir: Path, device: str, args) -> dict:
    import torch

    from abliterate.architectures import discover
    from abliterate.edits.kernel import KernelParameters
    from abliterate.edits.lora import LoraAbliterator
    from abliterate.edits.plan import AbliterationParameters
    from abliterate.loading import load_model
    from abliterate.quantization.options import QuantizationRequest
    from foundation.errors import UserError

    torch.set_num_threads(args.threads) if device == "cpu" else None
    cuda = device == "cuda"
    request = QuantizationRequest(option, group_size=args.group_size)
    device_map = "cuda:0" if cuda else "cpu"
    started = time.perf_counter()
    try:
        loaded = load_model(str(model_dir), dtypes=["bfloat16"], device_map=device_map, quantization=request)
    except UserError as error:
        return {"option": option, "status": "refused", "message": str(error)}
    except Exception as error:  # noqa: BLE001 - a bench records every failure and goes on
        return {"option": option, "status": "failed", "message": f"{type(error).__name__}: {str(error)[:500]}"}
    if cuda:
        torch.cuda.synchronize()
    load_s = time.perf_counter() - started
    model = loaded.model
    held = torch.cuda.memory_allocated() if cuda else model_bytes(model)
    architecture = discover(model)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.prompt_tokens), generator=generator).to(device_map)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        logits = model(ids).logits[:, -1].float().cpu()
    abliterator = LoraAbliterator(model, architecture.components, method="rank1")
    directions = torch.nn.functional.normalize(torch.randn(architecture.num_layers + 1, model.config.hidden_size,
                                                           generator=generator), dim=-1)
    parameters = AbliterationParameters("global", architecture.num_layers * 0.6, {
        group: KernelParameters(1.0, architecture.num_layers * 0.8, 0.5, architecture.num_layers * 0.5)
        for group in {c.group for c in abliterator.components}})

    def trial() -> float:
        if cuda:
            torch.cuda.synchronize()
        begin = time.perf_counter()
        with torch.no_grad():
            abliterator.apply(parameters, directions)
            model(ids)
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                           do_sample=False, pad_token_id=0)
            abliterator.reset()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - begin

    trial()  # warm-up: kernels, caches
    times = [trial() for _ in range(args.trials)]
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"option": option, "status": "ok", "source_format": loaded.source_format, "load_s": round(load_s, 3),
            "model_gib": round(held / 2**30, 4), "peak_gib": round(peak / 2**30, 4),
            "trial_s": round(statistics.median(times), 4), "trial_s_all": [round(t, 4) for t in times],
            "edited_components": len(abliterator.components), "logits_last": logits.tolist()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--small", action="store_true", help="toy model (CPU smoke test)")
    parser.add_argument("--size", choices=sorted(SIZES), default=None, help="model size (default: 'default', or 'small' with --small)")
    parser.add_argument("--options", nargs="*", default=OPTIONS)
    parser.add_argument("--group_size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt_tokens", type=int, default=128)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (--device cpu)")
    parser.add_argument("--_one", help=argparse.SUPPRESS)
    parser.add_argument("--_model_dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._one:  # child process: one option, JSON on the last stdout line
        print(json.dumps(run_one(args._one, args._model_dir, args.device, args)))
        return 0
    size = args.size or ("small" if args.small else "default")
    if size != "default":
        args.batch, args.prompt_tokens, args.new_tokens = 4, 32, 8
    if size == "small":
        args.group_size = 32  # the toy's 256-wide inputs

    import torch
    import transformers
    from rich.console import Console
    from rich.table import Table

    console = Console(width=150)
    hidden, intermediate, layers, vocab = SIZES[size]
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = Path(scratch) / "model"
        console.print(f"building a random Llama: hidden {hidden}, intermediate {intermediate}, {layers} layers, vocab {vocab}")
        build_model(model_dir, hidden, intermediate, layers, vocab)
        for option in args.options:
            command = [sys.executable, __file__, "--device", args.device, "--out", str(args.out), "--_one", option,
                       "--_model_dir", str(model_dir), "--group_size", str(args.group_size), "--batch", str(args.batch),
                       "--prompt_tokens", str(args.prompt_tokens), "--new_tokens", str(args.new_tokens),
                       "--trials", str(args.trials), "--threads", str(args.threads)]
            completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
            lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
            result = json.loads(lines[-1]) if lines else {
                "option": option, "status": "crashed", "message": completed.stderr[-1500:]}
            results.append(result)
            console.print(f"{option}: {result['status']} {result.get('trial_s', '')} {result.get('message', '')[:300]}", markup=False)

    reference = next((r for r in results if r["option"] == "none" and r["status"] == "ok"), None)
    table = Table(title=f"--quantization on {args.device}")
    for column in ("option", "status", "model GiB", "x bf16", "peak GiB", "load s", "trial s", "x bf16 time", "logit rel err"):
        table.add_column(column, no_wrap=True)
    for result in results:
        if result["status"] == "ok" and reference is not None:
            ref_logits, logits = torch.tensor(reference["logits_last"]), torch.tensor(result["logits_last"])
            result["logit_rel_error"] = round(float((logits - ref_logits).norm() / ref_logits.norm()), 5)
            result["memory_vs_bf16"] = round(result["model_gib"] / reference["model_gib"], 3)
            result["time_vs_bf16"] = round(result["trial_s"] / reference["trial_s"], 3)
        table.add_row(result["option"], result["status"], str(result.get("model_gib", "")), str(result.get("memory_vs_bf16", "")),
                      str(result.get("peak_gib", "")), str(result.get("load_s", "")), str(result.get("trial_s", "")),
                      str(result.get("time_vs_bf16", "")), str(result.get("logit_rel_error", "")))
    for result in results:
        result.pop("logits_last", None)
    console.print(table)
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" and torch.cuda.is_available() else platform.processor() or "cpu"
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": device_name,
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           **{name: _version(name) for name in ("torchao", "peft", "bitsandbytes")}},
              "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "model": {"hidden": hidden, "intermediate": intermediate, "layers": layers, "vocab": vocab},
              "trial_proxy": {"batch": args.batch, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                              "trials": args.trials, "group_size": args.group_size},
              "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {args.out}")
    return 0


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
