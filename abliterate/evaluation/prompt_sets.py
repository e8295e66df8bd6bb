"""Prompt-set specs: one YAML file naming the prompt files and how to score them.

The spec keeps *what* is evaluated (files, markers, openers) out of code, so
the testbed's offline default (``datasets_yaml/testbed_prompts.yaml``) and a
user's own sets are read the same way. Paths are relative to the spec file.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from abliterate.evaluation.markers import (
    DEFAULT_REFUSAL_MARKERS,
    check_compliance_patterns,
    check_refusal_markers,
)
from foundation.errors import UserError
from foundation.package_data import resolve_data_path
from foundation.text_files import read_utf8_text
from foundation.validation import FieldProblem, user_error_from_validation

DEFAULT_SPEC = Path("datasets_yaml/testbed_prompts.yaml")


class PromptSetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    description: str = ""
    harmful_train: str
    harmless_train: str
    harmful_test: str
    harmless_test: str
    prompt_field: str = "prompt"
    perplexity_text: str | None = None
    text_field: str = "text"
    refusal_markers: list[str] = list(DEFAULT_REFUSAL_MARKERS)
    compliance_openers: list[str] = []
    compliance_patterns: list[str] = []

    _markers = field_validator("refusal_markers")(classmethod(lambda cls, value: check_refusal_markers(value)))
    _patterns = field_validator("compliance_patterns")(classmethod(lambda cls, value: check_compliance_patterns(value)))


class LoadedSpec(BaseModel):
    """The spec with its files read, uncapped (the testbed measures with it directly).

    A stage-2 run's sets are ``abliterate.prompts.PromptSets``: these plus the
    per-set override files and caps of its flags, without the perplexity texts.
    """

    harmful_train: list[str]
    harmless_train: list[str]
    harmful_test: list[str]
    harmless_test: list[str]
    perplexity_texts: list[str]
    refusal_markers: tuple[str, ...]
    compliance_openers: tuple[str, ...]
    compliance_patterns: tuple[str, ...]


def read_field(path: Path, field: str, where: str) -> list[str]:
    """One string per line of a JSONL file (``field`` of each object), or per line of a .txt file."""
    if not path.is_file():
        raise UserError(where, f"file not found: {path}", "fix the path (relative to the spec file)")
    lines = [line for line in read_utf8_text(path, where).splitlines() if line.strip()]
    if not lines:  # an empty set would only fail later, deep in the residual capture
        raise UserError(where, f"{path} holds no prompts", "add at least one prompt (one per line)")
    if path.suffix == ".txt":
        return lines
    values = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path}:{number}", f"not valid JSON ({error.msg})", "write one JSON object per line") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise UserError(f"{path}:{number}", f"no string field '{field}'", f"give each line a '{field}' string")
        if not record[field].strip():  # an empty prompt measures nothing and skews every count
            raise UserError(f"{path}:{number}", f"the '{field}' is empty", "remove the line or write the prompt")
        values.append(record[field])
    return values


def load_prompt_spec(path: str | Path = DEFAULT_SPEC) -> LoadedSpec:
    path = resolve_data_path(path)
    if not path.is_file():
        raise UserError(str(path), "prompt-set spec not found", "pass an existing YAML file")
    try:
        spec = PromptSetSpec.model_validate(yaml.safe_load(read_utf8_text(path)) or {})
    except yaml.YAMLError as error:  # a syntax slip must point at its line, not dump a parser traceback
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise UserError(where, f"invalid YAML syntax: {getattr(error, 'problem', None) or error}",
                        "fix the indentation or quoting at that line (see datasets_yaml/testbed_prompts.yaml)") from None
    except ValidationError as error:
        def explain(first: FieldProblem) -> tuple[str, str, str]:
            where = f"{path}: {first.field}" if first.field else str(path)  # loc is empty when the whole file is not a mapping
            return where, first.message, "see datasets_yaml/testbed_prompts.yaml for the format"

        raise user_error_from_validation(error, explain) from None
    base = path.parent

    def prompts(name: str) -> list[str]:
        return read_field(base / getattr(spec, name), spec.prompt_field, f"{path}: {name}")

    texts = read_field(base / spec.perplexity_text, spec.text_field, f"{path}: perplexity_text") if spec.perplexity_text else []
    return LoadedSpec(
        harmful_train=prompts("harmful_train"),
        harmless_train=prompts("harmless_train"),
        harmful_test=prompts("harmful_test"),
        harmless_test=prompts("harmless_test"),
        perplexity_texts=texts,
        refusal_markers=tuple(marker.lower() for marker in spec.refusal_markers),
        compliance_openers=tuple(spec.compliance_openers),
        compliance_patterns=tuple(spec.compliance_patterns),
    )
