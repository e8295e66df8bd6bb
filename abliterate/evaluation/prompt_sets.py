"""Prompt-set specs: one YAML file naming the prompt sets and how to score them.

The spec keeps *what* is evaluated (prompts, markers, openers) out of code, so
the testbed's offline default (``datasets_yaml/testbed_prompts.yaml``), the
field's standard Hub sets (``datasets_yaml/standard_prompts.yaml``) and a
user's own sets are read the same way. Each set is either a local file (a
string: ``.txt`` one prompt per line, ``.jsonl`` with ``prompt_field``; any
other data file or a ``save_to_disk`` folder is read through ``datasets``) or a
dataset source (a mapping: ``path`` a Hub id, ``save_to_disk`` folder or data
file, ``split`` with the ``datasets`` slice syntax such as ``train[:400]``,
``column``, ``subset``, ``revision``), opened by the same loader as stage 1's
calibration mixes (``foundation.dataset_sources``). Paths are relative to the
spec file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from abliterate.evaluation.markers import (
    DEFAULT_REFUSAL_MARKERS,
    check_compliance_patterns,
    check_refusal_markers,
)
from foundation.dataset_sources import (
    SourceProblem,
    column_names,
    open_dataset,
    resolve_source,
)
from foundation.errors import UserError
from foundation.package_data import resolve_data_path
from foundation.text_files import read_utf8_text
from foundation.validation import FieldProblem, user_error_from_validation

DEFAULT_SPEC = Path("datasets_yaml/testbed_prompts.yaml")


class DatasetSet(BaseModel):
    """One prompt set (or the perplexity text) read from a dataset: a Hub id, a save_to_disk folder or a data file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(min_length=1, description="Hub id, save_to_disk folder or data file (relative to the spec)")
    split: str = Field("train", min_length=1, description="split, optionally sliced: train[:400], test[:100]")
    column: str | None = Field(None, min_length=1, description="column of the prompts (default: the spec's prompt_field)")
    subset: str | None = Field(None, min_length=1, description="Hub configuration name")
    revision: str | None = Field(None, min_length=1, description="Hub commit sha, tag or branch")


PromptSource = str | DatasetSet  # a string is a local file or folder, as before


class PromptSetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    description: str = ""
    harmful_train: PromptSource
    harmless_train: PromptSource
    harmful_test: PromptSource
    harmless_test: PromptSource
    prompt_field: str = "prompt"
    perplexity_text: PromptSource | None = None
    text_field: str = "text"
    # Optional checks of collateral damage (the hard testbed's spec has both): harmless prompts that share words
    # with harmful ones (their refusals are false refusals), and questions with exact answers (``answer_field``).
    lookalike_test: PromptSource | None = None
    skill_test: PromptSource | None = None
    answer_field: str = "answer"
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
    lookalike_test: list[str] = []
    skill_test: list[str] = []
    skill_answers: list[str] = []  # the expected start of each skill_test answer


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


_DATASET_FILE_SUFFIXES = (".json", ".parquet", ".csv")  # a string naming one of these is read through datasets


@dataclass(frozen=True)
class _Request:
    """What ``open_dataset`` reads (``foundation.dataset_sources.DatasetRequest``), the path resolved."""

    path: str
    subset: str | None
    split: str
    revision: str | None
    streaming: bool = False


def read_prompts(source: PromptSource | Path, base: Path, field: str, where: str) -> list[str]:
    """The strings of one set: a .txt / .jsonl file read directly, anything else through ``datasets``.

    ``field`` is the column (or JSONL key) when the source names none; ``where`` names the spec file
    and the set (or the flag) in every error.
    """
    if not isinstance(source, DatasetSet):
        path = Path(source).expanduser()
        path = path if path.is_absolute() else base / path
        if not path.is_dir() and path.suffix.lower() not in _DATASET_FILE_SUFFIXES:
            return read_field(path, field, where)  # .txt, .jsonl (and any other name, as JSONL, as before)
        source = DatasetSet(path=str(path))
    return read_dataset_column(source, base, field, where)


def read_dataset_column(source: DatasetSet, base: Path, field: str, where: str) -> list[str]:
    """One column of a dataset split as strings; a missing folder, bad split or column is a UserError."""
    try:
        resolved = resolve_source(source.path, base)
    except SourceProblem as problem:
        raise UserError(f"{where}, field 'path'", problem.problem, problem.fix) from None
    dataset = open_dataset(_Request(resolved.location, source.subset, source.split, source.revision), where)
    column = source.column or field
    names = column_names(dataset)
    if column not in names:
        named = "column" if source.column else "column (the spec's prompt_field / text_field, as none is given)"
        raise UserError(f"{where}, field 'column'",
                        f"no {named} {column!r} in {resolved.location} (split {source.split!r})",
                        f"use one of: {', '.join(names) or '(no columns)'}")
    values = dataset[column]
    for index, value in enumerate(values):
        if not isinstance(value, str) or not value.strip():
            raise UserError(f"{where}, row {index} of column {column!r}", f"not a non-empty string: {value!r}",
                            "pick a text column, or drop the empty rows from the dataset")
    if not values:
        raise UserError(f"{where}, field 'split'", f"split {source.split!r} of {resolved.location} holds no rows",
                        "widen the slice or pick another split")
    return list(values)


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
        return read_prompts(getattr(spec, name), base, spec.prompt_field, f"{path}: {name}")

    texts = read_prompts(spec.perplexity_text, base, spec.text_field, f"{path}: perplexity_text") if spec.perplexity_text else []
    lookalikes = prompts("lookalike_test") if spec.lookalike_test else []
    skill, answers = [], []
    if spec.skill_test:
        skill = prompts("skill_test")
        answers = read_prompts(spec.skill_test, base, spec.answer_field, f"{path}: skill_test ({spec.answer_field})")
    return LoadedSpec(
        harmful_train=prompts("harmful_train"),
        harmless_train=prompts("harmless_train"),
        harmful_test=prompts("harmful_test"),
        harmless_test=prompts("harmless_test"),
        perplexity_texts=texts,
        refusal_markers=tuple(marker.lower() for marker in spec.refusal_markers),
        compliance_openers=tuple(spec.compliance_openers),
        compliance_patterns=tuple(spec.compliance_patterns),
        lookalike_test=lookalikes,
        skill_test=skill,
        skill_answers=answers,
    )
