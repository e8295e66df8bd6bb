"""Pipeline stage 'quantize': stage 1 with the same QuantizeSettings as its CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from foundation.errors import UserError
from pipelines.adapters import stage_settings
from pipelines.evaluations import size_bytes
from pipelines.stages import StageContext
from quantize.settings import QuantizeSettings, check_paths

CHECKPOINT = "checkpoint"


def build_settings(user_settings: dict[str, Any], context: StageContext) -> QuantizeSettings:
    trust_remote_code = context.trust_remote_code or user_settings.get("trust_remote_code", False)
    settings = stage_settings("quantize", QuantizeSettings, {**user_settings, "trust_remote_code": trust_remote_code},
                              {"input_model": context.source_model,
                               "output_model": Path(context.stage_dir) / CHECKPOINT, "overwrite": False})
    try:
        check_paths(settings)  # the same checks as the CLI, before any stage runs
    except UserError as error:
        raise UserError(f"pipeline stage 'quantize': {error.where.lstrip('-')}", error.problem, error.fix) from None
    return settings


def run(settings: QuantizeSettings, context: StageContext) -> dict[str, Any]:
    from quantize.stage import run_quantize

    output = run_quantize(settings)
    return {"artifact": CHECKPOINT, "format": settings.format, "size_bytes": size_bytes(output)}
