"""The export's settings: one typed object for the CLI, the interactive menu and the pipeline stage.

``quant-abliterate export``'s flags are generated from these fields
(``foundation.settings_cli``), so a flag, its default and its help are written here only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from foundation.settings_cli import cli

Format = Literal["nvfp4", "bf16", "adapter"]


class ExportSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    trial: Path = Field(description="Output directory of 'quant-abliterate abliterate' (chosen_trial.json).", json_schema_extra=cli(positional=True))
    output: Path | None = Field(default=None, description="Export directory; several formats go to <output>/<format>. Default <trial>-<format>.", json_schema_extra=cli(aliases=("-o",)))
    formats: tuple[Format, ...] = Field(default=("nvfp4",), min_length=1, description="nvfp4 (stage-1 scales reused), bf16 (plain HF), adapter (PEFT LoRA); repeat --format for several. The CLI without --format opens a menu on a terminal; a pipeline stage defaults to",
                                        json_schema_extra=cli(flags=("--format",), repeat=True))
    checkpoint: Path | None = Field(default=None, description="The model stage 2 searched on (default: the 'model' in chosen_trial.json); the stage-1 checkpoint for nvfp4.")
    base_model: Path | None = Field(default=None, description="Original full-precision model to merge into (default: the checkpoint's dequantized weights).")
    recalibrate: bool = Field(default=False, description="nvfp4: a fresh ModelOpt calibration of the merged model instead of the stage-1 scales.")
    dataset_yaml: Path | None = Field(default=None, description="Calibration mix for recalibrate (default: the one stage 1 recorded).")
    overwrite: bool = Field(default=False, description="Replace an existing output directory.")
    verify: bool = Field(default=True, description="Reload the export and re-measure refusals, compliance and KL against the trial (--no_verify skips it).",
                         json_schema_extra=cli(aliases=("--no-verify",)))
    refusal_tolerance: float = Field(default=0.1, ge=0, description="Refusals and compliance may differ from the trial's by this many prompts (>= 1) or this fraction of the harmful test prompts (< 1); false refusals likewise, of the harmless test prompts.")
    kl_tolerance: float = Field(default=0.02, ge=0, description="Absolute KL tolerance, added to 50% of the trial's KL.")
    device_map: str | None = Field(default=None, description="Placement for verification (default: as stage 2 loaded).")
    trust_remote_code: bool = Field(default=False, description="Run the model's own Python code when verification loads it. Only this flag turns it on: the value recorded in chosen_trial.json is ignored (an edited trial folder must not run code).")
    progress: bool = Field(default=True, description="Progress bars per shard (--no_progress for logs and CI).")

    @field_validator("formats")
    @classmethod
    def _once_each(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        """``--format bf16 --format bf16`` exports bf16 once."""
        return tuple(dict.fromkeys(value))

    def output_for(self, fmt: str, *, subdirectories: bool | None = None) -> Path:
        several = len(self.formats) > 1 if subdirectories is None else subdirectories
        if self.output is None:
            return self.trial.parent / f"{self.trial.name}-{fmt}"
        return self.output / fmt if several else self.output


def settings_table_markdown() -> str:
    """The README's table of the export's flags (``python -m abliterate.export.settings``)."""
    from foundation.settings_cli import flags_table_markdown

    return flags_table_markdown(ExportSettings)


if __name__ == "__main__":
    print(settings_table_markdown())
