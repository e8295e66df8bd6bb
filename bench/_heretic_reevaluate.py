"""Helper for heretic_side_by_side.py; runs INSIDE heretic's own virtualenv (never ours).

Reads heretic's Optuna journal, rebuilds its edit for each trial on its Pareto
front through heretic's own public classes (``Model.abliterate``), and measures
it with OUR evaluator (refusals, compliance, multi-token KL; and, where the prompt
spec has them, look-alike refusals and skill accuracy), configured exactly as our
stage 2 configures it for that spec, so both tools are judged by the same
yardstick. ``--all_trials`` measures every completed trial, not only its front.
Also reports heretic's own numbers and timings.
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
    parser.add_argument("--batch_size", type=int, default=None, help="our evaluator's batch size (None: automatic)")
    parser.add_argument("--max_test_prompts", type=int, default=None, help="the cap our run used (look-alike and skill sets)")
    parser.add_argument("--all_trials", action="store_true", help="measure every completed trial, not only the front")
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
    from abliterate.evaluation import Evaluator
    from abliterate.evaluation_inputs import EvaluationInputs, evaluation_config
    from abliterate.prompts import prompt_sets_of
    from abliterate.search.objectives import TrialMetrics
    from abliterate.settings import AbliterateSettings

    ours = AbliterateSettings.from_mapping({"model": args.model, "prompts": args.spec, "kl_tokens": args.kl_tokens,
                                            "batch_size": args.batch_size, "max_test_prompts": args.max_test_prompts})
    inputs = EvaluationInputs.from_settings(ours)
    spec = prompt_sets_of(inputs)
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

    config = evaluation_config(inputs, spec)  # what our stage 2 runs with on this spec
    model.reset_model()
    harmful_test = (args.prompts / "harmful_test.txt").read_text().splitlines()  # exactly the prompts heretic used
    harmless_test = (args.prompts / "harmless_test.txt").read_text().splitlines()
    evaluator = Evaluator(model.model, model.tokenizer, harmful_test, harmless_test, config, **spec.collateral_sets())

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    front = {t.number for t in study.best_trials}
    rows = []
    for trial in complete:
        row = {"trial": trial.number, "heretic_refusals": trial.user_attrs["refusals"],
               "heretic_kl_first_token": trial.user_attrs["kl_divergence"],
               "seconds": (trial.datetime_complete - trial.datetime_start).total_seconds(),
               "on_heretic_front": trial.number in front}
        if trial.number in front or args.all_trials:
            model.reset_model()
            model.abliterate(directions, trial.user_attrs["direction_index"],
                             {k: AbliterationParameters(**v) for k, v in trial.user_attrs["parameters"].items()})
            result = evaluator.evaluate(model.model)
            metrics = TrialMetrics.from_eval_result(result)
            row.update({key: value for key, value in metrics.to_dict().items() if key != "seconds"},
                       skill_accuracy=metrics.skill_accuracy, heretic_parameters=trial.user_attrs["parameters"],
                       heretic_direction_index=trial.user_attrs["direction_index"])
        rows.append(row)
    first = min(complete, key=lambda t: t.number)
    output = {
        "base": TrialMetrics.from_eval_result(evaluator.base).to_dict()
                | {"skill_accuracy": TrialMetrics.from_eval_result(evaluator.base).skill_accuracy},
        "trials": rows,
        "first_trial_started": first.datetime_start.timestamp(),
        "first_trial_completed": first.datetime_complete.timestamp(),
        "measured_at": time.time(),
    }
    args.out.write_text(json.dumps(output, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
