"""The calibration mix YAML: its pydantic schema and its loader.

A mix is declarative (which datasets, in what proportion, how much and how
long); how the samples are drawn lives in ``build.py``. Every field is checked
here, before any dataset is opened, so a typo costs the user a second rather
than a download. Validation problems are turned into one ``UserError`` that
names the file, the dataset entry and the field, and says how to fix it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from foundation.dataset_sources import SourceProblem, resolve_source
from foundation.errors import UserError
from foundation.package_data import resolve_data_path
from foundation.text_files import decode_utf8
from quantize.calibration.validation_errors import (
    EntryProblem,
    user_error_from_validation,
)

FormatterName = Literal["raw_text", "prompt_answer", "sharegpt", "chat_completion"]
FORMATTER_NAMES: tuple[str, ...] = FormatterName.__args__  # type: ignore[attr-defined]

# How many columns each formatter reads from `columns:` (None = any number >= 1).
_COLUMN_COUNTS: dict[str, tuple[int, ...] | None] = {
    "raw_text": None,
    "prompt_answer": (2, 3),
    "sharegpt": (1,),
    "chat_completion": (1,),
}


# One definition of each calibration limit, used by the mix file's `calibration:` block and by
# stage 1's flags (quantize/settings.py) alike, so a value a flag accepts a mix file accepts too.
# min_token_length >= 1: a sample of no tokens calibrates nothing (and 0 and 1 both mean "keep all").
# max_seq_len >= 8: shorter samples are shorter than most chat templates' own tokens.
MaxSamples = Annotated[int, Field(gt=0, description="exact number of calibration samples")]
MaxSeqLen = Annotated[int, Field(ge=8, description="samples are truncated to this many tokens")]
Seed = Annotated[int, Field(ge=0, description="seeds every random choice of the sampling")]
MinTokenLength = Annotated[int, Field(ge=1, description="samples shorter than this many tokens are dropped")]
OversampleRatio = Annotated[float, Field(ge=1.0, allow_inf_nan=False, description="draw this many times max_samples before length filtering")]


class CalibrationSettings(BaseModel):
    """The `calibration:` block; CLI flags override single fields of it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_samples: MaxSamples = 512
    max_seq_len: MaxSeqLen = 2048
    seed: Seed = 42
    min_token_length: MinTokenLength = 32
    oversample_ratio: OversampleRatio = 1.5

    @model_validator(mode="after")
    def _min_fits_in_max(self) -> CalibrationSettings:
        if self.min_token_length > self.max_seq_len:
            raise EntryProblem(
                f"min_token_length ({self.min_token_length}) is larger than max_seq_len "
                f"({self.max_seq_len}), so every sample would be dropped",
                "lower min_token_length or raise max_seq_len",
                field="min_token_length",
            )
        return self


def _default_name(path: str) -> str:
    """`HuggingFaceH4/ultrachat_200k` -> `ultrachat_200k`, `corpora/a.jsonl` -> `a`."""
    last = path.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
    return last.split(".", 1)[0] or path


class DatasetEntry(BaseModel):
    """One item of `datasets:`: where the data is and how a row becomes text."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, description="label in summaries; defaults to the path's last part")
    path: str = Field(min_length=1, description="Hub id, save_to_disk folder, or data file")
    subset: str | None = Field(None, description="Hub configuration name (e.g. wikitext-103-raw-v1)")
    revision: str | None = Field(None, min_length=1, description="Hub commit sha, tag or branch to pin the data to")
    split: str = Field("train", min_length=1, description="split name, optionally sliced: train[:400], test[10:20]")
    # strict: YAML's `true` is not a share (lax float would read it as 1.0); finite: `.inf` cannot be normalized
    weight: float = Field(1.0, ge=0, strict=True, allow_inf_nan=False, description="relative share of the samples")
    text_column: str | None = Field(None, min_length=1)
    formatter: FormatterName | None = Field(None, description="None = detect from the columns")
    columns: list[str] | None = Field(None, min_length=1)
    streaming: bool = False

    @model_validator(mode="before")
    @classmethod
    def _fill_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("name") is None and isinstance(data.get("path"), str):
            return {**data, "name": _default_name(data["path"])}
        return data

    @field_validator("path")
    @classmethod
    def _resolve_local_path(cls, path: str, info: ValidationInfo) -> str:
        """Relative local paths are made absolute against the YAML file's folder."""
        base_dir = (info.context or {}).get("base_dir") or Path.cwd()
        try:
            source = resolve_source(path, Path(base_dir))
        except SourceProblem as problem:
            raise EntryProblem(problem.problem, problem.fix) from None
        return source.location

    @model_validator(mode="after")
    def _local_file_has_only_train(self) -> DatasetEntry:
        """One data file is one split, which `datasets` calls 'train'; any other name would silently read it anyway."""
        if Path(self.path).is_file() and self.split.split("[", 1)[0] != "train":
            raise EntryProblem(
                f"split {self.split!r} does not exist in a single local file ({Path(self.path).name}): "
                "a data file is one split, 'train'",
                "remove 'split' (or write split: train, or a slice such as train[:1000]); for a validation set, "
                "point path at its own file",
                field="split",
            )
        return self

    @model_validator(mode="after")
    def _columns_fit_formatter(self) -> DatasetEntry:
        if self.columns is not None:
            allowed = _COLUMN_COUNTS[self.formatter or "raw_text"]
            if allowed is not None and len(self.columns) not in allowed:
                wanted = " or ".join(str(n) for n in allowed)
                example = {
                    "prompt_answer": "[prompt, answer] (optionally a third: extra input)",
                    "sharegpt": "[conversations]",
                    "chat_completion": "[messages]",
                }[self.formatter or "raw_text"]
                raise EntryProblem(
                    f"formatter {self.formatter!r} reads {wanted} column(s), got {len(self.columns)}",
                    f"write columns: {example}",
                    field="columns",
                )
        if self.text_column is not None and self.formatter == "prompt_answer":
            raise EntryProblem(
                "text_column does not apply to formatter 'prompt_answer'",
                "name the two columns instead: columns: [prompt, answer]",
                field="text_column",
            )
        return self


