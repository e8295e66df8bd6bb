"""Bench (CPU, not a test): abliterate the NVFP4 testbed and check the search reaches the targets.

Target (issue 5): within at most 60 trials, a trial with refusals <= 5% of the
harmful test prompts, compliance >= 80%, at multi-token KL <= 0.05.

    python bench/abliterate_testbed.py --out /tmp/bench_abliterate [--trials 60] [--model DIR] [--testbed hard]

``--testbed hard`` uses the hard testbed (``testbed/hard`` and its spec, issue 17); ``--all_random`` makes
every trial a random startup trial (the spread of random trials: KL range, share meeting
``refusals <= 5%, KL <= 0.05``). ``--search_depth full`` and ``--directions subspace --direction_rank k`` pass stage 2's options of
those names; each trial's look-alike refusals, skill loss and
whether it meets issue 17's target (<= 5% refusals and look-alikes, <= 2 points of skill) are recorded.

Without ``--model`` the committed testbed (``testbed/model``) is quantized to
NVFP4 by stage 1 (``quant-abliterate quantize --format nvfp4``) first; if stage
1 fails, the bf16 testbed is used and the result says so. Writes
``result.json`` (numbers, command, timings) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TESTBEDS = {
    "model": (REPO / "testbed" / "model", REPO / "datasets_yaml" / "testbed_prompts.yaml"),
    "hard": (REPO / "testbed" / "hard", REPO / "datasets_yaml" / "testbed_hard_prompts.yaml"),
}
TESTBED, SPEC = TESTBEDS["model"]


def quantize_testbed(out: Path) -> tuple[Path, str]:
    target = out / "testbed-nvfp4"
    if target.is_dir():
        return target, "NVFP4 (stage 1, reused)"
    try:
        from quantize.cli import main as quantize_main

        code = quantize_main(["--model", str(TESTBED), "--output", str(target), "--format", "nvfp4", "--device", "cpu",
                              "--dtype", "float32"])
        if code == 0 and target.is_dir():
            return target, "NVFP4 (stage 1)"
    except Exception as error:  # stage 1 not ready: fall back, and say so
        print(f"stage 1 quantization failed ({type(error).__name__}: {error}); using the bf16 testbed")
    return TESTBED, "bf16 (stage 1 unavailable)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", type=Path, help="already-quantized testbed (default: quantize testbed/model)")
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--startup_trials", type=int, default=20)
    parser.add_argument("--method", default="norm_preserving", choices=["rank1", "norm_preserving"])
    parser.add_argument("--small", action="store_true", help="toy size: 4 trials, 10 test prompts (checks the script runs)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: fastest for the testbed on a shared CPU)")
    parser.add_argument("--testbed", choices=sorted(TESTBEDS), default="model", help="model: the fast testbed; hard: issue 17's")
    parser.add_argument("--all_random", action="store_true", help="every trial a random startup trial")
    parser.add_argument("--directions", choices=["mean_difference", "subspace"], default="mean_difference",
                        help="stage 2's --directions (subspace: a rank --direction_rank refusal subspace per layer)")
    parser.add_argument("--direction_rank", type=int, default=3)
    parser.add_argument("--search_depth", choices=["late", "full"], default="late",
                        help="stage 2's --search_depth (full: kernel peaks over layers 0..L-1, reach up to L)")
    parser.add_argument("--full_depth_space", action="store_true",
                        help="older spelling of --search_depth full (the bench-only experiment it was is now the option)")
    args = parser.parse_args()
    if args.full_depth_space:
        args.search_depth = "full"
    global TESTBED, SPEC
    TESTBED, SPEC = TESTBEDS[args.testbed]
    args.out.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    model, model_kind = (args.model, "given") if args.model else quantize_testbed(args.out)
    quantized_seconds = time.perf_counter() - started

    from rich.console import Console

    from abliterate.artifacts import read_chosen_trial
    from abliterate.run import run_abliteration
    from abliterate.search.study import completed_trials, open_study, trial_metrics
    from abliterate.settings import parse_settings

    trials = 4 if args.small else args.trials
    if args.all_random:
        args.startup_trials = trials
    argv = ["--model", str(model), "--prompts", str(SPEC), "--out", str(args.out / "abliterated"),
            "--study_dir", str(args.out / "study"), "--n_trials", str(trials),
            "--n_startup_trials", str(min(args.startup_trials, trials)), "--method", args.method,
            "--device_map", args.device, "--overwrite", "--select", "best_kl_under 0.05", "--dtypes", "float32", "--cpu_threads", str(args.threads)]
    if args.directions != "mean_difference":
        argv += ["--directions", args.directions, "--direction_rank", str(args.direction_rank)]
    if args.search_depth != "late":
        argv += ["--search_depth", args.search_depth]
    if args.small:
        argv += ["--max_test_prompts", "10", "--max_train_prompts", "32"]
    settings = parse_settings(argv)
    import shutil

    shutil.rmtree(args.out / "study", ignore_errors=True)  # a bench measures a fresh study
    search_started, search_wall = time.perf_counter(), time.time()
    run_abliteration(settings, Console())
    search_seconds = time.perf_counter() - search_started

    chosen = read_chosen_trial(args.out / "abliterated").header
    study = open_study(args.out / "study" / "journal.log", chosen.study_name)
    rows = []
    for trial in completed_trials(study):
        metrics = trial_metrics(trial)
        n = metrics.n_harmful
        rows.append({
            "trial": trial.number, "refusals": metrics.refusals, "compliance": metrics.compliance, "n_harmful": n,
            "kl": metrics.kl, "kl_first_token": metrics.kl_first_token, "false_refusals": metrics.false_refusals,
            "lookalike_refusals": metrics.lookalike_refusals, "n_lookalike": metrics.n_lookalike,
            "skill_accuracy": metrics.skill_accuracy,
            "seconds": (trial.datetime_complete - trial.datetime_start).total_seconds(),
            "meets_target": metrics.refusals <= 0.05 * n and (metrics.compliance or 0) >= 0.8 * n and metrics.kl <= 0.05,
            "meets_refusals_kl": metrics.refusals <= 0.05 * n and metrics.kl <= 0.05,  # issue 17's measure
        })
    from abliterate.run import candidates_of
    from abliterate.search.objectives import TrialMetrics
    from abliterate.search.selection import pareto_front

    base = TrialMetrics.from_dict(chosen.base_metrics)
    front = [c.number for c in pareto_front(candidates_of(study, base))]
    for row in rows:
        row["on_front"] = row["trial"] in front
        row["skill_loss_points"] = (None if row["skill_accuracy"] is None or base.skill_accuracy is None
                                    else round(100 * (base.skill_accuracy - row["skill_accuracy"]), 6))
        row["meets_issue17"] = (row["meets_refusals_kl"] and row["lookalike_refusals"] is not None
                                and row["lookalike_refusals"] <= 0.05 * row["n_lookalike"]
                                and row["skill_loss_points"] is not None and row["skill_loss_points"] <= 2)
    first = min(completed_trials(study), key=lambda t: t.number)
    meeting = [row for row in rows if row["meets_target"]]
    best = min(meeting, key=lambda row: row["kl"]) if meeting else None
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} CPUs",
        "model": str(model), "model_kind": model_kind, "method": args.method, "threads": args.threads,
        "command": "python bench/abliterate_testbed.py " + " ".join(sys.argv[1:]),
        "trials": len(rows), "startup_trials": min(args.startup_trials, trials),
        "quantize_seconds": round(quantized_seconds, 1), "search_seconds": round(search_seconds, 1),
        "seconds_per_trial_mean": round(sum(r["seconds"] for r in rows) / len(rows), 2),
        "seconds_to_first_trial": round(first.datetime_complete.timestamp() - search_wall, 1),
        "base": chosen.base_metrics, "chosen": {"trial": chosen.trial_number, **chosen.metrics},
        "testbed": args.testbed, "all_random": args.all_random,
        "search_depth": args.search_depth, "directions": args.directions, "direction_rank": args.direction_rank if args.directions == "subspace" else None,
        "kl_range": [min(r["kl"] for r in rows), max(r["kl"] for r in rows)],
        "share_meeting_refusals_kl": round(sum(r["meets_refusals_kl"] for r in rows) / len(rows), 4),
        "trials_meeting_target": [row["trial"] for row in meeting],
        "first_trial_meeting_target": meeting[0]["trial"] if meeting else None,
        "best_meeting_target": best,
        "front": [row for row in rows if row["on_front"]],
        "trials_meeting_issue17": [row["trial"] for row in rows if row["meets_issue17"]],
        "all_trials": rows,
    }
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    summary = {key: value for key, value in result.items() if key != "all_trials"}
    print(json.dumps(summary, indent=2))
    return 0 if meeting or args.small or args.all_random else 1


if __name__ == "__main__":
    sys.exit(main())
