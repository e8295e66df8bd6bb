"""Bench (GPU): is our stage 2 on the packed NVFP4 checkpoint faster and leaner than heretic on the bf16 model?

One run, one machine: build an 8B-shaped random Llama (bf16, fixed seed, the testbed tokenizer so prompts
tokenize), quantize it with our stage 1 (NVFP4), then run heretic-llm 1.4.0 on the bf16 model and our stage 2
(`abliterate --load_as packed`) on the NVFP4 checkpoint, same prompts (the general spec's 256+256 train,
100+100 test), same trial count (all random startup trials), 100-token answers. Measured per tool: seconds per
trial (Optuna journal `datetime_start/datetime_complete`), seconds from process start to the end of the first
trial, peak GPU memory of the process (nvidia-smi polled every 0.2 s; torch max_memory_allocated as reported by
the child), wall time. Also a memory-bandwidth floor per trial for bf16 and NVFP4. Writes `--out` (JSON) and
prints a table. A heretic failure is recorded (its log tail) and the bench goes on.

Device setup (no network there; wheels carried in .whl/, see `--print-setup`), one line:

    pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && pip install -q --no-index --no-deps --target /tmp/hsite .whl/heretic/*.whl && PYTHONPATH=/tmp/site python bench/stage2_gpu_vs_heretic.py --work /tmp/s2 --heretic_pythonpath /tmp/hsite:/tmp/site --out $OUT/stage2_gpu_vs_heretic.json

(run with carry [".whl"]). CPU smoke test here (heretic in /tmp/heretic_venv as in heretic_side_by_side.py):

    .venv/bin/python bench/stage2_gpu_vs_heretic.py --size tiny --work /tmp/s2tiny --trials 2 \
        --max_test_prompts 8 --max_train_prompts 16 --max_new_tokens 16 \
        --heretic_python /tmp/heretic_venv/bin/python --out /tmp/s2tiny/result.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _child_measure import (  # noqa: E402
    DEADLINE,
    OURS_RUNNER,
    gpu_name,
    ratio,
    run_child,
    summarize,
    time_left,
    versions,
)

REPO = Path(__file__).resolve().parents[1]
TESTBED = REPO / "testbed" / "model"
SPEC = REPO / "datasets_yaml" / "general_prompts.yaml"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
HBM_BYTES_PER_S = 4.3e12  # H200 HBM3e, nominal
DENSE_BF16_FLOPS = 7e14  # sustained bf16 tensor-core rate assumed for prefill

SIZES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8),
    # 4 layers: heretic's search range for the kernel width, [1, 0.6 (L - 1)], is empty below 3
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2),
}

SETUP = """\
# on the device (carry [".whl"]): our wheels into /tmp/site, heretic's own pins into /tmp/hsite (searched first)
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
pip install -q --no-index --no-deps --target /tmp/hsite .whl/heretic/*.whl
export PYTHONPATH=/tmp/site
"""

HERETIC_RUNNER = r'''
"""heretic-llm without bitsandbytes / lm_eval installed (written by bench/stage2_gpu_vs_heretic.py)."""
import atexit, importlib.machinery, json, os, sys, types
import importlib
for _name in ("torch", "transformers", "peft", "accelerate"):  # availability checks run before the stand-ins exist
    try:
        importlib.import_module(_name)
    except ImportError:
        pass
import torch

def _report():
    path = os.environ.get("BENCH_MEMORY_JSON")
    if path and torch.cuda.is_available():
        with open(path, "w") as f:
            json.dump({"max_memory_allocated": torch.cuda.max_memory_allocated(),
                       "max_memory_reserved": torch.cuda.max_memory_reserved()}, f)
atexit.register(_report)

def _stub(name, **attrs):
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.__dict__.update(attrs)
    return module

_bnb = _stub("bitsandbytes", functional=_stub("bitsandbytes.functional"))
_hf = _stub("lm_eval.models.huggingface", HFLM=object)
_lm = _stub("lm_eval", models=_stub("lm_eval.models", huggingface=_hf), simple_evaluate=None)
sys.modules.update({"bitsandbytes": _bnb, "bitsandbytes.functional": _bnb.functional, "lm_eval": _lm,
                    "lm_eval.models": _lm.models, "lm_eval.models.huggingface": _hf})
import heretic.main
del sys.modules["bitsandbytes"], sys.modules["bitsandbytes.functional"]  # else PEFT thinks bnb is installed
sys.argv = ["heretic"] + sys.argv[1:]
try:
    heretic.main.main()
except EOFError:
    print("BENCH: EOFError after the search (no TTY) - expected; trials are in the journal", flush=True)
'''

def build_model(size: str, out_dir: Path, seed: int, device: str) -> dict:
    """A random Llama of the given shape with the testbed tokenizer, bf16, saved to out_dir."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    testbed = json.loads((TESTBED / "config.json").read_text())
    config = LlamaConfig(**SIZES[size], vocab_size=testbed["vocab_size"], max_position_embeddings=4096,
                         bos_token_id=testbed["bos_token_id"], eos_token_id=testbed["eos_token_id"],
                         pad_token_id=testbed["pad_token_id"], tie_word_embeddings=False, rms_norm_eps=1e-5,
                         initializer_range=0.02, architectures=["LlamaForCausalLM"])
    started = time.time()
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, max_shard_size="5GB")
    for name in TOKENIZER_FILES + ("generation_config.json",):
        if (TESTBED / name).is_file():
            shutil.copy(TESTBED / name, out_dir / name)
    parameters = sum(p.numel() for p in model.parameters())
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"seconds": time.time() - started, "parameters": parameters, "config": SIZES[size],
            "vocab_size": testbed["vocab_size"], "path": str(out_dir)}


def run_stage1(model: Path, quantized: Path, args, env: dict) -> dict:
    command = [sys.executable, "-m", "pipelines.cli", "quantize", "--input_model", str(model), "--output_model",
               str(quantized), "--format", "nvfp4", "--device", args.device, "--max_samples", str(args.calib_samples),
               "--max_seq_len", str(args.calib_seq_len), "--overwrite"]
    result = run_child(command, args.work / "stage1.log", env, REPO, args.timeout)
    ok = result.returncode == 0 and (quantized / "hf_quant_config.json").is_file()
    return {"ok": ok, "seconds": result.wall_s, "command": " ".join(command), "peak_gpu_bytes": result.memory.get("peak_bytes"),
            "error_tail": None if ok else result.tail()}


# ---------------------------------------------------------------- prompts

def write_prompts(folder: Path, max_train: int | None, max_test: int | None) -> dict:
    """The general spec's sets as text files (heretic) plus a spec YAML pointing at them (ours): identical prompts."""
    from abliterate.prompts import SETS, load_prompt_sets

    prompts = load_prompt_sets(SPEC, {}, limit_train=max_train, limit_test=max_test)
    folder.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name in SETS:
        lines = [p.replace("\n", " ").strip() for p in getattr(prompts, name)]
        (folder / f"{name}.txt").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        counts[name] = len(lines)
    import yaml

    spec = yaml.safe_load(SPEC.read_text())
    spec.update({name: f"{name}.txt" for name in SETS})
    spec.pop("perplexity_text", None)
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return {"counts": counts, "markers": list(prompts.refusal_markers or ()), "spec": str(folder / "spec.yaml")}


def prompt_tokens(model_dir: Path, folder: Path) -> dict[str, int]:
    """Chat-templated prompt tokens of each test set (for the prefill part of the floor)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    totals = {}
    for name in ("harmful_test", "harmless_test"):
        lines = (folder / f"{name}.txt").read_text(encoding="utf-8").splitlines()
        ids = [tokenizer.apply_chat_template([{"role": "user", "content": line}], add_generation_prompt=True,
                                             tokenize=True) for line in lines]
        totals[name] = sum(len(x["input_ids"] if isinstance(x, dict) or hasattr(x, "keys") else x) for x in ids)
    return totals


# ---------------------------------------------------------------- the two tools

def heretic_command(args, model: Path, prompts: Path, markers: list[str], study_dir: Path) -> list[str]:
    runner = args.work / "heretic_runner.py"
    runner.write_text(HERETIC_RUNNER)
    command = [str(args.heretic_python), str(runner), "--model", str(model),
               "--n-trials", str(args.trials), "--n-startup-trials", str(args.trials),
               "--max-response-length", str(args.max_new_tokens), "--study-checkpoint-dir", str(study_dir),
               "--good-prompts.dataset", str(prompts / "harmless_train.txt"),
               "--bad-prompts.dataset", str(prompts / "harmful_train.txt"),
               "--good-evaluation-prompts.dataset", str(prompts / "harmless_test.txt"),
               "--bad-evaluation-prompts.dataset", str(prompts / "harmful_test.txt"),
               "--seed", str(args.seed)]
    if markers:
        command += ["--refusal-markers", json.dumps(markers)]
    return command


def run_heretic(args, model: Path, prompts: dict) -> dict:
    study_dir = args.work / "heretic_study"
    shutil.rmtree(study_dir, ignore_errors=True)
    cwd = args.work / "heretic_cwd"
    cwd.mkdir(parents=True, exist_ok=True)
    try:
        command = heretic_command(args, model, Path(prompts["folder"]), prompts["markers"], study_dir)
    except Exception as error:  # noqa: BLE001 - recorded, the bench goes on
        return {"ok": False, "error_tail": repr(error)}
    env = dict(os.environ, PYTHONPATH=args.heretic_pythonpath, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    # what is left minus what our run needs, so that it still fits the budget if heretic hangs
    result = run_child(command, args.work / "heretic.log", env, cwd,
                       max(30.0, min(args.timeout, time_left() - args.reserve_for_ours_s)))
    journals = sorted(study_dir.glob("*.jsonl"))
    summary = summarize(result, journals[0] if journals else None)
    summary["command"] = " ".join(command)
    return summary


def our_flags(help_text: str) -> tuple[list[str], list[str]]:
    flags, warnings = ["--load_as", "packed"], []
    if "--load_as" not in help_text:
        flags, warnings = [], ["abliterate --help lists no --load_as: ran with the default load"]
    return flags, warnings


def run_ours(args, quantized: Path, prompts: dict, env: dict) -> dict:
    study_dir, out = args.work / "ours_study", args.work / "ours_out"
    shutil.rmtree(study_dir, ignore_errors=True)
    runner = args.work / "ours_runner.py"
    runner.write_text(OURS_RUNNER)
    help_text = subprocess.run([sys.executable, "-m", "pipelines.cli", "abliterate", "--help"], cwd=REPO, env=env,
                               capture_output=True, text=True, timeout=min(300, time_left())).stdout
    load_flags, warnings = our_flags(help_text)
    if args.device == "cpu":
        load_flags = ["--load_as", "dequantized"] if load_flags else []  # no packed kernel on the CPU
    command = [sys.executable, str(runner), "abliterate", "--model", str(quantized), *load_flags,
               "--prompts", prompts["spec"], "--n_trials", str(args.trials), "--n_startup_trials", str(args.trials),
               "--max_response_length", str(args.max_new_tokens), "--device_map", "cpu" if args.device == "cpu" else "auto",
               "--out", str(out), "--study_dir", str(study_dir), "--overwrite", "--select", "best_kl_under 0.05",
               "--no-plot", "--seed", str(args.seed)]
    if args.device == "cpu":
        command += ["--cpu_threads", str(args.cpu_threads)]
    result = run_child(command, args.work / "ours.log", env, REPO, args.timeout)
    summary = summarize(result, study_dir / "journal.log")
    summary.update(command=" ".join(command), warnings=warnings)
    return summary


# ---------------------------------------------------------------- the floor

def floor_seconds(config: dict, vocab: int, tokens: dict[str, int], new_tokens: int) -> dict:
    """Bandwidth floor per trial: weights read once per decode step (100 steps, all prompts in one batch) at
    4.3 TB/s, plus prefill FLOPs of both test sets (harmful: generation, harmless: KL) at 7e14 FLOP/s."""
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    linear = layers * (h * h * 2 + h * kv * 2 + 3 * h * inter)  # q,o + k,v + gate,up,down
    lm_head = vocab * h
    bytes_bf16 = 2 * (linear + lm_head)
    bytes_nvfp4 = linear // 2 + linear // 16 + 2 * lm_head  # packed codes + e4m3 block scales; lm_head bf16
    prefill = 2 * (linear + lm_head) * sum(tokens.values()) / DENSE_BF16_FLOPS
    return {"bf16": bytes_bf16 * new_tokens / HBM_BYTES_PER_S + prefill,
            "nvfp4": bytes_nvfp4 * new_tokens / HBM_BYTES_PER_S + prefill,
            "weight_bytes_per_step": {"bf16": bytes_bf16, "nvfp4": bytes_nvfp4}, "prefill_seconds": prefill,
            "prompt_tokens": tokens, "decode_steps": new_tokens, "hbm_bytes_per_s": HBM_BYTES_PER_S,
            "prefill_flops_per_s": DENSE_BF16_FLOPS}


# ---------------------------------------------------------------- report

def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    def fmt(value, unit=""):
        if value is None:
            return "-"
        if unit == "GiB":
            return f"{value / 2**30:.2f} GiB"
        return f"{value:.2f}{unit}" if isinstance(value, float) else str(value)

    table = Table(title=f"stage 2: ours (NVFP4 packed) vs heretic 1.4.0 (bf16) - {result['gpu']}")
    for column in ("", "heretic", "ours", "ours / heretic"):
        table.add_column(column)
    r = result["ratios"]
    table.add_row("s / trial", fmt(result["heretic_seconds_per_trial"], " s"), fmt(result["ours_seconds_per_trial"], " s"),
                  fmt(r["seconds_per_trial"]))
    table.add_row("peak GPU memory", fmt(result["heretic_peak_gpu_bytes"], "GiB"), fmt(result["ours_peak_gpu_bytes"], "GiB"),
                  fmt(r["peak_gpu_bytes"]))
    table.add_row("s to first trial", fmt(result["heretic_seconds_to_first_trial"], " s"),
                  fmt(result["ours_seconds_to_first_trial"], " s"), fmt(r["seconds_to_first_trial"]))
    table.add_row("wall", fmt(result["heretic"].get("wall_s"), " s"), fmt(result["ours"].get("wall_s"), " s"),
                  fmt(r["wall"]))
    floor = result["floor_seconds_per_trial"]
    table.add_row("floor s / trial", fmt(floor.get("bf16"), " s (bf16)"), fmt(floor.get("nvfp4"), " s (nvfp4)"), "")
    Console().print(table)
    Console().print(f"stage 1 (quantize): {fmt(result['stage1'].get('seconds'), ' s')}; "
                    f"heretic ok: {result['heretic'].get('ok')}; ours ok: {result['ours'].get('ok')}")


def write_result(args, steps: dict, started: float) -> dict:
    """The result JSON from the steps done so far (written after each step)."""
    heretic, ours, stage1 = steps.get("heretic", {}), steps.get("ours", {}), steps.get("stage1", {})
    result = {
        "heretic_seconds_per_trial": heretic.get("seconds_per_trial"), "ours_seconds_per_trial": ours.get("seconds_per_trial"),
        "heretic_peak_gpu_bytes": heretic.get("peak_gpu_bytes"), "ours_peak_gpu_bytes": ours.get("peak_gpu_bytes"),
        "heretic_seconds_to_first_trial": heretic.get("seconds_to_first_trial"),
        "ours_seconds_to_first_trial": ours.get("seconds_to_first_trial"),
        "floor_seconds_per_trial": steps.get("floor", {}),
        "ratios": {"seconds_per_trial": ratio(ours.get("seconds_per_trial"), heretic.get("seconds_per_trial")),
                   "peak_gpu_bytes": ratio(ours.get("peak_gpu_bytes"), heretic.get("peak_gpu_bytes")),
                   "seconds_to_first_trial": ratio(ours.get("seconds_to_first_trial"), heretic.get("seconds_to_first_trial")),
                   "wall": ratio(ours.get("wall_s"), heretic.get("wall_s"))},
        "stage1_seconds": stage1.get("seconds"),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "gpu": gpu_name(), "versions": versions(),
        "command": "python bench/stage2_gpu_vs_heretic.py " + " ".join(sys.argv[1:]),
        "size": args.size, "device": args.device, "trials": args.trials, "max_new_tokens": args.max_new_tokens,
        "prompts": steps.get("prompts"), "model": steps.get("model"), "stage1": stage1, "heretic": heretic, "ours": ours,
        "complete": "ours" in steps, "total_seconds": time.time() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="8b")
    parser.add_argument("--work", type=Path, default=Path("/tmp/stage2_bench"), help="models, logs, journals")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "stage2_gpu_vs_heretic.json")
    parser.add_argument("--trials", type=int, default=6, help="trials of each tool, all random startup trials")
    parser.add_argument("--max_new_tokens", type=int, default=100)
    parser.add_argument("--max_test_prompts", type=int, default=100)
    parser.add_argument("--max_train_prompts", type=int, default=None, help="default: all of the spec's")
    parser.add_argument("--calib_samples", type=int, default=128)
    parser.add_argument("--calib_seq_len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available")
    parser.add_argument("--cpu_threads", type=int, default=2, help="ours on the CPU")
    parser.add_argument("--heretic_python", default=sys.executable)
    parser.add_argument("--heretic_pythonpath", default="", help="PYTHONPATH of heretic's process, e.g. /tmp/hsite:/tmp/site")
    parser.add_argument("--skip_heretic", action="store_true")
    parser.add_argument("--reserve_for_ours_s", type=float, default=100.0,
                        help="seconds of the budget kept for our run when heretic's time limit is set")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per child process")
    parser.add_argument("--budget_s", type=float, default=580,
                        help="the whole bench ends by then (the device allows 600 s a command); children are cut short")
    parser.add_argument("--print-setup", "--print_setup", action="store_true", help="print the device install lines")
    args = parser.parse_args()
    if args.print_setup:
        print(SETUP)
        return 0
    sys.path.insert(0, str(REPO))
    import torch

    DEADLINE[0] = time.time() + args.budget_s
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    started = time.time()

    model, quantized = args.work / "model-bf16", args.work / "model-nvfp4"
    steps: dict = {"args": {k: str(v) for k, v in vars(args).items()}}
    save = lambda: write_result(args, steps, started)  # noqa: E731 - partial results survive a kill
    steps["model"] = built = build_model(args.size, model, args.seed, args.device)
    print(f"built {built['parameters'] / 1e9:.2f}B parameters in {built['seconds']:.1f} s", flush=True)
    save()
    steps["stage1"] = stage1 = run_stage1(model, quantized, args, env)
    print(f"stage 1: ok={stage1['ok']} {stage1['seconds']:.1f} s", flush=True)
    prompts = write_prompts(args.work / "prompts", args.max_train_prompts, args.max_test_prompts)
    prompts["folder"] = str(args.work / "prompts")
    steps["prompts"] = prompts["counts"]
    steps["floor"] = floor_seconds(built["config"], built["vocab_size"], prompt_tokens(model, args.work / "prompts"),
                                   args.max_new_tokens)
    save()
    steps["heretic"] = heretic = ({"ok": False, "error_tail": "skipped (--skip_heretic)"} if args.skip_heretic
                                  else run_heretic(args, model, prompts))
    print(f"heretic: ok={heretic.get('ok')} s/trial={heretic.get('seconds_per_trial')}", flush=True)
    save()
    steps["ours"] = ours = (run_ours(args, quantized, prompts, env) if stage1["ok"]
                            else {"ok": False, "error_tail": "stage 1 failed"})
    print(f"ours: ok={ours.get('ok')} s/trial={ours.get('seconds_per_trial')}", flush=True)
    result = save()
    print_table(result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
