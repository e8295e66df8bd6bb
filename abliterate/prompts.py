"""The four prompt sets and the marker lists for a run: a spec YAML plus per-set overrides.

The spec format and its reader belong to the evaluator
(``abliterate.evaluation.prompt_sets``: ``harmful_train``, ``harmless_train``,
``harmful_test``, ``harmless_test`` relative to the spec, ``prompt_field``,
``refusal_markers``, ``compliance_openers`` / ``compliance_patterns``; a set
may be a local file or a dataset: Hub id, save_to_disk folder, split, column).
This module adds what the stage's flags need on top: any set replaced by a
file of its own (``.txt`` one prompt per line, ``.jsonl`` with a ``prompt``
field, or a save_to_disk folder / data file with a ``prompt`` column, split
``train``), and a cap on the number of train / test prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from abliterate.evaluation.prompt_sets import load_prompt_spec, read_prompts
from foundation.errors import UserError

SETS = ("harmful_train", "harmless_train", "harmful_test", "harmless_test")


@dataclass(frozen=True)
class PromptSets:
    harmful_train: tuple[str, ...]
    harmless_train: tuple[str, ...]
    harmful_test: tuple[str, ...]
    harmless_test: tuple[str, ...]
    refusal_markers: tuple[str, ...] | None  # None: no spec, the evaluator's default list applies
    compliance_openers: tuple[str, ...]
    compliance_patterns: tuple[str, ...]
    # the spec's optional collateral-damage sets (test sets, capped like them); empty where it has none
    lookalike_test: tuple[str, ...] = ()
    skill_test: tuple[str, ...] = ()
    skill_answers: tuple[str, ...] = ()

    def collateral_sets(self) -> dict[str, tuple[str, ...]]:
        """The ``Evaluator`` keywords of the look-alike and skill sets (nothing where the spec has none)."""
        return {"lookalike_prompts": self.lookalike_test, "skill_prompts": self.skill_test,
                "skill_answers": self.skill_answers}


def load_prompt_sets(spec: Path | None, overrides: dict[str, Path | None], limit_train: int | None = None,
                     limit_test: int | None = None) -> PromptSets:
    overrides = {name: path for name, path in overrides.items() if path is not None}
    if spec is not None and Path(spec).is_file():
        loaded = load_prompt_spec(spec)
        sets = {name: tuple(getattr(loaded, name)) for name in SETS}
        markers, openers, patterns = loaded.refusal_markers, loaded.compliance_openers, loaded.compliance_patterns
        collateral = {"lookalike_test": tuple(loaded.lookalike_test), "skill_test": tuple(loaded.skill_test),
                      "skill_answers": tuple(loaded.skill_answers)}
    elif all(name in overrides for name in SETS):
        sets, markers, openers, patterns, collateral = {}, None, (), (), {}
    else:
        is_folder = spec is not None and Path(spec).is_dir()
        problem = f"prompt spec {spec} is a directory, not a YAML file" if is_folder else f"prompt spec {spec} does not exist"
        raise UserError("--prompts", problem,
                        "pass --prompts SPEC.yaml, or all of --harmful_train --harmless_train --harmful_test --harmless_test")
    for name, path in overrides.items():
        sets[name] = tuple(read_prompts(Path(path), Path.cwd(), "prompt", f"--{name}"))
    for name in SETS:
        limit = limit_train if name.endswith("train") else limit_test
        if limit:
            sets[name] = sets[name][:limit]
    if limit_test:
        collateral = {name: values[:limit_test] for name, values in collateral.items()}
    return PromptSets(**sets, refusal_markers=markers, compliance_openers=tuple(openers),
                      compliance_patterns=tuple(patterns), **collateral)


class PromptChoice(Protocol):
    """What names a run's prompts (``EvaluationInputs`` has it; this module need not know where it came from)."""

    harmful_train: Path | None
    harmless_train: Path | None
    harmful_test: Path | None
    harmless_test: Path | None
    max_train_prompts: int | None
    max_test_prompts: int | None

    def prompt_spec(self) -> Path: ...


def prompt_sets_of(inputs: PromptChoice) -> PromptSets:
    """The prompt sets a run's settings name: the spec, any per-set override files, the caps.

    The search, the export's verification and the pipeline's table all build them here, so they
    measure on the same prompts.
    """
    return load_prompt_sets(inputs.prompt_spec(), {name: getattr(inputs, name) for name in SETS},
                            inputs.max_train_prompts, inputs.max_test_prompts)


MAX_PERPLEXITY_TEXTS = 64


def perplexity_texts(spec: Path | None) -> list[str]:
    """The prompt spec's held-out general text (testbed specs name one), capped; [] when it has none.

    Every perplexity a run reports (original, quantized, re-exported) must use these same texts, or the
    numbers in one table would not be comparable.
    """
    if spec is None or not Path(spec).is_file():
        return []
    try:
        return load_prompt_spec(spec).perplexity_texts[:MAX_PERPLEXITY_TEXTS]
    except UserError:
        return []  # a spec stage 2 reads but without perplexity text: nothing to add
