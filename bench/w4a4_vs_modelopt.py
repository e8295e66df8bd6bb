"""Our W4A4 (NVFP4 weights + activations) simulation vs ModelOpt's own fake-quant forward.

One random Llama is calibrated with ``mtq.quantize(NVFP4_DEFAULT_CFG)``; ModelOpt's
quantized model gives reference logits (its forward needs CUDA), then the model
is exported and loaded back with ``checkpoint_formats.load_checkpoint`` keeping
weights packed and simulating activation rounding. Reported: distance of our
logits from ModelOpt's, next to the distance of both from the bf16 model (the
quantization error itself), so "how close" has a scale.

GPU:  python bench/w4a4_vs_modelopt.py --out $OUT/w4a4.json
      python bench/w4a4_vs_modelopt.py --model testbed/model --out $OUT/w4a4_testbed.json
      (a trained model, calibrated and evaluated on real text instead of random tokens)
CPU smoke test (ModelOpt's forward fails on CPU, so only our side runs):
      python bench/w4a4_vs_modelopt.py --device cpu --small --out /tmp/w4a4.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from checkpoint_formats.cli_verify import compare_logits  # noqa: E402
from checkpoint_formats.loader import load_checkpoint  # noqa: E402

SIZES = {
    "small": dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "default": dict(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=4,
    ),
}


def build_model(size: str, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(max_position_embeddings=2048, **SIZES[size])
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device=device, dtype=torch.bfloat16).eval()


def timed(fn, device: str, repeats: int = 3) -> tuple[torch.Tensor, float]:
    out = fn()  # warm-up (Triton compile on the first ModelOpt call)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out, (time.perf_counter() - start) / repeats


def as_dict(comparison) -> dict:
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in vars(comparison).items()}


LAYER_CHECKS = ("model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj", "model.layers.3.self_attn.q_proj",
                "model.layers.3.mlp.gate_proj")


def trained_model_and_text(path: str, text_file: str, calib_batches: int, seq_len: int, device: str):
    """A trained model with real text: random tokens and random weights exaggerate how errors grow."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
    if not model.config.architectures:
        model.config.architectures = [type(model).__name__]
    lines = [json.loads(line)["text"] for line in Path(text_file).read_text().splitlines() if line.strip()]
    ids = tokenizer("\n\n".join(lines), return_tensors="pt").input_ids[0]
    needed = (calib_batches + 4) * seq_len
    if ids.numel() < needed:
        raise SystemExit(f"{text_file}: {ids.numel()} tokens, need {needed}; lower --seq-len or --calib-batches")
    rows = ids[:needed].view(calib_batches + 4, seq_len).to(device)
    return model, rows[:calib_batches], rows[calib_batches:]


def capture_layer_inputs(model, input_ids, names) -> dict[str, torch.Tensor]:
    """The real inputs of a few Linear layers, so each layer can be compared on identical data."""
    captured, handles = {}, []
    modules = dict(model.named_modules())
    for name in (name for name in names if name in modules):
        handles.append(modules[name].register_forward_pre_hook(
            lambda module, args, name=name: captured.__setitem__(name, args[0].detach().clone())))
    try:
        with torch.no_grad():
            model(input_ids)
    except Exception:  # ModelOpt's forward fails on CPU; no per-layer check there
        pass
    for handle in handles:
        handle.remove()
    return captured


