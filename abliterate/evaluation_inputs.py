"""The settings values that define how a run is measured, readable from live settings or from a record.

The search measures every trial with one evaluator; the export's verification
and the pipeline's table must rebuild exactly that evaluator. They get its
inputs from here: from today's ``AbliterateSettings`` during a run, or from the
``settings`` a ``chosen_trial.json`` recorded. A record is read as data
(unknown keys ignored, missing ones at the defaults below), never re-validated
against today's settings class: renaming or adding a flag must not make
``export`` refuse every trial written before. The defaults equal
``AbliterateSettings``'s (a test keeps them equal).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError

from abliterate.evaluation import (
    DEFAULT_REFUSAL_MARKERS,
    EvaluationConfig,
    RefusalJudge,
    load_refusal_judge,
)
from abliterate.evaluation.prompt_sets import DEFAULT_SPEC
from foundation.errors import UserError
from foundation.package_data import resolve_data_path
from foundation.validation import user_error_from_validation

if TYPE_CHECKING:
    from abliterate.prompts import PromptSets
    from abliterate.settings import AbliterateSettings


class EvaluationInputs(BaseModel):
    """What loads the model, builds the prompt sets and configures the evaluator; nothing about the search."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    model: str
    dtypes: list[str] = ["auto", "bfloat16", "float16", "float32"]
    device_map: str = "auto"
    load_as: str = "auto"
    max_memory: dict[str, str] | None = None
    trust_remote_code: bool = False
    cpu_threads: int | None = None
    prompts: Path = DEFAULT_SPEC
    harmful_train: Path | None = None
    harmless_train: Path | None = None
    harmful_test: Path | None = None
    harmless_test: Path | None = None
    max_train_prompts: int | None = None
    max_test_prompts: int | None = None
    system_prompt: str | None = None
    refusal_markers: list[str] | None = None
    compliance_openers: list[str] | None = None
    compliance_patterns: list[str] | None = None
    max_response_length: int = 100
    kl_tokens: int = 8
    false_refusal_tokens: int | None = None  # a record without it (older versions) counts them at the default
    judge: str | None = None
    judge_tokens: int = 128
    judge_batch_size: int = 16
    batch_size: int | None = None
    max_batch_size: int = 128

    @classmethod
    def from_settings(cls, settings: AbliterateSettings) -> EvaluationInputs:
        return cls.model_validate(settings.model_dump())

    @classmethod
    def from_recorded(cls, recorded: Any, where: str) -> EvaluationInputs:
        """The values a trial recorded; a missing or malformed record is a UserError naming ``where``."""
        if not isinstance(recorded, dict) or not recorded:
            raise UserError(where, "no 'settings' recorded: cannot rebuild the evaluation",
                            "re-run the abliterate stage with this version, or export with --no-verify")
        try:
            return cls.model_validate(recorded)
        except ValidationError as error:
            raise user_error_from_validation(error, lambda problem: (
                f"{where}: settings.{problem.field}", f"{problem.message} (got {problem.input!r})",
                "re-run the abliterate stage with this version, or export with --no-verify")) from None

    def prompt_spec(self) -> Path:
        """The spec as given; a relative path missing here is looked up in the installed package data."""
        return resolve_data_path(self.prompts)


def evaluation_config(inputs: EvaluationInputs, prompts: PromptSets) -> EvaluationConfig:
    """The evaluator's configuration: explicit settings first, then the prompt spec's lists, then the defaults."""
    return EvaluationConfig(
        refusal_markers=tuple(inputs.refusal_markers or prompts.refusal_markers or DEFAULT_REFUSAL_MARKERS),
        compliance_openers=tuple(inputs.compliance_openers if inputs.compliance_openers is not None else prompts.compliance_openers),
        compliance_patterns=tuple(inputs.compliance_patterns if inputs.compliance_patterns is not None else prompts.compliance_patterns),
        max_new_tokens=inputs.max_response_length,
        kl_tokens=inputs.kl_tokens,
        count_harmless_refusals=inputs.false_refusal_tokens != 0,
        harmless_max_new_tokens=inputs.false_refusal_tokens or inputs.kl_tokens,
        batch_size=inputs.batch_size,
        max_batch_size=inputs.max_batch_size,
        system_prompt=inputs.system_prompt,
        judge_tokens=inputs.judge_tokens if inputs.judge else None,
    )


def refusal_judge_of(inputs: EvaluationInputs, model) -> RefusalJudge | None:
    """The run's refusal judge on the device of ``model`` (the searched model), or None without ``--judge``."""
    if not inputs.judge:
        return None
    from abliterate.evaluation.generation import model_device

    return load_refusal_judge(inputs.judge, model_device(model), batch_size=inputs.judge_batch_size)
