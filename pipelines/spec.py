"""The pipeline YAML: which model, which stages in which order, each stage's settings.

A pipeline file is a *recipe* (what to do); the stages' own code is the *how*.
Each stage's settings block is validated by the very settings class that
stage's CLI uses (see ``pipelines.stages``), so there is one definition of
every option, not a second copy here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from foundation.errors import UserError
from foundation.hub_ids import is_hub_id
from foundation.package_data import resolve_data_path
from foundation.text_files import read_utf8_text
from foundation.validation import FieldProblem, user_error_from_validation

STAGE_ORDER = ("quantize", "abliterate", "export", "evaluate")
# A stage may only run after the stages it reads from ('evaluate' measures whichever models the stages before it wrote).
STAGE_NEEDS = {"quantize": (), "abliterate": (), "export": ("abliterate",), "evaluate": ()}


class StageEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    settings: dict[str, Any] = Field(default_factory=dict)


class PipelineSpec(BaseModel):
    """What a pipeline YAML may contain (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Short name, used in tables and the manifest.")
    model: str = Field(description="Source model: a local folder or a Hugging Face Hub id.")
    output_dir: str = Field(description="Where the stage subdirectories and manifest.json are written.")
    description: str = ""
    hardware: str = Field("", description="What the pipeline needs to run (documentation only).")
    trust_remote_code: bool = False
    evaluate_original: bool = Field(True, description="Also measure the source model, so the final table starts from it.")
    stages: list[StageEntry]

    @field_validator("stages", mode="before")
    @classmethod
    def _stages_from_mapping_list(cls, value: Any) -> Any:
        """Accept the readable YAML form ``- quantize: {...}`` for each stage."""
        if not isinstance(value, list):
            return value
        entries = []
        for item in value:
            if isinstance(item, str):
                entries.append({"name": item})
            elif isinstance(item, dict) and len(item) == 1 and "name" not in item:
                (name, settings), = item.items()
                entries.append({"name": name, "settings": settings or {}})
            else:
                entries.append(item)
        return entries


def _format_validation_error(path: Path, error: ValidationError) -> UserError:
    def explain(first: FieldProblem) -> tuple[str, str, str]:
        problem = first.message
        if first.kind == "extra_forbidden" and first.loc[:1] == ("stages",) and len(first.loc) == 3:
            problem = "unknown key in a stage entry"
            fix = ("a stage entry holds only: " + ", ".join(StageEntry.model_fields) + "; or write it as "
                   "'- quantize: {format: nvfp4, ...}' with the stage's settings below its name")
        elif first.kind == "extra_forbidden":
            problem = "unknown key"
            fix = "remove it or check its spelling; allowed top-level keys: " + ", ".join(PipelineSpec.model_fields)
        elif first.kind == "missing":
            fix = "add this key"
        else:
            fix = "correct this value"
        return f"{path}: field '{first.field}'", problem, fix

    return user_error_from_validation(error, explain)


def check_stage_order(path: Path, names: list[str]) -> None:
    """Stages must be known, unique, in pipeline order, and have their inputs."""
    seen: list[str] = []
    for name in names:
        if name not in STAGE_ORDER:
            raise UserError(f"{path}: stages", f"unknown stage '{name}'", f"use some of: {', '.join(STAGE_ORDER)}")
        if name in seen:
            raise UserError(f"{path}: stages", f"stage '{name}' appears twice", "list each stage once")
        for needed in STAGE_NEEDS[name]:
            if needed not in seen:
                raise UserError(
                    f"{path}: stages",
                    f"stage '{name}' needs stage '{needed}' before it",
                    f"put '{needed}' earlier in the list (order: {' -> '.join(STAGE_ORDER)})",
                )
        if seen and STAGE_ORDER.index(name) < STAGE_ORDER.index(seen[-1]):
            raise UserError(
                f"{path}: stages",
                f"stage '{name}' cannot come after '{seen[-1]}'",
                f"order the stages as {' -> '.join(STAGE_ORDER)}",
            )
        seen.append(name)
    if not seen:
        raise UserError(f"{path}: stages", "no stage listed", f"list at least one of: {', '.join(STAGE_ORDER)}")


def resolve_model(path: Path, model: str) -> str:
    """A local folder (relative to the YAML or the working directory) or a Hub id."""
    for candidate in (resolve_data_path(model), path.parent / model):
        if candidate.is_dir():
            if not (candidate / "config.json").is_file():
                raise UserError(f"{path}: field 'model'", f"{candidate} has no config.json", "point at a Hugging Face model folder")
            return str(candidate.resolve())
    if is_hub_id(model) and "/" in model:  # a pipeline names owner/name, so a typo fails before stage 1 starts
        return model
    raise UserError(
        f"{path}: field 'model'",
        f"'{model}' is neither an existing folder nor a Hub id (org/name)",
        "fix the path (relative paths are tried from the working directory and from the YAML's folder)",
    )


def load_pipeline(path: str | Path) -> PipelineSpec:
    path = resolve_data_path(path)
    if not path.is_file():
        raise UserError(str(path), "pipeline file not found", "pass the path of a pipeline YAML, e.g. pipelines/testbed_default.yaml")
    try:
        raw = yaml.safe_load(read_utf8_text(path))
    except yaml.YAMLError as error:
        raise UserError(str(path), f"invalid YAML: {error}", "fix the YAML syntax") from None
    if not isinstance(raw, dict):
        raise UserError(str(path), "the file must hold a mapping (model:, output_dir:, stages:)", "see pipelines/testbed_default.yaml")
    try:
        spec = PipelineSpec.model_validate(raw)
    except ValidationError as error:
        raise _format_validation_error(path, error) from None
    check_stage_order(path, [stage.name for stage in spec.stages])
    spec.model = resolve_model(path, spec.model)
    return spec
