"""Helper for heretic_side_by_side.py; runs INSIDE heretic's own virtualenv (never ours).

Reads heretic's Optuna journal, rebuilds its edit for each trial on its Pareto
front through heretic's own public classes (``Model.abliterate``), and measures
it with OUR evaluator (refusals, compliance, multi-token KL), so both tools are
judged by the same yardstick. Also reports heretic's own numbers and timings.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", type=Path, required=True, help="folder with harmful/harmless _train/_test .txt")
    parser.add_argument("--journal", type=Path, required=True)
    parser.add_argument("--spec", type=Path, required=True)
    parser.add_argument("--kl_tokens", type=int, default=8)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import optuna
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    sys.argv = [sys.argv[0]]  # heretic's Settings parse the command line
    from heretic.config import Settings
    from heretic.model import AbliterationParameters, Model
    from heretic.utils import load_prompts

    sys.path.insert(0, str(REPO))
    from abliterate.evaluation import EvaluationConfig, Evaluator
    from abliterate.prompts import load_prompt_sets

    spec = load_prompt_sets(args.spec, {})
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(args.journal)))
    study = optuna.load_study(study_name="heretic", storage=storage)
    # Exactly the settings heretic ran with (its seed included, which its low-rank SVD uses).
    stored = json.loads(study.user_attrs["settings"])
    stored["batch_size"] = stored.get("batch_size") or 32  # its CLI finds one itself; its classes need one set
    settings = Settings(**stored)
    model = Model(settings)
    good_means = model.get_residuals_mean(load_prompts(settings, settings.good_prompts))
    bad_means = model.get_residuals_mean(load_prompts(settings, settings.bad_prompts))
    directions = F.normalize(bad_means - good_means, p=2, dim=1)
    if settings.orthogonalize_direction:  # heretic's optional projected variant, as its run used it
        good_directions = F.normalize(good_means, p=2, dim=1)
        directions = F.normalize(directions - (directions * good_directions).sum(1, keepdim=True) * good_directions, p=2, dim=1)

    config = EvaluationConfig(refusal_markers=tuple(spec.refusal_markers or ()), compliance_openers=spec.compliance_openers,
                              compliance_patterns=spec.compliance_patterns, kl_tokens=args.kl_tokens)
    model.reset_model()
    harmful_test = (args.prompts / "harmful_test.txt").read_text().splitlines()  # exactly the prompts heretic used
    harmless_test = (args.prompts / "harmless_test.txt").read_text().splitlines()
    evaluator = Evaluator(model.model, model.tokenizer, harmful_test, harmless_test, config)

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    front = {t.number for t in study.best_trials}
    rows = []
    for trial in complete:
        row = {"trial": trial.number, "heretic_refusals": trial.user_attrs["refusals"],
               "heretic_kl_first_token": trial.user_attrs["kl_divergence"],
               "seconds": (trial.datetime_complete - trial.datetime_start).total_seconds(),
               "on_heretic_front": trial.number in front}
        if trial.number in front:
            model.reset_model()
            model.abliterate(directions, trial.user_attrs["direction_index"],
                             {k: AbliterationParameters(**v) for k, v in trial.user_attrs["parameters"].items()})
            result = evaluator.evaluate(model.model)
            row.update(refusals=result.refusals, compliance=result.compliance, n_harmful=result.n_harmful,
                       kl=result.kl, kl_first_token=result.kl_first_token)
        rows.append(row)
    first = min(complete, key=lambda t: t.number)
    output = {
        "base": {"refusals": evaluator.base.refusals, "compliance": evaluator.base.compliance},
        "trials": rows,
        "first_trial_started": first.datetime_start.timestamp(),
        "first_trial_completed": first.datetime_complete.timestamp(),
        "measured_at": time.time(),
    }
    args.out.write_text(json.dumps(output, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
