"""Run lm-evaluation-harness on a model loaded the way stage 2 loads it.

lm-eval cannot read a ModelOpt NVFP4 checkpoint (transformers has no loader
for it), so we never let lm-eval load anything: ``abliterate.loading.load_model``
reads the folder (bf16 through ``from_pretrained``, NVFP4 / FP8 through our
formats loader, packed or dequantized) and the model object goes to lm-eval as
``HFLM(pretrained=model, tokenizer=tokenizer)``.
"""

from __future__ import annotations

import gc
import importlib.util
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from abliterate.capability.settings import CapabilityOptions
from abliterate.capability.tasks import TaskSelection
from foundation.errors import UserError

LM_EVAL_VERSION = "0.4.13"  # the pin of the eval extra (pyproject.toml)
INSTALL_HINT = "pip install 'quant-abliterate[eval]'  (lm-evaluation-harness, pinned lm_eval==" + LM_EVAL_VERSION + ")"


def lm_eval_installed() -> bool:
    try:
        return importlib.util.find_spec("lm_eval") is not None
    except (ImportError, ValueError):  # ValueError: sys.modules holds None for it (blocked)
        return False


def require_lm_eval(where: str = "quant-abliterate evaluate") -> None:
    """Cheap (no import): say how to install the extra before anything is loaded."""
    if not lm_eval_installed():
        raise UserError(where, "lm-evaluation-harness (the lm_eval package) is not installed", INSTALL_HINT)


@dataclass
class CapabilityResult:
    """One model's scores: ``scores[task][metric]`` (metric names as lm-eval reports them, filter ``none`` dropped)."""

    model: str
    source_format: str
    held_as: str
    dtype: str
    scores: dict[str, dict[str, float | None]]
    stderr: dict[str, dict[str, float | None]] = field(default_factory=dict)
    higher_is_better: dict[str, dict[str, bool | None]] = field(default_factory=dict)
    n_samples: dict[str, dict[str, int]] = field(default_factory=dict)
    task_sources: dict[str, str] = field(default_factory=dict)
    lm_eval_version: str = ""
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def flat(self) -> dict[str, float | None]:
        """``{"task metric": value}``, the columns of the pipeline table."""
        return {f"{task} {metric}": value for task, metrics in self.scores.items() for metric, value in metrics.items()}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None  # lm-eval writes "N/A" for a stderr it did not compute
    return float(value) if math.isfinite(value) else None


def scores_of(results: dict[str, Any]) -> tuple[dict, dict, dict]:
    """(scores, stderr, higher_is_better) from lm-eval's result dict; ``"metric,filter"`` keys split."""
    scores: dict[str, dict[str, float | None]] = {}
    stderr: dict[str, dict[str, float | None]] = {}
    better: dict[str, dict[str, bool | None]] = {}
    for task, values in results.get("results", {}).items():
        hib = results.get("higher_is_better", {}).get(task, {})
        for key, value in values.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or metric.endswith("_stderr"):
                continue
            name = metric if filter_name == "none" else f"{metric},{filter_name}"
            scores.setdefault(task, {})[name] = _number(value)
            stderr.setdefault(task, {})[name] = _number(values.get(f"{metric}_stderr,{filter_name}"))
            better.setdefault(task, {})[name] = hib.get(metric)
    return scores, stderr, better


def _import_lm_eval():
    require_lm_eval()
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as error:  # installed, but a dependency is missing or of another version
        raise UserError("quant-abliterate evaluate", f"lm-evaluation-harness is installed but does not import: {error}",
                        INSTALL_HINT) from None
    return lm_eval, HFLM


def evaluate_loaded(model, tokenizer, options: CapabilityOptions, selection: TaskSelection) -> dict[str, Any]:
    """lm-eval's raw result dict for a model object (what ``simple_evaluate`` returns)."""
    lm_eval, HFLM = _import_lm_eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=options.batch_size)
    try:
        results = lm_eval.simple_evaluate(
            model=lm, tasks=list(selection.specs), task_manager=selection.manager(), num_fewshot=options.num_fewshot,
            limit=options.lm_eval_limit(), apply_chat_template=options.apply_chat_template, log_samples=False)
    except FileNotFoundError as error:  # a local task's data file: datasets names the path
        raise UserError("--tasks", f"a task's data file is missing: {error}",
                        "fix the task YAML's data_files / dataset_path (relative paths are read from the YAML's folder)") from None
    except ConnectionError as error:
        raise UserError("--tasks", f"a task's dataset is not available offline: {error}",
                        "run where the Hugging Face Hub is reachable once (datasets caches it), or use a local task") from None
    if results is None:  # lm-eval returns None on ranks > 0 only; we run one process
        raise RuntimeError("lm-eval returned no results")
    return results


def evaluate_model(path: str, options: CapabilityOptions, selection: TaskSelection) -> CapabilityResult:
    """Load ``path`` as stage 2 does, run the selected tasks, free the model."""
    import time

    from abliterate.loading import load_model

    _import_lm_eval()  # before the model is loaded: a missing extra is said first
    started = time.perf_counter()
    loaded = load_model(path, dtypes=list(options.dtypes), device_map=options.device_map, load_as=options.load_as,
                        trust_remote_code=options.trust_remote_code)
    try:
        raw = evaluate_loaded(loaded.model, loaded.tokenizer, options, selection)
    finally:
        model_facts = (loaded.source_format, loaded.held_as, loaded.dtype)
        del loaded
        gc.collect()
    scores, stderr, better = scores_of(raw)
    import lm_eval

    return CapabilityResult(
        model=str(path), source_format=model_facts[0], held_as=model_facts[1], dtype=model_facts[2], scores=scores,
        stderr=stderr, higher_is_better=better, n_samples=raw.get("n-samples", {}), task_sources=dict(selection.sources),
        lm_eval_version=getattr(lm_eval, "__version__", ""), seconds=round(time.perf_counter() - started, 2))
