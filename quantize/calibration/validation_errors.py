"""Turn pydantic's validation errors into one message a user can act on.

Pydantic reports a location tuple like ``('datasets', 1, 'weight')``; users
think in "the second dataset, called chat, its weight". This module makes that
translation and attaches a concrete fix for each kind of mistake, so the
schema itself stays a plain declaration.
"""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import ValidationError

from foundation.errors import UserError
from foundation.validation import FieldProblem
from foundation.validation import user_error_from_validation as from_validation


class EntryProblem(ValueError):
    """Raised inside validators: carries its own fix and, if pydantic's location
    cannot know it (model-level checks), the field and entry index."""

    def __init__(self, problem: str, fix: str, *, field: str | None = None, index: int | None = None):
        super().__init__(problem)
        self.problem = problem
        self.fix = fix
        self.field = field
        self.index = index


def user_error_from_validation(
    error: ValidationError,
    file_label: str,
    data: Any,
    allowed_keys: dict[str, list[str]],
) -> UserError:
    """The first problem in full, with a one-line mention of any others."""
    return from_validation(error, lambda problem: _explain(problem, file_label, data, allowed_keys),
                           mention_others=file_label + ": ")


def _explain(
    detail: FieldProblem, file_label: str, data: Any, allowed_keys: dict[str, list[str]]
) -> tuple[str, str, str]:
    loc = detail.loc
    kind = detail.kind
    ctx = detail.ctx
    own = detail.own if isinstance(detail.own, EntryProblem) else None

    section, index, field = _locate(loc, own)
    where = _describe_location(file_label, section, index, field, data)
    value = detail.input

    if own is not None:
        return where, own.problem, own.fix
    if kind == "extra_forbidden":
        group = section if (section, len(loc)) in (("datasets", 3), ("calibration", 2)) else "mix"
        allowed = allowed_keys.get(group, [])
        guess = difflib.get_close_matches(str(field), allowed, n=1)
        hint = f"did you mean '{guess[0]}'? " if guess else ""
        fix = f"{hint}remove it or correct its spelling; allowed keys here: {', '.join(allowed)}"
        if section == "calibration" and field == "batch_size":
            fix = "batch_size is a command-line flag (--batch_size), not part of the mix: remove it"
        return where, f"unknown key '{field}'", fix
    if kind == "missing":
        example = {"path": "<Hub id or local file/folder>"}.get(str(field), "<value>")
        return where, f"required key '{field}' is missing", f"add '{field}: {example}'"
    if kind in ("greater_than_equal", "greater_than"):
        bound = ctx.get("ge", ctx.get("gt"))
        relation = ">=" if kind == "greater_than_equal" else ">"
        fix = f"set {field} to a number {relation} {bound}"
        if field == "weight":
            fix += " (weights are relative shares, normalized over all datasets; 0 disables an entry)"
        return where, f"{field} must be {relation} {bound}, got {value!r}", fix
    if field == "weight" and kind in ("float_type", "finite_number"):
        return (where, f"weight must be a finite number >= 0, got {value!r}",
                "write a relative share such as weight: 0.5 (shares are normalized over all datasets; 0 disables an entry)")
    if kind == "finite_number":
        return where, f"{field} must be a finite number, got {value!r}", f"set {field} to a finite number"
    if kind == "literal_error" and field == "formatter":
        return (
            where,
            f"unknown formatter {value!r}",
            f"use one of: {ctx.get('expected')}, or leave formatter out to detect it from the columns",
        )
    if kind == "too_short" and field == "datasets":
        return where, "the datasets list is empty", "add at least one entry: '- path: <Hub id or file>'"
    if kind == "list_type" and field == "datasets":
        return where, f"datasets must be a list, got {value!r}", "write one entry per line: '  - path: <Hub id or file>'"
    if kind in ("model_type", "dict_type"):
        fix = (
            "write the entry as '- path: <Hub id or file>' with its other keys indented below it"
            if section == "datasets"
            else "write 'calibration:' followed by indented keys, e.g. '  max_samples: 512'"
        )
        return where, f"expected a mapping of keys, got {value!r}", fix
    target = f"'{field}'" if field else "this entry"
    return where, f"{detail.message} (got {value!r})", f"correct the value of {target}"


def _locate(loc: tuple, own: EntryProblem | None) -> tuple[str | None, int | None, str | None]:
    """(section, dataset index, field) from a pydantic location."""
    section = loc[0] if loc and isinstance(loc[0], str) else None
    index = loc[1] if len(loc) > 1 and isinstance(loc[1], int) else None
    field = loc[-1] if loc and isinstance(loc[-1], str) else None
    if section == "datasets" and index is not None:
        field = loc[2] if len(loc) > 2 and isinstance(loc[2], str) else None
    elif section is not None and len(loc) == 1 and section in ("datasets", "calibration"):
        field = section if section == "datasets" else None
    if own is not None:
        field = own.field or field
        if own.index is not None:
            section, index = "datasets", own.index
    return section, index, field


def _describe_location(
    file_label: str, section: str | None, index: int | None, field: str | None, data: Any
) -> str:
    if section == "datasets" and index is not None:
        name = _entry_name(data, index)
        label = f"datasets[{index}]" + (f" (name: {name!r})" if name else "")
        return f"{file_label}: {label}" + (f", field '{field}'" if field else "")
    if section == "calibration":
        return f"{file_label}: calibration" + (f", field '{field}'" if field else "")
    if field:
        return f"{file_label}: top-level key '{field}'"
    return file_label


def _entry_name(data: Any, index: int) -> str | None:
    try:
        entry = data["datasets"][index]
    except (KeyError, IndexError, TypeError):
        return None
    if not isinstance(entry, dict):
        return None
    name = entry.get("name")
    if name is None and isinstance(entry.get("path"), str):
        name = entry["path"]
    return str(name) if name is not None else None
