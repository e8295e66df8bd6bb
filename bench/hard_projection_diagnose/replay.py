"""All 60 saved heretic trials' parameters replayed in OUR machinery with one direction set (argv[1])."""
import json
import sys

from common import WORK, HardTestbed

bed = HardTestbed()
bed.load_saved_directions()

rows = []
which = sys.argv[1]
for t in bed.heretic_trials:
    idx = t["heretic_direction_index"]
    r = bed.run(f"heretic trial {t['trial']}", which, bed.heretic_parameters(t),
                scope="per_layer" if idx is None else "global", index=None if idx is None else idx + 1)
    r["heretic_refusals_ours_eval"] = t["refusals"]
    r["heretic_kl_ours_eval"] = t["kl"]
    rows.append(r)
json.dump(rows, open(WORK / f"replay_{which}.json", "w"), indent=1)
