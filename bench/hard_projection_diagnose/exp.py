"""Hand-set edits on testbed/hard through OUR stage-2 machinery (LoraAbliterator + Evaluator)."""
import json, sys, time
sys.path.insert(0, "/work/wt-h17")
import torch
torch.set_num_threads(1)
from abliterate.settings import AbliterateSettings
from abliterate.evaluation_inputs import EvaluationInputs, evaluation_config
from abliterate.prompts import prompt_sets_of
from abliterate.loading import load_model
from abliterate.architectures.discovery import discover
from abliterate.evaluation import Evaluator
from abliterate.residuals import prompt_residuals
from abliterate.directions import refusal_directions, refusal_subspaces, normalize
from abliterate.edits.lora import LoraAbliterator
from abliterate.edits.plan import AbliterationParameters
from abliterate.edits.kernel import KernelParameters
from abliterate.search.objectives import TrialMetrics

S = AbliterateSettings.from_mapping({"model": "/work/wt-h17/testbed/hard",
                                     "prompts": "/work/wt-h17/datasets_yaml/testbed_hard_prompts.yaml", "dtypes": ["float32"]})
inputs = EvaluationInputs.from_settings(S)
P = prompt_sets_of(inputs)
loaded = load_model(S.model, dtypes=["float32"])
model, tok = loaded.model, loaded.tokenizer
arch = discover(model)
print([ (c.group, c.layer) for c in arch.components][:4])
config = evaluation_config(inputs, P)
ev = Evaluator(model, tok, P.harmful_test, P.harmless_test, config, **P.collateral_sets())
base = TrialMetrics.from_eval_result(ev.base)
print("base", base.to_dict())
H = prompt_residuals(model, arch.layers, tok, P.harmful_train, batch_size=64).values
G = prompt_residuals(model, arch.layers, tok, P.harmless_train, batch_size=64).values
HS = prompt_residuals(model, arch.layers, tok, P.harmful_train, batch_size=64, system_prompt="You are a helpful assistant.").values
GS = prompt_residuals(model, arch.layers, tok, P.harmless_train, batch_size=64, system_prompt="You are a helpful assistant.").values
torch.save({"H": H, "G": G, "HS": HS, "GS": GS}, "/tmp/h17/residuals.pt")
hm = torch.load("/tmp/h17/heretic_means.pt")
def proj(d, good):
    g = normalize(good); d = normalize(d)
    return normalize(d - (d * g).sum(-1, keepdim=True) * g)
dirs = {
  "ours": refusal_directions(H, G),
  "ours_projected": refusal_directions(H, G, projected=True),
  "sys_projected": refusal_directions(HS, GS, projected=True),
  "heretic": proj(hm["bad_True"] - hm["good_True"], hm["good_True"]),
  "sub4": refusal_subspaces(H, G, 4),
}
for k in ("ours_projected", "sys_projected", "heretic"):
    print(k, "cos with ours per index:", [round(float((dirs[k][i] * dirs["ours"][i]).sum()), 3) for i in range(9)])
print("heretic vs sys_projected:", [round(float((dirs["heretic"][i] * dirs["sys_projected"][i]).sum()), 3) for i in range(9)])
torch.save(dirs, "/tmp/h17/dirs.pt")

groups = sorted({c.group for c in arch.components}); print(groups)
ab = {}
def run(name, dkey, params_dict, scope="per_layer", index=None, method="norm_preserving"):
    d = dirs[dkey]
    key = (method, d.ndim)
    if key not in ab:
        ab[key] = LoraAbliterator(model, arch.components, method=method, rank=3, seed=0,
                                  direction_rank=d.shape[1] if d.ndim == 3 else 1)
    a = ab[key]
    p = AbliterationParameters(scope, index, {g: KernelParameters(**params_dict[g]) for g in groups})
    t = time.time()
    a.apply(p, d)
    try:
        m = TrialMetrics.from_eval_result(ev.evaluate(model))
    finally:
        a.reset()
    row = {"edit": name, "dirs": dkey, "scope": scope, "index": index, "method": method, **{k: m.to_dict()[k] for k in ("refusals", "kl", "kl_first_token", "lookalike_refusals", "false_refusals")}, "skill": m.skill_accuracy, "s": round(time.time()-t,1)}
    print(json.dumps(row), flush=True)
    return row

heretic = json.load(open("/work/wt-h17/bench/heretic_side_by_side_hard_cpu.json"))["heretic"]["trials"]
def hp(n):
    t = next(t for t in heretic if t["trial"] == n)
    pp = t["heretic_parameters"]
    return {"attn": pp["attn.o_proj"], "mlp": pp["mlp.down_proj"]}, t["heretic_direction_index"]
rows = []
import itertools
which = sys.argv[1:] or ["ours", "ours_projected", "sys_projected", "heretic", "sub4"]
for dkey in which:
    pd, idx = hp(30)
    rows.append(run("heretic trial 30", dkey, pd))
json.dump(rows, open("/tmp/h17/exp_rows.json", "w"), indent=1)
