"""heretic's front trial 30 rebuilt in OUR edit machinery with several direction sets (first run)."""
import json
import sys

import torch
from common import WORK, HardTestbed

from abliterate.directions import normalize, refusal_directions, refusal_subspaces
from abliterate.residuals import prompt_residuals

bed = HardTestbed()
model, tok, layers, P = bed.model, bed.tokenizer, bed.arch.layers, bed.prompts
H = prompt_residuals(model, layers, tok, P.harmful_train, batch_size=64).values
G = prompt_residuals(model, layers, tok, P.harmless_train, batch_size=64).values
HS = prompt_residuals(model, layers, tok, P.harmful_train, batch_size=64, system_prompt="You are a helpful assistant.").values
GS = prompt_residuals(model, layers, tok, P.harmless_train, batch_size=64, system_prompt="You are a helpful assistant.").values
torch.save({"H": H, "G": G, "HS": HS, "GS": GS}, WORK / "residuals.pt")
hm = torch.load(WORK / "heretic_means.pt")


def proj(d, good):
    g = normalize(good)
    d = normalize(d)
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
torch.save(dirs, WORK / "dirs.pt")
bed.dirs.update(dirs)

rows = []
which = sys.argv[1:] or ["ours", "ours_projected", "sys_projected", "heretic", "sub4"]
for dkey in which:
    rows.append(bed.run("heretic trial 30", dkey, bed.heretic_parameters(bed.heretic_trial(30))))
json.dump(rows, open(WORK / "exp_rows.json", "w"), indent=1)