class CalibrationMix(BaseModel):
    """A whole mix file. Build one with `load_mix` so paths and hashes are set."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    datasets: list[DatasetEntry] = Field(min_length=1)
    calibration: CalibrationSettings = Field(default_factory=CalibrationSettings)

    _source_path: Path | None = PrivateAttr(default=None)
    _source_sha256: str | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _names_unique_and_weights_positive(self) -> CalibrationMix:
        seen: dict[str, int] = {}
        for index, entry in enumerate(self.datasets):
            if entry.name in seen:
                raise EntryProblem(
                    f"name {entry.name!r} is already used by datasets[{seen[entry.name]}]",
                    "give every dataset entry a distinct name:",
                    field="name",
                    index=index,
                )
            seen[entry.name] = index
        if sum(entry.weight for entry in self.datasets) <= 0:
            raise EntryProblem(
                "every weight is 0, so no dataset would be sampled",
                "give at least one dataset a positive weight",
                field="weight",
                index=0,
            )
        return self

    @property
    def source_path(self) -> Path | None:
        """The YAML file this mix was read from (None when built in code)."""
        return self._source_path

    @property
    def sha256(self) -> str:
        """Hash of the YAML bytes as read, or of the canonical JSON when built in code."""
        if self._source_sha256 is not None:
            return self._source_sha256
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()


def load_mix(path: str | Path) -> CalibrationMix:
    """Read and validate a mix YAML; any problem becomes one `UserError`."""
    path = resolve_data_path(path)
    if not path.is_file():
        raise UserError(
            str(path),
            "calibration mix file not found",
            "pass an existing YAML file, e.g. datasets_yaml/offline_mix.yaml "
            "(offline) or datasets_yaml/default_mix.yaml (Hugging Face Hub)",
        )
    raw = path.read_bytes()
    data = _parse_yaml(raw, path)
    try:
        mix = CalibrationMix.model_validate(data, context={"base_dir": path.resolve().parent})
    except ValidationError as error:
        raise user_error_from_validation(error, str(path), data, _allowed_keys()) from None
    mix._source_path = path.resolve()
    mix._source_sha256 = hashlib.sha256(raw).hexdigest()
    return mix


def _parse_yaml(raw: bytes, path: Path) -> dict[str, Any]:
    text = decode_utf8(raw, path)  # not UTF-8: say so, not "fix the indentation"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(error, "problem", None) or str(error)
        raise UserError(
            where,
            f"invalid YAML syntax: {problem}",
            "fix the indentation or quoting at that line (YAML uses spaces, not tabs; "
            "quote values that contain ':' or '#')",
        ) from None
    if not isinstance(data, dict):
        raise UserError(
            str(path),
            f"a mix file must be a mapping with a 'datasets:' list, got {type(data).__name__}",
            "start the file with 'datasets:' followed by '- path: ...' entries "
            "(see datasets_yaml/offline_mix.yaml)",
        )
    return data


def _allowed_keys() -> dict[str, list[str]]:
    return {
        "mix": list(CalibrationMix.model_fields),
        "datasets": list(DatasetEntry.model_fields),
        "calibration": list(CalibrationSettings.model_fields),
    }
