"""Bench (GPU): one model split over every visible GPU (then CPU) gives the results it gives on one device.

Why: users put 70B-405B models across several GPUs (accelerate device_map). This runs the same random
8B-shaped Llama (hidden 4096, MLP 14336, GQA 8, testbed tokenizer) through both stages twice, once on one
device and once split, and compares what must not change:

- stage 1 (`quantize --format nvfp4`, max calibration): one GPU (`--device cuda`) vs the offload path
  (`--offload_folder`, `--max_gpu_memory` one budget per GPU so the decoder layers spread over every GPU);
  every exported tensor is compared (`weight` codes, `weight_scale`, `weight_scale_2`, `input_scale`).
- stage 2 (`abliterate` on the bf16 model, `--n_trials` = `--n_startup_trials`, so both runs evaluate the same
  seeded parameters): `--device_map cuda:0` vs `--device_map auto` with `--max_memory` caps that split it over
  the GPUs; the per-trial metrics (refusals, KL, ...) and parameters from both journals are compared.
- with a GPU, the same on stage 1's NVFP4 checkpoint held packed (`--load_as packed`: the Triton kernels run on
  every GPU the split uses).

With 2+ GPUs the split is over all of them; with one GPU the split is cuda:0 + CPU (accelerate offloads the
CPU part: its parameters sit on the meta device and the edit goes through the offload hook's weights map);
without a GPU (the CPU smoke test) it is CPU + disk. Each step's wall time, exit code, peak GPU memory and log
tail go to `--out` (rewritten after every step, so a run cut short still leaves its partial result).

Device, one line (carry [".whl"]; kind nvidia-h200-x2 for two GPUs, nvidia-h200 for cuda:0 + CPU):

    pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site:. python bench/multi_gpu_split.py --work /tmp/mgs --out $OUT/multi_gpu_split.json

CPU smoke test here: `.venv/bin/python bench/multi_gpu_split.py --size tiny --work /tmp/mgstiny --out /tmp/mgstiny/r.json`
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO))

import stage2_gpu_vs_heretic as common  # noqa: E402  (random model with the testbed tokenizer, prompt files)
from _child_measure import DEADLINE, run_child, trial_times  # noqa: E402

CLI = [sys.executable, "-m", "pipelines.cli"]


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def weight_bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))


def step(name: str, command: list[str], work: Path, timeout: float) -> dict:
    import os

    result = run_child(command, work / f"{name}.log", dict(os.environ), REPO, timeout)
    return {"ok": result.returncode == 0, "returncode": result.returncode, "timed_out": result.timed_out,
            "seconds": result.wall_s, "peak_gpu_bytes": result.memory.get("peak_bytes"), "command": " ".join(command),
            "log_tail": result.tail()[-2500:]}


# ---------------------------------------------------------------- placements

def stage1_split_flags(gpus: int, size: int, offload: Path) -> list[str]:
    """Budgets that spread the decoder layers over every GPU (the last one takes the rest), else GPU + CPU, else
    CPU + disk."""
    flags = ["--offload_folder", str(offload), "--clean_offload"]
    if gpus >= 2:
        share = int(size / gpus * 1.05)
        return flags + ["--max_gpu_memory", ",".join([str(share)] * (gpus - 1) + [str(2 * size)]),
                        "--max_cpu_memory", str(4 * size)]
    if gpus == 1:
        return flags + ["--max_gpu_memory", str(size // 2), "--max_cpu_memory", str(4 * size)]
    return flags + ["--max_cpu_memory", str(size // 2)]


def stage2_split_flags(gpus: int, size: int, offload: Path) -> list[str]:
    if gpus >= 2:
        share = int(size / gpus * 1.05)
        memory = {str(index): str(share if index < gpus - 1 else 2 * size) for index in range(gpus)}
        memory["cpu"] = str(4 * size)
    elif gpus == 1:
        memory = {"0": str(size // 2), "cpu": str(4 * size)}
    else:
        memory = {"cpu": str(size // 2)}
    return ["--device_map", "auto", "--max_memory", json.dumps(memory), "--offload_folder", str(offload)]


# ---------------------------------------------------------------- comparisons

def compare_checkpoints(one: Path, split: Path) -> dict:
    """Every tensor of two exported checkpoints: identical or not, and the largest difference per tensor kind."""
    import torch
    from safetensors.torch import load_file

    def tensors(folder: Path) -> dict:
        merged = {}
        for file in sorted(folder.glob("*.safetensors")):
            merged.update(load_file(str(file)))
        return merged

    a, b = tensors(one), tensors(split)
    kinds: dict[str, dict] = {}
    for name in sorted(set(a) | set(b)):
        kind = name.rsplit(".", 1)[-1] if name.rsplit(".", 1)[-1] in {"weight_scale", "weight_scale_2", "input_scale"} \
            else "packed_weight" if name in a and a[name].dtype == torch.uint8 else "other"
        entry = kinds.setdefault(kind, {"tensors": 0, "identical": 0, "max_abs_diff": 0.0, "missing": []})
        entry["tensors"] += 1
        if name not in a or name not in b or a[name].shape != b[name].shape:
            entry["missing"].append(name)
            continue
        x, y = a[name], b[name]
        if x.dtype == torch.float8_e4m3fn:
            same = torch.equal(x.view(torch.uint8), y.view(torch.uint8))
        else:
            same = torch.equal(x, y)
        entry["identical"] += int(same)
        if not same:
            diff = (x.float() - y.float()).abs().max().item() if x.dtype != torch.uint8 else \
                float((x != y).float().mean().item())  # packed codes: the fraction of differing bytes
            entry["max_abs_diff"] = max(entry["max_abs_diff"], diff)
    all_same = all(e["identical"] == e["tensors"] for e in kinds.values())
    return {"identical": all_same, "by_kind": kinds}


def journal_trials(journal: Path) -> dict[int, dict]:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(str(journal)))
    trials = {}
    for summary in optuna.get_all_study_summaries(storage):
        for trial in optuna.load_study(study_name=summary.study_name, storage=storage).get_trials(deepcopy=False):
            if trial.state.name == "COMPLETE":
                trials[trial.number] = {"parameters": trial.user_attrs.get("abliteration_parameters"),
                                        "metrics": trial.user_attrs.get("metrics")}
    return trials


def compare_trials(one: Path, split: Path) -> dict:
    a, b = journal_trials(one), journal_trials(split)
    rows, worst_kl, same_counts = [], 0.0, True
    for number in sorted(set(a) & set(b)):
        ma, mb = a[number]["metrics"] or {}, b[number]["metrics"] or {}
        row = {"trial": number, "same_parameters": a[number]["parameters"] == b[number]["parameters"]}
        for key in sorted(set(ma) & set(mb)):
            if "second" in key:
                continue
            if isinstance(ma[key], float) and isinstance(mb[key], float):
                relative = abs(ma[key] - mb[key]) / max(abs(ma[key]), 1e-12)
                row[key] = {"one": ma[key], "split": mb[key], "relative_diff": relative}
                if key.startswith("kl"):
                    worst_kl = max(worst_kl, relative)
            elif ma[key] != mb[key]:
                row[key] = {"one": ma[key], "split": mb[key]}
                same_counts = False
        rows.append(row)
    return {"trials_compared": len(rows), "only_in_one": sorted(set(a) - set(b)), "only_in_split": sorted(set(b) - set(a)),
            "all_same_parameters": all(r["same_parameters"] for r in rows), "all_counts_equal": same_counts,
            "max_kl_relative_diff": worst_kl, "per_trial": rows}


def header_placement(trial_dir: Path) -> dict | None:
    path = trial_dir / "chosen_trial.json"
    return json.loads(path.read_text()).get("placement") if path.is_file() else None


# ---------------------------------------------------------------- the run

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(common.SIZES), default="8b")
    parser.add_argument("--layers", type=int, default=None,
                        help="cut the decoder layers (default: the shape's with 2+ GPUs; 8 with one GPU, where the CPU "
                             "half of the model crosses PCIe in every forward pass)")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--calib_samples", type=int, default=64)
    parser.add_argument("--calib_seq_len", type=int, default=256)
    parser.add_argument("--prompts", type=int, default=32, help="train and test prompts per class")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--max_new_tokens", type=int, default=16)
    parser.add_argument("--skip_stage1", action="store_true")
    parser.add_argument("--skip_packed", action="store_true", help="no stage-2 run on the packed NVFP4 checkpoint")
    parser.add_argument("--budget_s", type=float, default=570.0, help="every child must end by then (device limit)")
    args = parser.parse_args()
    started = time.time()
    DEADLINE[0] = started + args.budget_s
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    gpus = gpu_count()
    split_kind = f"{gpus} GPUs" if gpus >= 2 else "cuda:0 + cpu" if gpus == 1 else "cpu + disk"
    result: dict = {"bench": "multi_gpu_split", "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                    "gpus": gpus, "split": split_kind, "size": args.size, "args": {k: str(v) for k, v in vars(args).items()}}

    def save() -> None:
        result["seconds"] = time.time() - started
        args.out.write_text(json.dumps(result, indent=2) + "\n")

    if args.layers is None and gpus == 1 and args.size == "8b":
        args.layers = 8
    if args.layers:
        common.SIZES[args.size] = {**common.SIZES[args.size], "num_hidden_layers": args.layers}
    result["layers"] = common.SIZES[args.size]["num_hidden_layers"]
    try:
        import importlib.metadata as md

        result["versions"] = {name: md.version(name) for name in ("torch", "transformers", "accelerate", "peft")}
        model = args.work / "bf16"
        shutil.rmtree(model, ignore_errors=True)
        result["build"] = common.build_model(args.size, model, 0, "cuda" if gpus else "cpu")
        size = weight_bytes(model)
        result["build"]["weight_bytes"] = size
        save()
        one_device = "cuda" if gpus else "cpu"

        if not args.skip_stage1:
            stage1 = {}
            common_flags = ["--input_model", str(model), "--format", "nvfp4", "--max_samples", str(args.calib_samples),
                            "--max_seq_len", str(args.calib_seq_len), "--overwrite"]
            stage1["one"] = step("stage1_one", CLI + ["quantize", *common_flags, "--output_model", str(args.work / "q_one"),
                                                      "--device", one_device], args.work, 600)
            save()
            stage1["split"] = step("stage1_split", CLI + ["quantize", *common_flags, "--output_model",
                                                          str(args.work / "q_split"),
                                                          *stage1_split_flags(gpus, size, args.work / "offload1")],
                                   args.work, 600)
            manifest = args.work / "q_split" / "quantize_manifest.json"
            if manifest.is_file():
                stage1["split"]["placement"] = json.loads(manifest.read_text()).get("placement", {}).get("layers_per_device")
            if stage1["one"]["ok"] and stage1["split"]["ok"]:
                stage1["comparison"] = compare_checkpoints(args.work / "q_one", args.work / "q_split")
            result["stage1"] = stage1
            save()

        prompts = common.write_prompts(args.work / "prompts", args.prompts, args.prompts)
        runs = [("stage2", model, size, [])]
        if gpus and (args.work / "q_one" / "hf_quant_config.json").is_file() and not args.skip_packed:
            # the stage-1 checkpoint held packed (Triton kernels on every GPU the split uses)
            runs.append(("stage2_packed", args.work / "q_one", weight_bytes(args.work / "q_one"), ["--load_as", "packed"]))
        for key, source, source_bytes, extra in runs:
            stage2 = result.setdefault(key, {})
            for name, placement in (("one", ["--device_map", "cuda:0" if gpus else "cpu"]),
                                    ("split", stage2_split_flags(gpus, source_bytes, args.work / f"offload_{key}"))):
                trial, study = args.work / f"trial_{key}_{name}", args.work / f"study_{key}_{name}"
                stage2[name] = step(f"{key}_{name}", CLI + [
                    "abliterate", "--model", str(source), *placement, *extra, "--dtypes", '["bfloat16"]', "--prompts",
                    prompts["spec"], "--n_trials", str(args.trials), "--n_startup_trials", str(args.trials), "--seed",
                    "0", "--max_response_length", str(args.max_new_tokens), "--out", str(trial), "--study_dir",
                    str(study), "--overwrite", "--select", "best_kl_under 100", "--no-plot"], args.work, 600)
                if (study / "journal.log").is_file():
                    times = trial_times(study / "journal.log", time.time() - stage2[name]["seconds"])
                    stage2[name].update(n_trials=times["n_trials"], seconds_per_trial=times["seconds_per_trial"])
                stage2[name]["placement"] = header_placement(trial)
                save()
            journals = [args.work / f"study_{key}_{name}" / "journal.log" for name in ("one", "split")]
            if all(j.is_file() for j in journals):
                stage2["comparison"] = compare_trials(*journals)
            save()
    except Exception as error:  # noqa: BLE001 - recorded, so the partial result still comes back
        result["error"] = f"{type(error).__name__}: {error}"
    save()
    print(json.dumps({key: result.get(key) for key in ("gpus", "split", "seconds", "error")}, indent=2))
    for stage in ("stage1", "stage2", "stage2_packed"):
        comparison = (result.get(stage) or {}).get("comparison")
        if comparison:
            print(stage, json.dumps({k: v for k, v in comparison.items() if k not in {"per_trial", "by_kind"}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