def compare_layers(modelopt_model, our_model, inputs) -> dict:
    """One Linear at a time, same input: ModelOpt's fake-quant module vs our NVFP4Linear (W4A4 and W4A16)."""
    theirs, ours = dict(modelopt_model.named_modules()), dict(our_model.named_modules())
    results = {}
    for name, x in inputs.items():
        with torch.no_grad():
            reference = theirs[name](x).float()
            ours[name].simulate_activations = True
            simulated = ours[name](x.to(next(ours[name].buffers()).device)).float()
            ours[name].simulate_activations = False
            weights_only = ours[name](x.to(next(ours[name].buffers()).device)).float()
            ours[name].simulate_activations = True
        norm = reference.norm().clamp_min(1e-30)
        results[name] = {
            "w4a4_relative_l2": float((simulated - reference).norm() / norm),
            "w4a4_max_abs": float((simulated - reference).abs().max()),
            "w4a4_exact_fraction": float((simulated == reference).float().mean()),
            "w4a16_relative_l2": float((weights_only - reference).norm() / norm),
        }
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file for the results")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="toy model (CPU smoke test)")
    parser.add_argument("--calib-batches", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--model", help="a trained model folder (e.g. testbed/model) instead of a random Llama")
    parser.add_argument("--text", default="datasets_yaml/corpora/general_text.jsonl",
                        help="with --model: JSONL text ('text' field) for calibration and evaluation tokens")
    args = parser.parse_args()

    import modelopt
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint

    size = "small" if args.small else "default"
    seq_len = 32 if args.small else args.seq_len
    if args.model:
        model, calib, eval_ids = trained_model_and_text(args.model, args.text, args.calib_batches, seq_len, args.device)
        size = args.model
    else:
        model = build_model(size, args.device)
        vocab = model.config.vocab_size
        gen = torch.Generator().manual_seed(1)
        calib = torch.randint(0, vocab, (args.calib_batches, seq_len), generator=gen).to(args.device)
        eval_ids = torch.randint(0, vocab, (4, seq_len), generator=gen).to(args.device)

    with torch.no_grad():
        bf16_logits = model(eval_ids).logits.float()

    def forward_loop(m):
        for row in calib:
            m(row[None])

    quantized = mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, forward_loop)
    modelopt_logits, modelopt_seconds, modelopt_error = None, None, None
    try:
        with torch.no_grad():
            logits, modelopt_seconds = timed(lambda: quantized(eval_ids).logits, args.device)
        modelopt_logits = logits.float()
    except Exception as error:  # on CPU: "amax must be a CUDA tensor for dynamic block quantization"
        modelopt_error = f"{type(error).__name__}: {error}"

    layer_inputs = capture_layer_inputs(quantized, eval_ids, LAYER_CHECKS)
    # The export shares one weight amax across q/k/v and across gate/up (its
    # own requantize_resmooth_fused_llm_layers step) and then packs the
    # weights in place. A copy with that same step applied, but not packed,
    # runs ModelOpt's forward with exactly the checkpoint's scales: the fair
    # reference for our simulation.
    modelopt_after_logits, fused_reference = None, None
    if modelopt_logits is not None:
        import copy

        from modelopt.torch.export.unified_export_hf import (
            requantize_resmooth_fused_llm_layers,
        )

        fused_reference = copy.deepcopy(quantized)
        requantize_resmooth_fused_llm_layers(fused_reference)
        with torch.no_grad():
            modelopt_after_logits = fused_reference(eval_ids).logits.float()
    with tempfile.TemporaryDirectory() as export_dir:
        export_hf_checkpoint(quantized, export_dir=export_dir)
        ours, fmt = load_checkpoint(export_dir, device_map=args.device, simulate_activations=True)
        layer_results = compare_layers(fused_reference, ours, layer_inputs) if fused_reference is not None else None
        weights_only, _ = load_checkpoint(export_dir, device_map=args.device)
        auto_placed, _ = load_checkpoint(export_dir, device_map="auto", simulate_activations=True)
        with torch.no_grad():
            ours_logits, ours_seconds = timed(lambda: ours(eval_ids).logits, args.device)
            weights_only_logits = weights_only(eval_ids).logits.float()
            auto_logits = auto_placed(eval_ids.to(auto_placed.device)).logits.to(ours_logits.device)
    ours_logits = ours_logits.float()

    results = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "modelopt": modelopt.__version__,
        "model": {"size": size, **SIZES.get(size, {}), "eval_tokens": eval_ids.numel()},
        "format": fmt.kind.value,
        "ours_w4a4_vs_bf16": as_dict(compare_logits(ours_logits, bf16_logits)),
        "ours_w4a16_vs_bf16": as_dict(compare_logits(weights_only_logits, bf16_logits)),
        "ours_forward_seconds": ours_seconds,
        "device_map_auto_same_logits": bool(torch.equal(auto_logits, ours_logits)),
    }
    if modelopt_logits is not None:
        results["modelopt_w4a4_vs_bf16"] = as_dict(compare_logits(modelopt_logits, bf16_logits))
        results["ours_w4a4_vs_modelopt_w4a4"] = as_dict(compare_logits(ours_logits, modelopt_logits))
        results["ours_w4a16_vs_modelopt_w4a4"] = as_dict(compare_logits(weights_only_logits, modelopt_logits))
        results["modelopt_forward_seconds"] = modelopt_seconds
        quant_error = results["modelopt_w4a4_vs_bf16"]["relative_l2"]
        sim_error = results["ours_w4a4_vs_modelopt_w4a4"]["relative_l2"]
        results["simulation_error_over_quantization_error"] = sim_error / quant_error if quant_error else None
        results["modelopt_after_export_vs_bf16"] = as_dict(compare_logits(modelopt_after_logits, bf16_logits))
        results["ours_w4a4_vs_modelopt_after_export"] = as_dict(compare_logits(ours_logits, modelopt_after_logits))
        results["ours_w4a16_vs_modelopt_after_export"] = as_dict(compare_logits(weights_only_logits, modelopt_after_logits))
        results["per_layer_same_input"] = layer_results
    else:
        results["modelopt_skipped"] = modelopt_error

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
