"""Bench (GPU): what ``--judge`` adds to a stage-2 trial, on an 8B-shaped Llama.

One process, one model, three evaluators measuring it the way a trial does (``Evaluator.evaluate``: harmful
generation on the static decoder, the harmless KL pass, false refusals):

* ``markers``: no judge, answers up to ``--max_new_tokens`` (100);
* ``classifier``: the shipped ``testbed/judge`` (a tiny sequence classifier), answers to ``--judge_tokens`` (128);
* ``*_same_window``: the same judges with ``--judge_tokens`` equal to ``--max_new_tokens`` (the judging alone);
* ``chat_llm_8b``: an 8B-shaped chat LLM as the judge (random weights, the testbed tokenizer and chat template:
  the cost of a real 8B instruct judge, not its verdicts), answers to ``--judge_tokens``.

The searched model is a random 8B-shaped Llama (hidden 4096, MLP 14336, 32 layers, GQA 8; vocabulary 1024, the
testbed tokenizer's) in bf16 on the GPU. Random weights never write a refusal marker or an end token, so every
answer runs to the full window and every answer is judged: the judge's worst case. Timings interleave the three
evaluators (CUDA-synced), after one warm-up call each (graph capture).

    python bench/judge_overhead.py --out $OUT/judge_overhead_gpu.json

Run on an H200 2026-12-02 (bench/judge_overhead_gpu.json, RESULTS.md). CPU smoke test of the code path:
`.venv/bin/python bench/judge_overhead.py --device cpu --layers 1 --prompts 4 --max_new_tokens 6 --judge_tokens 8
--repeats 1 --out /tmp/judge_overhead_smoke.json`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from abliterate.evaluation import EvaluationConfig, Evaluator, load_refusal_judge
from abliterate.evaluation.judge import ChatJudge

SHAPE_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                "num_key_value_heads": 8, "max_position_embeddings": 2048}


def prompts(name: str, count: int) -> list[str]:
    lines = (REPO / "datasets_yaml" / "prompts" / f"{name}.jsonl").read_text().splitlines()
    return [json.loads(line)["prompt"] for line in lines[:count]]


def random_llama(tokenizer, seed: int, layers: int | None, device: str) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    shape = {**SHAPE_8B, **({"num_hidden_layers": layers} if layers else {})}
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, architectures=["LlamaForCausalLM"], **shape)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    return model.eval()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(evaluator: Evaluator, model) -> tuple[float, float, int]:
    sync()
    start = time.perf_counter()
    result = evaluator.evaluate(model)
    sync()
    return time.perf_counter() - start, result.judge_seconds, result.refusals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--max_new_tokens", type=int, default=100)
    parser.add_argument("--judge_tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=None, help="fewer layers for a smoke test")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(REPO / "testbed" / "model")
    tokenizer.padding_side = "left"
    harmful, harmless = prompts("harmful_test", args.prompts), prompts("harmless_test", args.prompts)
    model = random_llama(tokenizer, 0, args.layers, args.device)
    chat_judge_model = random_llama(tokenizer, 1, args.layers, args.device)
    classifier = load_refusal_judge(str(REPO / "testbed" / "judge"), args.device, batch_size=100)
    chat = ChatJudge(chat_judge_model, tokenizer, batch_size=50, description="random 8B-shaped chat LLM")
    judges = {  # name -> (judge, judge_tokens)
        "markers": (None, None),
        "classifier": (classifier, args.judge_tokens),
        "classifier_same_window": (classifier, args.max_new_tokens),  # the judging alone, no longer window
        "chat_llm_8b": (chat, args.judge_tokens),
        "chat_llm_8b_same_window": (chat, args.max_new_tokens),
    }
    evaluators = {}
    for name, (judge, judge_tokens) in judges.items():
        config = EvaluationConfig(max_new_tokens=args.max_new_tokens, kl_tokens=16, batch_size=args.prompts,
                                  count_harmless_refusals=True, harmless_max_new_tokens=16, judge_tokens=judge_tokens)
        evaluators[name] = Evaluator(model, tokenizer, harmful, harmless, config, refusal_judge=judge)
        timed(evaluators[name], model)  # warm-up: this shape's decoder captured
    runs = {name: [] for name in judges}
    for _ in range(args.repeats):
        for name, evaluator in evaluators.items():
            runs[name].append(timed(evaluator, model))
    base = statistics.median(seconds for seconds, _, _ in runs["markers"])
    result = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device, "torch": torch.__version__, "shape": SHAPE_8B, "layers": args.layers,
        "prompts": args.prompts, "max_new_tokens": args.max_new_tokens, "judge_tokens": args.judge_tokens,
        "trial_seconds": {name: [round(s, 3) for s, _, _ in values] for name, values in runs.items()},
        "judge_seconds": {name: [round(j, 3) for _, j, _ in values] for name, values in runs.items()},
        "refusals": {name: values[-1][2] for name, values in runs.items()},
        "ratio_to_markers": {name: round(statistics.median(s for s, _, _ in values) / base, 3)
                             for name, values in runs.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
