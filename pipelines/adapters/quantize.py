"""Pipeline stage 'quantize': stage 1 with the same QuantizeSettings as its CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.adapters import validate_stage_settings
from pipelines.stages import StageContext
from quantize.errors import UserError
from quantize.settings import QuantizeSettings, check_paths

CHECKPOINT = "checkpoint"


def build_settings(user_settings: dict[str, Any], context: StageContext) -> QuantizeSettings:
    data = dict(user_settings)
    for key in ("input_model", "output_model", "overwrite"):
        if key in data:
            validate_stage_settings("quantize", QuantizeSettings, data, provided_by_pipeline=(key,))
    data.update(input_model=context.source_model, output_model=Path(context.stage_dir) / CHECKPOINT,
                trust_remote_code=context.trust_remote_code or data.get("trust_remote_code", False))
    settings = validate_stage_settings("quantize", QuantizeSettings, data)
    try:
        check_paths(settings)  # the same checks as the CLI, before any stage runs
    except UserError as error:
        raise UserError(f"pipeline stage 'quantize': {error.where.lstrip('-')}", error.problem, error.fix) from None
    return settings


def run(settings: QuantizeSettings, context: StageContext) -> dict[str, Any]:
    from quantize.stage import run_quantize

    output = run_quantize(settings)
    size = sum(path.stat().st_size for path in Path(output).glob("*.safetensors"))
    return {"artifact": CHECKPOINT, "format": settings.format, "size_bytes": size}
