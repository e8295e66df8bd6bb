"""Bench (GPU): NemotronH- and Qwen3-30B-A3B-shaped random models (full width, a few layers) through the chain.

Why: the family matrix (tests/abliterate/test_family_matrix.py) proves names and layouts on tiny widths on a
CPU; this runs the same chain at real widths on a GPU, where ModelOpt's CUDA calibration, 128 experts per
layer, the Mamba mixers and the packed NVFP4 stage 2 meet for real. Per family: build the random model (bf16,
the family's real hidden sizes and expert counts, `--layers` layers, the testbed tokenizer so prompts
tokenize; ids past its vocabulary decode to nothing), `quantize --format nvfp4` (stage 1, its servability
check included), `abliterate` (2 trials, packed on the GPU), `export --format nvfp4` (merge, re-quantize,
servability check, reload and re-measure). Each step's wall time, exit code, peak GPU memory and log tail go
to `--out`; a failing step is recorded and the next family still runs.

Device, one line (carry [".whl"]):

    pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site:. python bench/family_chain_gpu.py --work /tmp/fam --out $OUT/family_chain_gpu.json

CPU smoke test here: `.venv/bin/python bench/family_chain_gpu.py --tiny --work /tmp/famtiny --out /tmp/famtiny/r.json`
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO))

import stage2_gpu_vs_heretic as common  # noqa: E402
from _child_measure import DEADLINE, run_child, trial_times  # noqa: E402

# The published shapes (Nemotron-3-Nano-30B-A3B, Qwen3-30B-A3B); only the layer count is cut.
FAMILIES = {
    "nemotron_h": dict(
        model_type="nemotron_h", architectures=["NemotronHForCausalLM"], hidden_size=2688, num_attention_heads=32,
        num_key_value_heads=2, head_dim=128, intermediate_size=1856, mamba_num_heads=64, mamba_head_dim=64,
        ssm_state_size=128, n_groups=8, conv_kernel=4, n_routed_experts=128, num_experts_per_tok=6,
        moe_intermediate_size=1856, moe_shared_expert_intermediate_size=3712, n_group=1, topk_group=1,
        vocab_size=131072),
    "qwen3_moe": dict(
        model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], hidden_size=2048, intermediate_size=6144,
        moe_intermediate_size=768, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
        num_experts_per_tok=8, vocab_size=151936, max_position_embeddings=4096),
}
TINY = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 64,
        "mamba_num_heads": 4, "mamba_head_dim": 16, "ssm_state_size": 16, "n_groups": 1, "n_routed_experts": 4,
        "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
        "moe_shared_expert_intermediate_size": 32, "vocab_size": 1024}
NEMOTRON_PATTERN = ["mamba", "moe", "attention", "mamba", "moe"]


def build(family: str, layers: int, out_dir: Path, tiny: bool, device: str) -> dict:
    """The random bf16 model with the testbed tokenizer, saved to out_dir."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(FAMILIES[family])
    if tiny:
        values.update({key: value for key, value in TINY.items() if key in values})
    testbed = json.loads((common.TESTBED / "config.json").read_text())
    special = {name: testbed[name] for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    model_type = values.pop("model_type")
    if family == "nemotron_h":
        values["layers_block_type"] = (NEMOTRON_PATTERN * layers)[:layers]
    else:
        values["num_hidden_layers"] = layers
    config = AutoConfig.for_model(model_type, **values, **special, tie_word_embeddings=False)
    started = time.time()
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    shutil.rmtree(out_dir, ignore_errors=True)
    model.save_pretrained(out_dir)
    for name in common.TOKENIZER_FILES + ("generation_config.json",):
        if (common.TESTBED / name).is_file():
            shutil.copy(common.TESTBED / name, out_dir / name)
    parameters = sum(p.numel() for p in model.parameters())
    del model
    return {"ok": True, "seconds": time.time() - started, "parameters": parameters, "layers": layers,
            "config": {**values, "model_type": model_type}}


def step(name: str, command: list[str], work: Path, env: dict, timeout: float) -> dict:
    result = run_child(command, work / f"{name}.log", env, REPO, timeout)
    return {"ok": result.returncode == 0, "returncode": result.returncode, "timed_out": result.timed_out,
            "seconds": result.wall_s, "peak_gpu_bytes": result.memory.get("peak_bytes"), "command": " ".join(command),
            "log_tail": result.tail()[-2500:]}


def chain(family: str, args, env: dict, prompts: dict) -> dict:
    work = args.work / family
    work.mkdir(parents=True, exist_ok=True)
    model, quantized, trial, exported = work / "bf16", work / "nvfp4", work / "trial", work / "export-nvfp4"
    cli = [sys.executable, "-m", "pipelines.cli"]
    report: dict = {"build": build(family, args.layers, model, args.tiny, args.device)}
    report["quantize"] = step("quantize", cli + [
        "quantize", "--input_model", str(model), "--output_model", str(quantized), "--format", "nvfp4", "--device",
        args.device, "--max_samples", str(args.calib_samples), "--max_seq_len", "256", "--overwrite"], work, env, 900)
    if not report["quantize"]["ok"]:
        return report
    placement = ["--device_map", "auto", "--load_as", "packed"] if args.device == "cuda" else ["--device_map", "cpu"]
    report["abliterate"] = step("abliterate", cli + [
        "abliterate", "--model", str(quantized), *placement, "--prompts", prompts["spec"], "--n_trials", "2",
        "--n_startup_trials", "2", "--max_response_length", str(args.max_new_tokens), "--out", str(trial),
        "--study_dir", str(work / "study"), "--overwrite", "--select", "best_kl_under 1.0", "--no-plot"], work, env, 900)
    journal = work / "study" / "journal.log"
    if journal.is_file():
        times = trial_times(journal, time.time() - report["abliterate"]["seconds"])
        report["abliterate"].update(n_trials=times["n_trials"], seconds_per_trial=times["seconds_per_trial"])
    if not report["abliterate"]["ok"]:
        return report
    report["export"] = step("export", cli + [
        "export", str(trial), "--format", "nvfp4", "--output", str(exported), "--overwrite", "--no_progress"],
        work, env, 900)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", choices=sorted(FAMILIES), default=["nemotron_h", "qwen3_moe"])
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="tiny widths (CPU smoke test of the bench itself)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/family_chain"))
    parser.add_argument("--out", type=Path, default=BENCH / "family_chain_gpu.json")
    parser.add_argument("--calib_samples", type=int, default=32)
    parser.add_argument("--max_test_prompts", type=int, default=16)
    parser.add_argument("--max_train_prompts", type=int, default=32)
    parser.add_argument("--max_new_tokens", type=int, default=16)
    parser.add_argument("--budget_s", type=float, default=580)
    args = parser.parse_args()
    import torch

    DEADLINE[0] = time.time() + args.budget_s
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    prompts = common.write_prompts(args.work / "prompts", args.max_train_prompts, args.max_test_prompts)
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "gpu": common.gpu_name(),
              "versions": common.versions(), "command": "python bench/family_chain_gpu.py " + " ".join(sys.argv[1:]),
              "device": args.device, "families": {}}
    for family in args.families:
        try:
            result["families"][family] = chain(family, args, env, prompts)
        except Exception as error:  # noqa: BLE001 - recorded; the next family still runs
            result["families"][family] = {"error": repr(error)}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
        steps = result["families"][family]
        print(family, {name: (part.get("ok"), round(part.get("seconds") or 0, 1)) for name, part in steps.items()
                       if isinstance(part, dict)}, flush=True)
        shutil.rmtree(args.work / family, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
