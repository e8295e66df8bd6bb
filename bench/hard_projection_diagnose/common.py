"""What the diagnosis scripts share: testbed/hard in OUR stage-2 machinery, and one hand-set edit measured with it.

The edit goes through the search's own pieces (LoraAbliterator, Evaluator, TrialMetrics), so a row here is
what a trial with those parameters would score. Intermediate tensors live in ``WORK`` (as in the runs).
"""

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
WORK = Path("/tmp/h17")

import torch  # noqa: E402

torch.set_num_threads(1)

from abliterate.architectures.discovery import discover  # noqa: E402
from abliterate.edits.kernel import KernelParameters  # noqa: E402
from abliterate.edits.lora import LoraAbliterator  # noqa: E402
from abliterate.edits.plan import AbliterationParameters  # noqa: E402
from abliterate.evaluation import Evaluator  # noqa: E402
from abliterate.evaluation_inputs import EvaluationInputs, evaluation_config  # noqa: E402
from abliterate.loading import load_model  # noqa: E402
from abliterate.prompts import prompt_sets_of  # noqa: E402
from abliterate.settings import AbliterateSettings  # noqa: E402
from abliterate.search.objectives import TrialMetrics  # noqa: E402

_ROW_METRICS = ("refusals", "kl", "kl_first_token", "lookalike_refusals", "false_refusals")


class HardTestbed:
    """The loaded model, its evaluator on the hard prompt spec, named direction sets, heretic's saved trials."""

    def __init__(self) -> None:
        settings = {"model": str(REPO / "testbed/hard"), "prompts": str(REPO / "datasets_yaml/testbed_hard_prompts.yaml"),
                    "dtypes": ["float32"]}  # fmt: skip
        inputs = EvaluationInputs.from_settings(AbliterateSettings.from_mapping(settings))
        self.prompts = prompt_sets_of(inputs)
        loaded = load_model(settings["model"], dtypes=["float32"])
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.arch = discover(self.model)
        print([(c.group, c.layer) for c in self.arch.components][:4])
        config = evaluation_config(inputs, self.prompts)
        self.evaluator = Evaluator(self.model, self.tokenizer, self.prompts.harmful_test, self.prompts.harmless_test,
                                   config, **self.prompts.collateral_sets())  # fmt: skip
        print("base", TrialMetrics.from_eval_result(self.evaluator.base).to_dict())
        self.groups = sorted({c.group for c in self.arch.components})
        print(self.groups)
        self.dirs: dict[str, torch.Tensor] = {}
        self._abliterators: dict[tuple[str, int], LoraAbliterator] = {}
        saved = json.loads((REPO / "bench/heretic_side_by_side_hard_cpu.json").read_text())
        self.heretic_trials = saved["heretic"]["trials"]

    def run(self, name: str, dkey: str, params: dict, scope: str = "per_layer", index: float | None = None,
            method: str = "norm_preserving") -> dict:  # fmt: skip
        """Apply one edit with direction set ``dkey``, evaluate, reset; print and return the row."""
        directions = self.dirs[dkey]
        key = (method, directions.ndim)
        if key not in self._abliterators:
            self._abliterators[key] = LoraAbliterator(
                self.model, self.arch.components, method=method, rank=3, seed=0,
                direction_rank=directions.shape[1] if directions.ndim == 3 else 1,
            )  # fmt: skip
        abliterator = self._abliterators[key]
        parameters = AbliterationParameters(scope, index, {g: KernelParameters(**params[g]) for g in self.groups})
        started = time.time()
        abliterator.apply(parameters, directions)
        try:
            metrics = TrialMetrics.from_eval_result(self.evaluator.evaluate(self.model))
        finally:
            abliterator.reset()
        row = {"edit": name, "dirs": dkey, "scope": scope, "index": index, "method": method,
               **{k: metrics.to_dict()[k] for k in _ROW_METRICS}, "skill": metrics.skill_accuracy,
               "s": round(time.time() - started, 1)}  # fmt: skip
        print(json.dumps(row), flush=True)
        return row

    def load_saved_directions(self) -> None:
        """The direction sets ``exp.py`` saved, plus projected k=4 subspaces from its saved residuals."""
        from abliterate.directions import refusal_subspaces

        residuals = torch.load(WORK / "residuals.pt")
        self.dirs.update(torch.load(WORK / "dirs.pt"))
        self.dirs["sub4_projected"] = refusal_subspaces(residuals["H"], residuals["G"], 4, projected=True)

    @staticmethod
    def heretic_parameters(trial: dict) -> dict:
        """A saved heretic trial's kernel parameters, keyed by our component groups."""
        saved = trial["heretic_parameters"]
        return {"attn": saved["attn.o_proj"], "mlp": saved["mlp.down_proj"]}

    def heretic_trial(self, number: int) -> dict:
        return next(t for t in self.heretic_trials if t["trial"] == number)
