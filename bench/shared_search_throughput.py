"""Bench (GPU, two of them): trials per hour of one study searched by one worker vs by `--workers 2`.

Issue 18, item 3's second half: two workers (one per GPU, each with its own copy of the model) on one shared
study should reach >= 1.8x the trials per hour of one worker. Builds a random Llama of `--size` (8B-shaped by
default, the testbed's tokenizer), writes the general prompt spec's sets as files, then runs
`quant-abliterate abliterate` twice on the same settings, each on a fresh journal (`--storage journal:...`):
`--workers 1`, then `--workers 2`. Trials per hour are read from each journal: complete trials divided by the
time from the first trial's start to the last one's end (loading excluded; both workers load at once). Also
recorded: wall time of each run, trials per worker (the `worker` attribute of each trial), unique numbers and
the exact count.

Device, one line on nvidia-h200-x2 (carry [".whl"]: the wheels of bench/stage2_gpu_vs_heretic.py's setup):

    pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site python bench/shared_search_throughput.py --work /tmp/shared --out $OUT/shared_search_throughput.json

CPU smoke test here (tiny model, tiny counts; the ratio means nothing on a shared CPU):

    .venv/bin/python bench/shared_search_throughput.py --size tiny --device cpu --trials 4 --max_test_prompts 8 --max_new_tokens 8 --work /tmp/shared_tiny --out /tmp/shared_tiny/result.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO))

import stage2_gpu_vs_heretic as common
from _child_measure import DEADLINE, gpu_name, run_child, versions


def journal_rate(journal: Path) -> dict:
    """Trials per hour of the one study in ``journal`` over its trials' own time window."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(str(journal)))
    names = optuna.get_all_study_names(storage)
    if len(names) != 1:
        return {"ok": False, "error": f"expected one study in {journal}, found {names}"}
    trials = optuna.load_study(study_name=names[0], storage=storage).get_trials(deepcopy=False)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    if not complete:
        return {"ok": False, "error": "no complete trial", "states": [t.state.name for t in trials]}
    window = (max(t.datetime_complete for t in complete) - min(t.datetime_start for t in complete)).total_seconds()
    per_worker: dict[str, int] = {}
    for trial in complete:
        worker = trial.user_attrs.get("worker", "?")
        per_worker[worker] = per_worker.get(worker, 0) + 1
    durations = [(t.datetime_complete - t.datetime_start).total_seconds() for t in complete]
    # steady state: from the moment every worker had begun its first trial (a later-loading worker dilutes the
    # plain window), the trials begun since, over the time to the last end
    firsts = {}
    for trial in complete:
        worker = trial.user_attrs.get("worker", "?")
        firsts[worker] = min(firsts.get(worker, trial.datetime_start), trial.datetime_start)
    all_active = max(firsts.values())
    steady = [t for t in complete if t.datetime_start >= all_active]
    steady_window = (max(t.datetime_complete for t in complete) - all_active).total_seconds()
    return {"steady_trials_per_hour": 3600 * len(steady) / steady_window if steady_window > 0 and len(steady) > 1
            else None, "steady_trials": len(steady),"ok": True, "study": names[0], "n_complete": len(complete), "n_trials_in_study": len(trials),
            "unique_numbers": len({t.number for t in trials}) == len(trials),
            "states": sorted({t.state.name for t in trials}), "window_s": window,
            "trials_per_hour": 3600 * len(complete) / window if window > 0 else None,
            "seconds_per_trial": sum(durations) / len(durations), "trials_per_worker": per_worker}


def run_search(args, model: Path, spec: str, workers: int) -> dict:
    work = args.work / f"workers{workers}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    journal = work / "journal.log"
    command = [sys.executable, "-m", "pipelines.cli", "abliterate", "--model", str(model), "--prompts", spec,
               "--n_trials", str(args.trials), "--n_startup_trials", str(args.trials), "--max_response_length",
               str(args.max_new_tokens), "--out", str(work / "out"), "--study_dir", str(work / "study"),
               "--storage", f"journal:{journal}", "--workers", str(workers), "--select", "best_kl_under 0.05",
               "--no-plot", "--seed", str(args.seed)]
    if args.device == "cpu":
        command += ["--device_map", "cpu", "--dtypes", "float32", "--cpu_threads", str(args.cpu_threads)]
    result = run_child(command, work / "run.log", dict(os.environ), REPO, args.timeout)
    summary = {"command": " ".join(command), "returncode": result.returncode, "timed_out": result.timed_out,
               "wall_s": result.wall_s, "log": str(result.log), "peak_gpu_bytes": result.memory.get("peak_bytes")}
    summary.update(journal_rate(journal) if journal.is_file() else {"ok": False, "error": "no journal"})
    if result.returncode != 0 or not summary.get("ok"):
        summary["error_tail"] = result.tail()
    worker_logs = sorted((work / "study").glob("worker-*.log"))
    summary["worker_logs"] = {log.name: log.read_text()[-1500:] for log in worker_logs}
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(common.SIZES), default="8b")
    parser.add_argument("--work", type=Path, default=Path("/tmp/shared_search"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--trials", type=int, default=20, help="trials of each run (all random startup trials)")
    parser.add_argument("--max_new_tokens", type=int, default=100)
    parser.add_argument("--max_test_prompts", type=int, default=100)
    parser.add_argument("--max_train_prompts", type=int, default=None)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available")
    parser.add_argument("--cpu_threads", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    parser.add_argument("--budget_s", type=float, default=580, help="every child ends by then; the JSON is written")
    args = parser.parse_args()
    started = time.time()
    DEADLINE[0] = started + args.budget_s
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    args.work.mkdir(parents=True, exist_ok=True)
    result: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": gpu_name() if gpus else platform.processor(),
                    "gpus": gpus, "versions": versions(), "argv": sys.argv, "size": args.size, "trials": args.trials}
    try:
        # built here (CUDA in this process is no worker's: each run is a child process, pinned by --workers)
        result["model"] = common.build_model(args.size, args.work / "model", args.seed, args.device)
        prompts = common.write_prompts(args.work / "prompts", args.max_train_prompts, args.max_test_prompts)
        result["prompts"] = prompts["counts"]
        result["one_worker"] = run_search(args, args.work / "model", prompts["spec"], 1)
        result["two_workers"] = run_search(args, args.work / "model", prompts["spec"], 2)
        one, two = result["one_worker"].get("trials_per_hour"), result["two_workers"].get("trials_per_hour")
        result["speedup"] = two / one if one and two else None
        one, two = (result["one_worker"].get("steady_trials_per_hour"),
                    result["two_workers"].get("steady_trials_per_hour"))
        result["steady_speedup"] = two / one if one and two else None
        result["target"] = ">= 1.8x trials per hour with two workers (one per GPU)"
        result["two_gpus"] = gpus >= 2
    except Exception as error:  # record, never lose the JSON
        result["error"] = f"{type(error).__name__}: {error}"
    result["total_s"] = time.time() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps({k: result.get(k) for k in ("device", "gpus", "speedup", "steady_speedup", "error", "total_s")}, default=str))
    for key in ("one_worker", "two_workers"):
        run = result.get(key, {})
        print(key, {k: run.get(k) for k in ("returncode", "n_complete", "trials_per_hour", "window_s",
                                            "trials_per_worker", "wall_s")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
