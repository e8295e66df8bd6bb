"""One adapter per stage: YAML block -> that stage's own settings -> its public API."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ValidationError

from foundation.errors import UserError
from foundation.validation import FieldProblem, user_error_from_validation


def stage_settings(stage: str, settings_class: type[BaseModel], user_settings: dict[str, Any],
                   wired: dict[str, Any]) -> BaseModel:
    """The stage's own settings object: its YAML block plus what the pipeline wires itself.

    ``wired`` (input model, output paths, overwrite) comes from the runner; a block that sets one of
    those keys is refused rather than silently overridden. Errors name ``stage`` and the field.
    Nothing else is read: a settings class with other sources (AbliterateSettings reads ``QA_*``
    variables and ``config.toml``) is built with ``from_mapping``, so the settings, and the
    fingerprint the runner takes of them, are the YAML's alone.
    """
    for key in wired:
        if key in user_settings:
            raise UserError(f"pipeline stage '{stage}': field '{key}'", "is set by the pipeline itself",
                            "remove it (the pipeline passes the previous stage's output and its own output directory)")
    try:
        build = getattr(settings_class, "from_mapping", settings_class.model_validate)
        return build({**user_settings, **wired})
    except ValidationError as error:
        names = [name for name in settings_class.model_fields if name not in wired]

        def explain(problem: FieldProblem) -> tuple[str, str, str]:
            where = f"pipeline stage '{stage}': field '{problem.field}'"
            if problem.kind != "extra_forbidden":  # a bad value: the list of setting names would not help
                return where, problem.message, f"give '{problem.field}' a valid value (see 'quant-abliterate {stage} --help')"
            close = difflib.get_close_matches(problem.field, names, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            return where, "unknown setting", f"{hint}valid settings: {', '.join(names)}"

        raise user_error_from_validation(error, explain) from None
