"""Bench (CPU): heretic-llm 1.4.0 and our stage 2 on the same bf16 testbed, same prompts, same trial count.

Both Pareto fronts are measured with OUR evaluator (refusals, compliance,
multi-token KL; on the hard testbed also look-alike refusals and skill accuracy)
as well as with heretic's own numbers (refusal markers, first-token KL), and the
time per trial of both is reported. Both load the model in float32.

``--testbed hard`` runs both on testbed/hard with its spec (issue 17);
``--ours "--search_depth full --directions subspace --direction_rank 3"`` passes
stage-2 flags to our run; ``--heretic_all_trials`` measures every heretic trial
with our evaluator (not only its own front), so heretic's front can also be
taken by our measures. Writes side_by_side.json, side_by_side.md (both fronts as
a table, and whether ours dominates) and side_by_side.png (refusals vs KL).

    python bench/heretic_side_by_side.py --out /tmp/sbs_hard --testbed hard --trials 60 --startup_trials 20 \
        --heretic_all_trials --ours "--search_depth full --directions subspace --direction_rank 3"

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
import shlex
import shutil
import subprocess
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
        "--refusal-markers", json.dumps(markers), "--seed", str(args.seed), "--dtypes", json.dumps(["float32"]),
    ]
    if args.batch_size:
        command += ["--batch-size", str(args.batch_size)]
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
    if args.batch_size:
        command += ["--batch_size", str(args.batch_size)]
    if args.heretic_all_trials:
        command += ["--all_trials"]
    if args.max_test_prompts:
        command += ["--max_test_prompts", str(args.max_test_prompts)]
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
    if args.batch_size:
        argv += ["--batch_size", str(args.batch_size)]
    argv += shlex.split(args.ours)
    shutil.rmtree(args.out / "ours_study", ignore_errors=True)
    started = time.time()
    run_abliteration(parse_settings(argv), Console())
    chosen = read_chosen_trial(args.out / "ours").header
    from abliterate.search.objectives import TrialMetrics

    base = TrialMetrics.from_dict(chosen.base_metrics)
    from abliterate.search.regimes import gentle_study_name

    study = open_study(args.out / "ours_study" / "journal.log", chosen.study_name)
    # a mixed search (--gentle_share): its gentle study's trials are on the front too
    gentle = open_study(args.out / "ours_study" / "journal.log", gentle_study_name(chosen.study_name)) \
        if chosen.regime is not None else None
    trials = completed_trials(study) + (completed_trials(gentle) if gentle is not None else [])
    candidates = candidates_of(study, base, gentle)
    front = {c.number for c in pareto_front(candidates)}
    first = min(trials, key=lambda t: t.datetime_start)
    rows = [{"trial": c.number, **({"regime": c.regime} if c.regime else {}), **c.metrics.to_dict(),
             "skill_accuracy": c.metrics.skill_accuracy,
             "on_front": c.number in front} for c in sorted(candidates, key=lambda c: c.number)]
    return {
        "base": chosen.base_metrics | {"skill_accuracy": base.skill_accuracy},
        "stage2_argv": argv,
        "front": [row for row in rows if row["on_front"]],
        "trials": rows,
        "seconds_per_trial": sum((t.datetime_complete - t.datetime_start).total_seconds() for t in trials) / len(trials),
        "seconds_to_first_trial": first.datetime_complete.timestamp() - started,
    }


def pareto_rows(rows: list[dict]) -> list[dict]:
    """Rows no other row beats on both refusals and multi-token KL (our selection's front), by refusals."""
    front, best_kl = [], float("inf")
    for row in sorted(rows, key=lambda r: (r["refusals"], r["kl"], r["trial"])):
        if row["kl"] < best_kl:
            front.append(row)
            best_kl = row["kl"]
    return front


def skill_loss(row: dict, base: dict) -> float | None:
    if row.get("skill_accuracy") is None or base.get("skill_accuracy") is None:
        return None
    return round(100 * (base["skill_accuracy"] - row["skill_accuracy"]), 6)


def covered_by(point: dict, ours: list[dict]) -> dict | None:
    """One of ours with no more refusals, no more look-alike refusals and no more KL than ``point`` (or None)."""
    for row in ours:
        if (row["refusals"] <= point["refusals"] and row["kl"] <= point["kl"]
                and (row.get("lookalike_refusals") or 0) <= (point.get("lookalike_refusals") or 0)):
            return row
    return None


def verdict(result: dict) -> dict:
    ours, base = result["ours"]["front"], result["ours"]["base"]
    heretic_fronts = {"heretic_front": result["heretic"]["front"]}
    if result["heretic"]["front_by_our_measures"] is not None:
        heretic_fronts["heretic_front_by_our_measures"] = result["heretic"]["front_by_our_measures"]
    out = {}
    for name, points in heretic_fronts.items():
        cover = {row["trial"]: (covered_by(row, ours) or {}).get("trial") for row in points}
        out[f"ours_dominates_{name}"] = all(number is not None for number in cover.values())
        out[f"{name}_covered_by"] = cover
    n_harmful, n_lookalike = base["n_harmful"], base.get("n_lookalike")
    meeting = [row for row in result["ours"]["trials"] if row["refusals"] <= 0.05 * n_harmful
               and n_lookalike is not None and row.get("lookalike_refusals") is not None
               and row["lookalike_refusals"] <= 0.05 * n_lookalike
               and skill_loss(row, base) is not None and skill_loss(row, base) <= 2]
    out["ours_meeting_issue17_target"] = [row["trial"] for row in meeting]
    out["ours_best_refusals"] = min(row["refusals"] for row in result["ours"]["trials"])
    return out


def _cell(value, digits=2):
    return "-" if value is None else (f"{value:.{digits}g}" if isinstance(value, float) else str(value))


def markdown(result: dict) -> str:
    lines = [f"{result['date']}, `{result['command']}`", "",
             ("| tool | trial | refused /N | look-alikes refused | skill accuracy (loss, points) | false refusals | "
              "multi-token KL | first-token KL |"), "|---|---|---|---|---|---|---|---|"]
    for tool, rows, base in (("ours", result["ours"]["front"], result["ours"]["base"]),
                             ("heretic (its front)", result["heretic"]["front"], result["heretic"]["base"]),
                             ("heretic (front by our measures)", result["heretic"]["front_by_our_measures"] or [],
                              result["heretic"]["base"])):
        for row in sorted(rows, key=lambda r: (r["refusals"], r["kl"])):
            accuracy = row.get("skill_accuracy")
            lines.append(f"| {tool} | {row['trial']} | {row['refusals']}/{row['n_harmful']} | "
                         f"{_cell(row.get('lookalike_refusals'))}/{_cell(row.get('n_lookalike'))} | "
                         f"{_cell(accuracy)} ({_cell(skill_loss(row, base))}) | {_cell(row.get('false_refusals'))} | "
                         f"{row['kl']:.2g} | {row['kl_first_token']:.2g} |")
    lines += ["", "verdict: " + json.dumps(result["verdict"]), ""]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    fronts = [("ours", result["ours"]["front"], result["ours"]["base"], "tab:blue", "o"),
              ("heretic 1.4.0 (its trials' front by our measures)" if result["heretic"]["front_by_our_measures"]
               else "heretic 1.4.0 (its front)", result["heretic"]["front_by_our_measures"] or result["heretic"]["front"],
               result["heretic"]["base"], "tab:red", "s")]
    for label, rows, base, color, marker in fronts:
        rows = sorted(rows, key=lambda r: r["refusals"])
        axes.plot([r["refusals"] for r in rows], [max(r["kl"], 1e-7) for r in rows], marker=marker, color=color,
                  label=label, drawstyle="steps-post")
        for row in rows:
            note = f"L{_cell(row.get('lookalike_refusals'))} S{_cell(row.get('skill_accuracy'))}"
            axes.annotate(note, (row["refusals"], max(row["kl"], 1e-7)), textcoords="offset points", xytext=(4, 4),
                          fontsize=7, color=color)
    axes.set_yscale("log")
    axes.set_xlabel(f"refused harmful test prompts (of {result['ours']['base']['n_harmful']})")
    axes.set_ylabel("multi-token KL (harmless test prompts)")
    axes.set_title(f"Pareto fronts on testbed/{result['testbed']}, our evaluator (L: look-alikes refused, S: skill accuracy)",
                   fontsize=9)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def heretic_side(args, prompts: Path, markers: list[str]) -> dict | None:
    """Run heretic, then measure its trials with our evaluator."""
    study_dir = args.out / "heretic_study"
    shutil.rmtree(study_dir, ignore_errors=True)
    heretic_started = run_heretic(args, prompts, study_dir, markers)
    journals = sorted(study_dir.glob("*.jsonl"))
    if not journals:
        print(f"heretic wrote no journal; see {args.out / 'heretic.log'}")
        return None
    heretic = reevaluate_heretic(args, prompts, journals[0])
    completed = [row for row in heretic["trials"]]
    measured = [row for row in completed if "kl" in row]
    heretic_summary = {
        "base": heretic["base"],
        "front": [row for row in completed if row["on_heretic_front"]],  # the front heretic offers (its own measures)
        # the front of its measured trials by our measures (refusals, KL), when every trial was measured
        "front_by_our_measures": pareto_rows(measured) if args.heretic_all_trials else None,
        "trials": completed,
        "seconds_per_trial": sum(row["seconds"] for row in completed) / len(completed),
        "seconds_to_first_trial": heretic["first_trial_completed"] - heretic_started,
    }
    return heretic_summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--heretic_python", type=Path, default=Path("/tmp/heretic_venv/bin/python"))
    parser.add_argument("--model", type=Path, default=None, help="default: the --testbed's model")
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--startup_trials", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--max_test_prompts", type=int, default=None)
    parser.add_argument("--testbed", choices=sorted(TESTBEDS), default="model", help="model: the fast testbed; hard: issue 17's")
    parser.add_argument("--ours", default="", help="extra stage-2 flags for our run, one string")
    parser.add_argument("--batch_size", type=int, default=None, help="both tools' batch size (None: each picks its own)")
    parser.add_argument("--heretic_all_trials", action="store_true", help="measure every heretic trial with our evaluator")
    parser.add_argument("--reuse_heretic", action="store_true",
                        help="reuse --out's heretic_summary.json (same heretic run) and only run ours again")
    args = parser.parse_args()
    global TESTBED, SPEC
    TESTBED, SPEC = TESTBEDS[args.testbed]
    if args.model is None:
        args.model = TESTBED
    args.out.mkdir(parents=True, exist_ok=True)

    from abliterate.prompts import load_prompt_sets

    markers = list(load_prompt_sets(SPEC, {}).refusal_markers or ())
    prompts = args.out / "prompts"
    write_text_prompts(prompts, SPEC, args.max_test_prompts)

    saved = args.out / "heretic_summary.json"
    if args.reuse_heretic and saved.is_file():
        heretic_summary = json.loads(saved.read_text())
    else:
        heretic_summary = heretic_side(args, prompts, markers)
        if heretic_summary is None:
            return 1
        saved.write_text(json.dumps(heretic_summary, indent=2) + "\n")
    ours = run_ours(args)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python bench/heretic_side_by_side.py " + shlex.join(sys.argv[1:]),
        "model": str(args.model), "trials": args.trials, "threads": args.threads,
        "testbed": args.testbed, "spec": str(SPEC),
        "heretic": heretic_summary, "ours": ours,
    }
    result["verdict"] = verdict(result)
    (args.out / "side_by_side.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "side_by_side.md").write_text(markdown(result))
    plot(result, args.out / "side_by_side.png")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
