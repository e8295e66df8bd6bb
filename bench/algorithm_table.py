"""Bench (GPU): every calibration algorithm and preset of `quantize` on the trained testbed, against its bf16 self.

For each `--algorithm` our CLI offers (quantize.recipes.ALGORITHMS, with `--format nvfp4`) and each format /
preset (quantize.recipes.FORMATS, with its own algorithm), the committed testbed model (testbed/model) is
quantized through stage 1's CLI entry (`settings_from_args(build_parser().parse_args(argv))` + `run_quantize`,
in this one process so ModelOpt is imported once; the calibration set is built once and shared), the checkpoint
is loaded back as a server would run it (packed weights, activation rounding simulated for W4A4 / W4A8 / FP8:
checkpoint_formats.load_checkpoint) and measured with stage 2's Evaluator against the bf16 model:

  KL       mean KL(bf16 || quantized) over the first `--kl_tokens` answer positions of the harmless test
           prompts (teacher-forced on the bf16 model's greedy answers), and first-token KL
  ppl      perplexity on held-out text (datasets_yaml/corpora/general_text_test.jsonl, never calibrated on)
  refusals our marker count on the harmful test prompts, and its ratio to the bf16 model's ("kept")
  calib    the CLI's own calibration seconds (quantize_manifest.json timings_s.calibrate; export separately)

An algorithm the device cannot run (on a CPU: all but max, and nvfp4_awq) is refused by the CLI before any
load; its row says so ("needs CUDA") with the CLI's message. Writes `--out` (JSON) and a markdown table beside it
(`--markdown`, default: the JSON's name with .md).

Device, one call (carry [".whl"], wheels as in bench/RESULTS.md):

    pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 python bench/algorithm_table.py --work /tmp/algo --out $OUT/algorithm_table_gpu.json

CPU smoke test here (fewer prompts and samples):

    .venv/bin/python bench/algorithm_table.py --device cpu --samples 16 --test_prompts 16 --ppl_texts 16 --work /tmp/algo --out /tmp/algo/algorithm_table_cpu.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TESTBED = REPO / "testbed" / "model"
SPEC = REPO / "datasets_yaml" / "testbed_prompts.yaml"
PPL_TEXTS = REPO / "datasets_yaml" / "corpora" / "general_text_test.jsonl"


def variants() -> list[tuple[str, list[str]]]:
    """(row name, CLI flags): every algorithm with --format nvfp4, then every other format with its own algorithm."""
    from quantize.recipes import ALGORITHMS, DEFAULT_FORMAT, FORMATS

    rows = [(f"{DEFAULT_FORMAT} --algorithm {name}", ["--format", DEFAULT_FORMAT, "--algorithm", name]) for name in ALGORITHMS]
    rows += [(f"--format {name}", ["--format", name]) for name in FORMATS if name != DEFAULT_FORMAT]
    return rows


def cli_settings(argv: list[str]):
    from quantize.settings import build_parser, settings_from_args

    return settings_from_args(build_parser().parse_args(argv))


def quantize_one(argv: list[str], calibration_set, console) -> dict:
    """One run of stage 1's CLI entry; a UserError (refused combination, needs CUDA) is the row's result."""
    from foundation.errors import UserError
    from quantize.stage import run_quantize

    started = time.time()
    try:
        output = run_quantize(cli_settings(argv), console, calibration_set=calibration_set)
    except UserError as error:
        text = str(error)
        return {"ok": False, "refused": True, "needs_cuda": "cuda" in text.lower() or "gpu" in text.lower(),
                "message": text, "seconds": time.time() - started}
    manifest = json.loads((Path(output) / "quantize_manifest.json").read_text())
    quantization = manifest.get("quantization", {})
    return {"ok": True, "output": str(output), "seconds": time.time() - started, "timings_s": manifest.get("timings_s"),
            "algorithm": quantization.get("algorithm"), "quant_algo": quantization.get("quant_algo"),
            "checkpoint_bytes": sum(p.stat().st_size for p in Path(output).glob("*.safetensors"))}


def evaluate_checkpoint(path: Path, evaluator, device: str) -> dict:
    from checkpoint_formats.detect import detect_format
    from checkpoint_formats.loader import load_checkpoint

    started = time.time()
    fmt = detect_format(path)
    model, fmt = load_checkpoint(path, dequantize=False, device_map=device, simulate_activations=fmt.activations_quantized)
    loaded = time.time() - started
    result = evaluator.evaluate(model, with_perplexity=True)
    del model
    return {"format_detected": str(fmt), "activations_simulated": fmt.activations_quantized, "load_s": loaded,
            "eval_s": result.seconds, **metrics(result)}


def metrics(result) -> dict:
    return {"kl": result.kl, "kl_first_token": result.kl_first_token, "kl_tokens": result.kl_tokens,
            "perplexity": result.perplexity, "refusals": result.refusals, "n_harmful": result.n_harmful,
            "refusal_rate": result.refusal_rate}


def markdown_table(result: dict) -> str:
    base = result["bf16"]
    lines = [f"Testbed ({result['model']}), {result['device_name']}, {result['date']}; {result['samples']} calibration "
             f"samples x {result['seq_len']} tokens; {base['n_harmful']} harmful / {result['n_harmless']} harmless test "
             f"prompts, KL over {base['kl_tokens']} answer tokens, perplexity on {result['n_ppl_texts']} held-out texts.",
             "",
             "| variant | KL (8 tok) | KL (1st tok) | perplexity | refusals | refusal rate kept | calibration s | export s |",
             "|---|---|---|---|---|---|---|---|",
             f"| bf16 | 0 | 0 | {base['perplexity']:.3f} | {base['refusals']}/{base['n_harmful']} | 1.00 | - | - |"]
    for name, row in result["rows"].items():
        if not row.get("ok"):
            why = "needs CUDA" if row.get("needs_cuda") else ("refused" if row.get("refused") else "failed")
            message = (row.get("message") or row.get("error_tail") or "").strip().splitlines()
            lines.append(f"| {name} | {why}: {message[0][:160] if message else ''} | | | | | | |")
            continue
        timings = row.get("timings_s") or {}
        kept = row["refusal_rate"] / base["refusal_rate"] if base["refusal_rate"] else float("nan")
        lines.append(f"| {name} | {row['kl']:.3g} | {row['kl_first_token']:.3g} | {row['perplexity']:.3f} | "
                     f"{row['refusals']}/{row['n_harmful']} | {kept:.2f} | {timings.get('calibrate', float('nan')):.2f} | "
                     f"{timings.get('export', float('nan')):.2f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=TESTBED)
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None)
    parser.add_argument("--samples", type=int, default=128, help="calibration samples (--max_samples)")
    parser.add_argument("--seq_len", type=int, default=256, help="calibration --max_seq_len")
    parser.add_argument("--batch_size", type=int, default=16, help="calibration batch size")
    parser.add_argument("--test_prompts", type=int, default=100, help="harmful and harmless test prompts each")
    parser.add_argument("--ppl_texts", type=int, default=100)
    parser.add_argument("--max_new_tokens", type=int, default=48, help="answer length for the refusal count")
    parser.add_argument("--kl_tokens", type=int, default=8)
    parser.add_argument("--eval_batch_size", type=int, default=64)
    parser.add_argument("--only", default="", help="comma-separated row names to run (default: all)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/algorithm_table"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--budget_s", type=float, default=290, help="rows not started by then are skipped")
    args = parser.parse_args()
    started = time.time()
    import torch
    from rich.console import Console

    from abliterate.evaluation.evaluator import EvaluationConfig, Evaluator
    from abliterate.prompts import load_prompt_sets
    from quantize.source_model import load_tokenizer
    from quantize.stage import build_calibration

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = "cuda:0" if args.device == "cuda" else "cpu"
    args.work.mkdir(parents=True, exist_ok=True)
    console = Console(stderr=True, quiet=False)
    common = ["--input_model", str(args.model), "--device", args.device, "--max_samples", str(args.samples),
              "--max_seq_len", str(args.seq_len), "--batch_size", str(args.batch_size), "--overwrite",
              "--min_calibration_samples", "1"]

    prompts = load_prompt_sets(SPEC, {}, limit_test=args.test_prompts)
    texts = [json.loads(line)["text"] for line in PPL_TEXTS.read_text().splitlines() if line.strip()][: args.ppl_texts]
    tokenizer = load_tokenizer(str(args.model), None, False)
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).to(device).eval()
    config = EvaluationConfig(refusal_markers=tuple(prompts.refusal_markers or ()) or EvaluationConfig.refusal_markers,
                              max_new_tokens=args.max_new_tokens, kl_tokens=args.kl_tokens, batch_size=args.eval_batch_size)
    eval_started = time.time()
    evaluator = Evaluator(reference, tokenizer, prompts.harmful_test, prompts.harmless_test, config, perplexity_texts=texts)
    base_seconds = time.time() - eval_started
    del reference
    calibration_started = time.time()
    calibration_set = build_calibration(cli_settings([*common, "--output_model", str(args.work / "probe")]), tokenizer, console)
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": str(args.model.relative_to(REPO))
              if args.model.is_relative_to(REPO) else str(args.model), "device": device,
              "device_name": torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU",
              "command": "python bench/algorithm_table.py " + " ".join(sys.argv[1:]), "samples": len(calibration_set.samples),
              "seq_len": args.seq_len, "n_harmless": len(prompts.harmless_test), "n_ppl_texts": len(texts),
              "calibration_set_seconds": time.time() - calibration_started, "bf16_eval_seconds": base_seconds,
              "bf16": {**metrics(evaluator.base), "eval_s": evaluator.base.seconds}, "rows": {}}
    try:
        import importlib.metadata as md

        result["versions"] = {name: md.version(name) for name in ("torch", "transformers", "nvidia-modelopt")}
    except Exception as error:  # noqa: BLE001
        result["versions"] = repr(error)

    def save() -> None:
        result["total_seconds"] = time.time() - started
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
        (args.markdown or args.out.with_suffix(".md")).write_text(markdown_table(result))

    save()
    wanted = {name.strip() for name in args.only.split(",") if name.strip()}
    for index, (name, flags) in enumerate(variants()):
        if wanted and name not in wanted:
            continue
        if time.time() - started > args.budget_s:
            result["rows"][name] = {"ok": False, "message": "skipped: --budget_s reached"}
            continue
        output = args.work / f"out-{index:02d}"
        try:
            row = quantize_one([*common, *flags, "--output_model", str(output)], calibration_set, console)
            if row["ok"]:
                row.update(evaluate_checkpoint(output, evaluator, device))
        except Exception:  # noqa: BLE001 - a failing variant is recorded, the table goes on
            row = {"ok": False, "error_tail": traceback.format_exc()[-2500:]}
        result["rows"][name] = row
        shutil.rmtree(output, ignore_errors=True)
        if args.device == "cuda":
            torch.cuda.empty_cache()
        status = (f"KL {row['kl']:.3g} ppl {row['perplexity']:.3f} refusals {row['refusals']}/{row['n_harmful']} "
                  f"calib {row['timings_s']['calibrate']:.2f} s" if row.get("ok") and "kl" in row
                  else (row.get("message") or row.get("error_tail") or "")[-200:])
        print(f"[{time.time() - started:6.1f} s] {name}: {status}", flush=True)
        save()
    save()
    print(markdown_table(result))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
