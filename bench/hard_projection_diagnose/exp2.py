"""Second run: heretic's trial 30 with projected subspaces, our trial 54 plain and projected, global indices."""
import json

from common import WORK, HardTestbed

bed = HardTestbed()
bed.load_saved_directions()


def t54(kind):
    p = {'attn.max_weight': 1.460143705976343, 'attn.max_weight_position': 5.426279329801734, 'attn.min_weight_fraction': 0.31864513788813476, 'attn.min_weight_distance': 4.610987855758952, 'mlp.max_weight': 1.1615109166351587, 'mlp.max_weight_position': 0.6993464281403894, 'mlp.min_weight_fraction': 0.486348949064668, 'mlp.min_weight_distance': 5.788252535221814}
    return {g: {"max_weight": p[g+".max_weight"], "max_weight_position": p[g+".max_weight_position"], "min_weight": p[g+".min_weight_fraction"]*p[g+".max_weight"], "min_weight_distance": p[g+".min_weight_distance"]} for g in ("attn","mlp")}
rows = []
pd = bed.heretic_parameters(bed.heretic_trial(30))
rows.append(bed.run("heretic trial 30", "sub4_projected", pd))
rows.append(bed.run("ours trial 54", "sub4", t54(0), scope="global", index=3.7754780501620537))
rows.append(bed.run("ours trial 54", "sub4_projected", t54(0), scope="global", index=3.7754780501620537))
for idx in (4.0, 5.0, 6.0, 7.0):
    rows.append(bed.run("heretic trial 30, global", "ours_projected", pd, scope="global", index=idx))
json.dump(rows, open(WORK / "exp2_rows.json", "w"), indent=1)
