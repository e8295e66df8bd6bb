"""One adapter per stage: YAML block -> that stage's own settings -> its public API."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from quantize.errors import UserError


def validate_stage_settings(stage: str, settings_class: type[BaseModel], data: dict[str, Any], *,
                            provided_by_pipeline: tuple[str, ...] = ()) -> BaseModel:
    """Validate a stage block with the stage's own settings class, errors naming ``stage.field``."""
    for key in provided_by_pipeline:
        if key in data:
            raise UserError(f"pipeline stage '{stage}': field '{key}'", "is set by the pipeline itself",
                            "remove it (the pipeline passes the previous stage's output and its own output directory)")
    try:
        return settings_class.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        problem = "unknown setting" if first["type"] == "extra_forbidden" else first["msg"]
        known = ", ".join(name for name in settings_class.model_fields if name not in provided_by_pipeline)
        raise UserError(f"pipeline stage '{stage}': field '{field}'", problem, f"valid settings: {known}") from None
