"""What a capability evaluation runs: one options object for ``quant-abliterate evaluate`` and the pipeline's evaluate stage.

``CapabilityOptions`` says *how* to measure (tasks, documents, batch, how the
model is loaded); ``EvaluateSettings`` adds the one model and the output of the
CLI; the pipeline stage adds which of its models to measure
(``pipelines/adapters/evaluate.py``). The CLI's flags are generated from these
fields (``foundation.settings_cli``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from foundation.devices import check_device_map
from foundation.dtypes import TORCH_DTYPES
from foundation.settings_cli import cli


class CapabilityOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tasks: tuple[str, ...] = Field(min_length=1, description="lm-evaluation-harness tasks: names (built-in, e.g. arc_easy hellaswag, or of a local task such as testbed_heldout, shipped in datasets_yaml/lm_eval_tasks), or paths of task YAML files; space- or comma-separated.")
    include_path: tuple[Path, ...] = Field(default=(), description="Extra folders of lm-eval task YAMLs (datasets_yaml/lm_eval_tasks is always searched).")
    limit: float | None = Field(default=None, gt=0, description="Documents per task: a count (>= 1) or a fraction (< 1) of each task's test split. None: all (the only setting whose scores compare with published ones).")
    num_fewshot: int | None = Field(default=None, ge=0, description="Few-shot examples per prompt (None: each task's own default).")
    batch_size: int = Field(default=8, ge=1, description="Requests per forward pass.")
    apply_chat_template: bool = Field(default=False, description="Wrap each request in the tokenizer's chat template (for chat-tuned tasks; most benchmarks are scored without it).")
    dtypes: tuple[str, ...] = Field(default=("auto", "bfloat16", "float32"), min_length=1, description="Dtypes tried in order until the model loads and gives finite logits (as stage 2 loads it).")
    device_map: str = Field(default="auto", description="accelerate device_map ('auto', 'cpu', 'cuda:0', ...).")
    load_as: Literal["auto", "packed", "dequantized"] = Field(default="auto", description="A quantized checkpoint (NVFP4 / FP8) through our loader: packed (dequantized inside each matmul) or dequantized (bf16 copy). auto: packed on a GPU, dequantized on a CPU.")
    trust_remote_code: bool = Field(default=False, description="Run the model repository's own Python code. Only set it for repositories you trust.")

    @field_validator("tasks", mode="before")
    @classmethod
    def _split_commas(cls, value):
        """``--tasks a,b c`` (lm-eval's own spelling is comma-separated) -> ("a", "b", "c")."""
        if isinstance(value, str):
            value = [value]
        if isinstance(value, (list, tuple)):
            names = [part.strip() for item in value for part in str(item).split(",")]
            return tuple(dict.fromkeys(name for name in names if name))
        return value

    @field_validator("limit")
    @classmethod
    def _whole_count(cls, value: float | None) -> float | None:
        if value is not None and value >= 1 and value != int(value):
            raise ValueError(f"{value} is neither a fraction (< 1) nor a whole number of documents")
        return value

    @field_validator("dtypes")
    @classmethod
    def _known_dtypes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [item for item in value if item not in TORCH_DTYPES]
        if unknown:
            raise ValueError(f"unknown dtype(s) {unknown}; choose from {sorted(TORCH_DTYPES)}")
        return value

    @field_validator("device_map")
    @classmethod
    def _known_device_map(cls, value: str) -> str:
        return check_device_map(value)

    def lm_eval_limit(self) -> int | float | None:
        """lm-eval reads an int as a count and a float as a fraction."""
        if self.limit is None:
            return None
        return int(self.limit) if self.limit >= 1 else float(self.limit)


class EvaluateSettings(CapabilityOptions):
    """``quant-abliterate evaluate MODEL --tasks ...``."""

    model: str = Field(description="The model to measure: a folder the project wrote (bf16, or an NVFP4 / FP8 checkpoint read by our loader), or any Hugging Face model folder or Hub id.",
                       json_schema_extra=cli(positional=True))
    output: Path | None = Field(default=None, description="Folder for capability.json (scores, versions, settings); none: print only.",
                                json_schema_extra=cli(aliases=("-o",)))
    overwrite: bool = Field(default=False, description="Replace an existing output folder.")


def settings_table_markdown() -> str:
    """The README's table of the evaluate command's flags (``python -m abliterate.capability.settings``)."""
    from foundation.settings_cli import flags_table_markdown

    return flags_table_markdown(EvaluateSettings)


if __name__ == "__main__":
    print(settings_table_markdown())
