"""Bench (CPU): heretic-llm 1.4.0 and our stage 2 on the same bf16 testbed, same prompts, same trial count.

Both Pareto fronts are measured with OUR evaluator (refusals, compliance,
multi-token KL) as well as with heretic's own numbers (refusal markers,
first-token KL), and the time per trial of both is reported.

heretic lives in its own virtualenv, never in ours. One way to make it (its
dependencies overlaid on ours through a .pth file, its own pins installed on
top):

    python -m venv /tmp/heretic_venv
    echo $PWD/.venv/lib/python3.11/site-packages > /tmp/heretic_venv/lib/python3.11/site-packages/qa.pth
    /tmp/heretic_venv/bin/pip install --no-deps heretic-llm==1.4.0
    /tmp/heretic_venv/bin/pip install immutabledict langdetect questionary tomli-w 'lm-eval~=0.4' \
        'bitsandbytes~=0.49' 'optuna~=4.7' 'rich~=14.3' 'datasets~=4.7'

    python bench/heretic_side_by_side.py --out /tmp/side_by_side --heretic_python /tmp/heretic_venv/bin/python

heretic's post-search menu needs a TTY; without one it stops after the search,
and its results are read from its Optuna journal.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TESTBED = REPO / "testbed" / "model"
SPEC = REPO / "datasets_yaml" / "testbed_prompts.yaml"


def write_text_prompts(folder: Path, spec_path: Path, limit: int | None) -> None:
    from abliterate.prompts import SETS, load_prompt_sets

    prompts = load_prompt_sets(spec_path, {}, limit_test=limit)
    folder.mkdir(parents=True, exist_ok=True)
    for name in SETS:
        (folder / f"{name}.txt").write_text("".join(p.replace("\n", " ") + "\n" for p in getattr(prompts, name)))


def run_heretic(args, prompts: Path, study_dir: Path, markers: list[str]) -> float:
    command = [
        str(args.heretic_python), "-c", "from heretic.main import main; main()",
        "--model", str(args.model), "--n-trials", str(args.trials), "--n-startup-trials", str(args.startup_trials),
        "--study-checkpoint-dir", str(study_dir),
        "--good-prompts.dataset", str(prompts / "harmless_train.txt"),
        "--bad-prompts.dataset", str(prompts / "harmful_train.txt"),
        "--good-evaluation-prompts.dataset", str(prompts / "harmless_test.txt"),
        "--bad-evaluation-prompts.dataset", str(prompts / "harmful_test.txt"),
        "--refusal-markers", json.dumps(markers), "--seed", str(args.seed),
    ]
    workdir = args.out / "heretic_cwd"
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH="")
    started = time.time()
    with open(args.out / "heretic.log", "w") as log:
        subprocess.run(command, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    return started


def reevaluate_heretic(args, prompts: Path, journal: Path) -> dict:
    out = args.out / "heretic_measured.json"
    command = [str(args.heretic_python), str(REPO / "bench" / "_heretic_reevaluate.py"), "--model", str(args.model),
               "--prompts", str(prompts), "--journal", str(journal), "--spec", str(SPEC), "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH="")
    subprocess.run(command, cwd=args.out / "heretic_cwd", env=env, check=True, stdin=subprocess.DEVNULL)
    return json.loads(out.read_text())


def run_ours(args) -> dict:
    from rich.console import Console

    from abliterate.artifacts import read_chosen_trial
    from abliterate.run import candidates_of, run_abliteration
    from abliterate.search.selection import pareto_front
    from abliterate.search.study import completed_trials, open_study
    from abliterate.settings import parse_settings

    argv = ["--model", str(args.model), "--prompts", str(SPEC), "--out", str(args.out / "ours"), "--overwrite",
            "--study_dir", str(args.out / "ours_study"), "--n_trials", str(args.trials),
            "--n_startup_trials", str(args.startup_trials), "--select", "best_kl_under 0.05",
            "--cpu_threads", str(args.threads), "--dtypes", "float32"]
    if args.max_test_prompts:
        argv += ["--max_test_prompts", str(args.max_test_prompts)]
    shutil.rmtree(args.out / "ours_study", ignore_errors=True)
    started = time.time()
    run_abliteration(parse_settings(argv), Console())
    chosen = read_chosen_trial(args.out / "ours").header
    from abliterate.search.objectives import TrialMetrics

    base = TrialMetrics.from_dict(chosen.base_metrics)
    study = open_study(args.out / "ours_study" / "journal.log", chosen.study_name)
    trials = completed_trials(study)
    front = pareto_front(candidates_of(study, base))
    first = min(trials, key=lambda t: t.number)
    return {
        "base": chosen.base_metrics,
        "front": [{"trial": c.number, **c.metrics.to_dict()} for c in front],
        "seconds_per_trial": sum((t.datetime_complete - t.datetime_start).total_seconds() for t in trials) / len(trials),
        "seconds_to_first_trial": first.datetime_complete.timestamp() - started,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--heretic_python", type=Path, default=Path("/tmp/heretic_venv/bin/python"))
    parser.add_argument("--model", type=Path, default=TESTBED)
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--startup_trials", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--max_test_prompts", type=int, default=None)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from abliterate.prompts import load_prompt_sets

    markers = list(load_prompt_sets(SPEC, {}).refusal_markers or ())
    prompts = args.out / "prompts"
    write_text_prompts(prompts, SPEC, args.max_test_prompts)

    study_dir = args.out / "heretic_study"
    shutil.rmtree(study_dir, ignore_errors=True)
    heretic_started = run_heretic(args, prompts, study_dir, markers)
    journals = sorted(study_dir.glob("*.jsonl"))
    if not journals:
        print(f"heretic wrote no journal; see {args.out / 'heretic.log'}")
        return 1
    heretic = reevaluate_heretic(args, prompts, journals[0])
    completed = [row for row in heretic["trials"]]
    heretic_summary = {
        "base": heretic["base"],
        "front": [row for row in completed if row["on_heretic_front"]],
        "seconds_per_trial": sum(row["seconds"] for row in completed) / len(completed),
        "seconds_to_first_trial": heretic["first_trial_completed"] - heretic_started,
    }
    ours = run_ours(args)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python bench/heretic_side_by_side.py " + " ".join(sys.argv[1:]),
        "model": str(args.model), "trials": args.trials, "threads": args.threads,
        "heretic": heretic_summary, "ours": ours,
    }
    (args.out / "side_by_side.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
