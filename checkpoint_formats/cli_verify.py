"""``quant-abliterate verify PATH``: does the checkpoint load, generate and stay close to its reference?

The model keeps its weights packed and (for W4A4 / W4A8 / FP8) simulates the
deployed activation rounding; the reference is the same model with that
rounding switched off, which computes exactly what the checkpoint dequantized
to bf16 computes (one model in memory, not two). Their distance is the error
the activation quantization adds; non-finite logits mean a broken checkpoint.
Before loading, every tensor is checked for NaN/inf and a checkpoint that
quantizes activations for a missing ``input_scale`` (``health.py``): one
prompt's logits can be finite on a broken checkpoint.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch

from checkpoint_formats.detect import detect_format
from checkpoint_formats.health import (
    describe_names,
    missing_activation_scales,
    nonfinite_tensors,
    quantized_modules,
)
from checkpoint_formats.loader import load_checkpoint
from checkpoint_formats.modules import set_activation_simulation
from checkpoint_formats.reader import CheckpointReader
from foundation.errors import UserError
from foundation.tokenizer_files import has_tokenizer

DEFAULT_PROMPT = "The capital of France is"


@dataclass
class LogitComparison:
    finite: bool
    max_abs_diff: float
    relative_l2: float
    mean_kl: float  # KL(reference || model) of the next-token distributions, nats
    top1_agreement: float


def compare_logits(model_logits: torch.Tensor, reference_logits: torch.Tensor) -> LogitComparison:
    a, b = model_logits.float(), reference_logits.float()
    finite = bool(torch.isfinite(a).all())
    if not finite:
        return LogitComparison(False, math.inf, math.inf, math.inf, 0.0)
    log_p, log_q = b.log_softmax(-1), a.log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    return LogitComparison(
        True,
        float((a - b).abs().max()),
        float((a - b).norm() / b.norm().clamp_min(1e-30)),
        float(kl),
        float((a.argmax(-1) == b.argmax(-1)).float().mean()),
    )


def _prompt_ids(path, prompt: str, vocab_size: int):
    """The prompt tokenized, or fixed ids when the checkpoint ships no tokenizer (test models)."""
    fixed = torch.arange(1, 9).remainder(vocab_size)[None]
    if not has_tokenizer(path):
        return fixed, None
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise UserError(
            str(path), f"its tokenizer cannot be loaded ({error})", "fix or remove the tokenizer files"
        ) from error
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    if ids.numel() == 0:
        raise UserError("--prompt", "tokenizes to no tokens", "pass a non-empty prompt")
    return ids, tokenizer


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="quant-abliterate verify", description="Load a checkpoint, generate a few tokens, check logits."
    )
    parser.add_argument("path", help="checkpoint directory")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--tokens", type=int, default=8, help="tokens to generate (greedy)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda:0, or a device_map such as auto / balanced")
    parser.add_argument("--no-simulate-activations", action="store_true", help="keep activations in bf16")
    parser.add_argument("--serving", action="store_true",
                        help="check only what vLLM / TensorRT-LLM require of the files (no model is loaded)")
    args = parser.parse_args(argv)
    if args.serving:
        return _verify_serving(args.path)
    if args.tokens < 1:
        raise UserError("--tokens", "must be at least 1")
    fmt = detect_format(args.path)
    check_weights(fmt)
    simulate = fmt.activations_quantized and not args.no_simulate_activations
    model, _ = load_checkpoint(args.path, device_map=args.device, simulate_activations=simulate)
    ids, tokenizer = _prompt_ids(args.path, args.prompt, model.config.vocab_size)
    ids = ids.to(model.device)
    with torch.no_grad():
        generated = model.generate(
            ids, max_new_tokens=args.tokens, do_sample=False, pad_token_id=model.config.eos_token_id
        )
        logits = model(generated).logits
        set_activation_simulation(model, False)
        comparison = compare_logits(logits, model(generated).logits)
    new_ids = generated[0, ids.shape[1] :]
    text = tokenizer.decode(new_ids) if tokenizer is not None else " ".join(map(str, new_ids.tolist()))

    from rich.console import Console

    console = Console()
    console.print(f"[bold]{fmt.path}[/]: {fmt.describe()}" + ("; activations simulated" if simulate else ""))
    console.print(f"generated: {text!r}")
    console.print(
        "weights finite: [green]yes[/]; "
        f"logits finite: {'[green]yes[/]' if comparison.finite else '[red]NO[/]'}; vs dequantized reference: "
        f"max |diff| {comparison.max_abs_diff:.4g}, relative L2 {comparison.relative_l2:.4g}, "
        f"KL {comparison.mean_kl:.4g} nats, top-1 agreement {comparison.top1_agreement:.1%}"
    )
    return 0 if comparison.finite else 1


def check_weights(fmt) -> None:
    """What one prompt's logits cannot show: activation scales missing, NaN/inf in any weight (UserError)."""
    with CheckpointReader(fmt) as reader:
        missing = missing_activation_scales(fmt, reader)
        if missing:
            total = len(quantized_modules(reader))
            raise UserError(
                f"{fmt.path}: {missing[0]}",
                f"{fmt.describe()} quantizes activations, but {len(missing)} of {total} quantized Linears have no "
                f"input_scale ({describe_names(missing)}); servers would run them with an uninitialized scale",
                "quantize again with calibration data that survives the mix's filters (stage 1 now stops when "
                "too few samples survive), or export weight-only (--format w4a16_nvfp4)",
            )
        nonfinite = nonfinite_tensors(reader.iter_tensors())
    if nonfinite:
        raise UserError(f"{fmt.path}: {nonfinite[0]}", f"NaN/inf in {len(nonfinite)} tensor(s): {describe_names(nonfinite)}",
                        "re-create the checkpoint from a source model whose weights are finite")


def _verify_serving(path: str) -> int:
    """List every servability problem, then stop with a UserError naming the first (tensor + rule)."""
    from rich.console import Console

    from checkpoint_formats.servability import check_servable, require_servable

    console = Console()
    problems = check_servable(path)
    for problem in problems:
        console.print(f"[red]not servable[/] {problem}", markup=True, highlight=False)
    require_servable(path)
    console.print(f"[green]servable[/]: {path} meets every rule vLLM 0.33 / TensorRT-LLM apply to its files")
    return 0
