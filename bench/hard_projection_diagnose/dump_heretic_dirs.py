import json, sys, torch, optuna
import torch.nn.functional as F
torch.set_num_threads(1)
sys.argv = [sys.argv[0]]
from heretic.config import Settings
from heretic.model import Model
from heretic.utils import load_prompts
journal = "/tmp/s17/sbs/heretic_study/--work--wt-search17--testbed--hard.jsonl"
storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(journal))
study = optuna.load_study(study_name="heretic", storage=storage)
stored = json.loads(study.user_attrs["settings"])
print({k: v for k, v in stored.items() if "prompt" not in k or k == "system_prompt"})
stored["batch_size"] = stored.get("batch_size") or 32
stored["model"] = "/work/wt-h17/testbed/hard"
for key in ("good_prompts", "bad_prompts", "good_evaluation_prompts", "bad_evaluation_prompts"):
    stored[key]["dataset"] = stored[key]["dataset"].replace("/tmp/s17/sbs", "/tmp/s17/sbs")
out = {}
for system in (stored.get("system_prompt"),):
    s = dict(stored); s["system_prompt"] = system
    settings = Settings(**s)
    model = Model(settings)
    good = model.get_residuals_mean(load_prompts(settings, settings.good_prompts))
    bad = model.get_residuals_mean(load_prompts(settings, settings.bad_prompts))
    out[f"good_{system is not None}"] = good
    out[f"bad_{system is not None}"] = bad
torch.save(out, "/tmp/h17/heretic_means.pt")
print("saved")
