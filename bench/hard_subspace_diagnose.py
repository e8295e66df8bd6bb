"""Bench (CPU, not a test): hand-set edits on the hard testbed, to see why random trials remove nothing.

    python bench/hard_subspace_diagnose.py --out /tmp/hard_diag.json [--max_new_tokens 32]

Directions from the train prompts (last prompt token, as stage 2); each row edits a copy of
``testbed/hard`` (bf16 weights, fp32 delta) with ``W' = (I - lambda V^T V) W`` on the o_proj /
down_proj of the listed layers, V one direction (rank 1) or a rank-k subspace
(``abliterate.directions.refusal_subspaces``). Scored on the held-out test prompts by the stage-2
evaluator: refusals per category, look-alike refusals, multi-token KL (8 tokens).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from abliterate.architectures.discovery import discover  # noqa: E402
from abliterate.directions import refusal_subspaces  # noqa: E402
from abliterate.edits.delta import abliteration_delta  # noqa: E402
from abliterate.evaluation import Evaluator  # noqa: E402
from abliterate.evaluation.prompt_sets import load_prompt_spec  # noqa: E402
from abliterate.residuals import prompt_residuals  # noqa: E402
from testbed.build import load_checkpoint  # noqa: E402
from testbed.measure import evaluation_config  # noqa: E402

SPEC = REPO / "datasets_yaml" / "testbed_hard_prompts.yaml"


def edited(model, basis_of_layer, strength_of_layer, method):
    copy_ = copy.deepcopy(model)
    parameters = dict(copy_.named_parameters())
    with torch.no_grad():
        for component in discover(copy_).components:
            strength = strength_of_layer(component.layer)
            if strength == 0.0:
                continue
            weight = parameters[component.parameter_path]
            delta = abliteration_delta(weight, basis_of_layer(component.layer), strength, method=method,
                                       transposed=component.transposed)
            weight.copy_((weight.float() + delta).to(weight.dtype))
    return copy_


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--rows", default="", help="comma-separated indices of the edits to run (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_checkpoint(REPO / "testbed" / "hard")
    spec = load_prompt_spec(SPEC)
    categories = [json.loads(line)["category"] for line in
                  (REPO / "datasets_yaml/testbed_hard/prompts/harmful_test.jsonl").read_text().splitlines() if line.strip()]
    layers = discover(model).layers
    harmful = prompt_residuals(model, layers, tokenizer, spec.harmful_train, batch_size=64).values
    harmless = prompt_residuals(model, layers, tokenizer, spec.harmless_train, batch_size=64).values
    subspaces = refusal_subspaces(harmful, harmless, 5)
    config = dataclasses.replace(evaluation_config(spec), max_new_tokens=args.max_new_tokens)
    evaluator = Evaluator(model, tokenizer, spec.harmful_test, spec.harmless_test, config)
    lookalikes = Evaluator(model, tokenizer, spec.lookalike_test, spec.harmless_test[:4], config)
    markers = tuple(m.lower() for m in spec.refusal_markers)

    def row(name, basis_of_layer, strength_of_layer, method="rank1"):
        started = time.perf_counter()
        copy_ = edited(model, basis_of_layer, strength_of_layer, method)
        result = evaluator.evaluate(copy_)
        look = lookalikes.evaluate(copy_)
        per = {}
        for category, text in zip(categories, result.responses, strict=True):
            refused = not text.strip() or any(m in text.lower() for m in markers)
            per.setdefault(category, [0, 0])
            per[category][0] += refused
            per[category][1] += 1
        out = {"edit": name, "refusals": result.refusals, "n_harmful": result.n_harmful,
               "per_category": {c: f"{r}/{n}" for c, (r, n) in sorted(per.items())},
               "harmless_refusals": result.harmless_refusals, "lookalike_refusals": look.refusals,
               "n_lookalike": look.n_harmful, "kl": round(result.kl, 5), "seconds": round(time.perf_counter() - started, 1)}
        print(json.dumps(out), flush=True)
        return out

    L = len(layers)
    everywhere = lambda s: (lambda layer: s)  # noqa: E731
    late = lambda s, low: (lambda layer: s if layer >= low else 0.0)  # noqa: E731
    plans = {
        "original": (lambda layer: subspaces[6, 0], everywhere(0.0), "rank1"),
        "dir r6, all layers, lambda 1": (lambda layer: subspaces[6, 0], everywhere(1.0), "rank1"),
        "dir r6, layers 5-7, lambda 1.2, norm_preserving (a typical random draw)":
            (lambda layer: subspaces[6, 0], late(1.2, 5), "norm_preserving"),
        "dir r6, all layers, lambda 2": (lambda layer: subspaces[6, 0], everywhere(2.0), "rank1"),
        "subspace k=3 r6, all layers, lambda 1": (lambda layer: subspaces[6, :3], everywhere(1.0), "rank1"),
        "subspace k=5 r6, all layers, lambda 1": (lambda layer: subspaces[6, :5], everywhere(1.0), "rank1"),
        "subspace k=3 r6, layers 5-7, lambda 1.2": (lambda layer: subspaces[6, :3], late(1.2, 5), "rank1"),
        "per-layer dirs, all layers, lambda 1": (lambda layer: subspaces[layer + 1, 0], everywhere(1.0), "rank1"),
        "per-layer subspaces k=3, all layers, lambda 1": (lambda layer: subspaces[layer + 1, :3], everywhere(1.0), "rank1"),
        "dir r6, layers 5-7, lambda 1.2 (rank1)": (lambda layer: subspaces[6, 0], late(1.2, 5), "rank1"),
        "dir r6, layers 0-4, lambda 1": (lambda layer: subspaces[6, 0], lambda layer: 1.0 if layer <= 4 else 0.0, "rank1"),
        "dir r6, all layers, lambda 1, norm_preserving": (lambda layer: subspaces[6, 0], everywhere(1.0), "norm_preserving"),
        "subspace k=3 r6, all layers, lambda 1.5": (lambda layer: subspaces[6, :3], everywhere(1.5), "rank1"),
    }
    names = list(plans) if not args.rows else [list(plans)[int(i)] for i in args.rows.split(",")]
    rows = [row(name, *plans[name]) for name in names]
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "layers": L,
                                    "command": "python bench/hard_subspace_diagnose.py " + " ".join(sys.argv[1:]),
                                    "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
