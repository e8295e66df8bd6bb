"""A command line generated from a pydantic settings model, so the model is the only place a setting is written.

Stage 1 and the export keep the seed's argparse flags (``--model``, ``--no-verify``,
a positional trial directory, ...), which pydantic-settings' own CLI cannot spell,
so this small generator reads ``model_fields`` instead: the flag is ``--<field>``
(``--no_<field>`` for a setting that is on by default), the help is the field's
``description`` plus its default, and a field's ``json_schema_extra={"cli": ...}``
(built with ``cli()``) adds aliases, a positional or repeated form, or a group.

argparse only collects strings: every default is ``SUPPRESS``ed (a flag not given
is absent, so the model fills the default) and every value is checked by the
model, whose first error becomes a ``UserError`` naming the flag.
"""

from __future__ import annotations

import argparse
import typing
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from foundation.validation import FieldProblem, user_error_from_validation


def cli(*, aliases: tuple[str, ...] = (), flags: tuple[str, ...] = (), positional: bool = False,
        repeat: bool = False, group: str | None = None, metavar: str | None = None) -> dict[str, Any]:
    """CLI details of one field, for ``Field(json_schema_extra=cli(...))``.

    ``flags`` replaces the generated flag names, ``aliases`` adds to them; ``repeat``: one value
    per occurrence (``--format a --format b``) instead of several after one flag.
    """
    options = {"aliases": list(aliases), "flags": list(flags), "positional": positional, "repeat": repeat,
               "group": group, "metavar": metavar}
    return {"cli": {key: value for key, value in options.items() if value}}


def cli_options(field: FieldInfo) -> dict[str, Any]:
    extra = field.json_schema_extra
    return dict(extra.get("cli", {})) if isinstance(extra, dict) else {}


def _is_bool(field: FieldInfo) -> bool:
    return field.annotation is bool


def _is_sequence(field: FieldInfo) -> bool:
    origins = {typing.get_origin(field.annotation)} | {typing.get_origin(arg) for arg in typing.get_args(field.annotation)}
    return bool(origins & {list, tuple})


def _choices(field: FieldInfo) -> tuple[str, ...] | None:
    for candidate in (field.annotation, *typing.get_args(field.annotation)):
        if typing.get_origin(candidate) is typing.Literal:
            return tuple(str(choice) for choice in typing.get_args(candidate))
    return None


def flags_of(name: str, field: FieldInfo) -> list[str]:
    """The flag names of one field; the first is the one errors name."""
    options = cli_options(field)
    if options.get("positional"):
        return [name]
    on_by_default = _is_bool(field) and field.default is True
    primary = options.get("flags") or [f"--no_{name}" if on_by_default else f"--{name}"]
    return [*primary, *options.get("aliases", [])]


def default_text(field: FieldInfo) -> str | None:
    """The default as the help and the README show it; None when there is nothing worth saying."""
    if field.is_required():
        return None
    value = field.get_default(call_default_factory=True)
    if value is None or value is False or value is True or value in ((), []):
        return None
    if isinstance(value, (list, tuple)):
        return " ".join(str(item) for item in value)
    return str(value)


def help_text(field: FieldInfo) -> str:
    text = field.description or ""
    default = default_text(field)
    if default is not None:
        text += f" (default: {default})"
    return text.replace("%", "%%")  # argparse formats help strings with %


def add_model_arguments(parser: argparse.ArgumentParser, model: type[BaseModel], *,
                        required: tuple[str, ...] = ()) -> None:
    """One argument per field of ``model``, in field order, grouped as the fields ask."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, field in model.model_fields.items():
        options = cli_options(field)
        target: Any = parser
        if options.get("group"):
            target = groups.setdefault(options["group"], parser.add_argument_group(options["group"]))
        kwargs: dict[str, Any] = {"help": help_text(field)}
        if options.get("positional"):
            target.add_argument(name, **kwargs)
            continue
        kwargs.update(dest=name, default=argparse.SUPPRESS, required=name in required)
        if _is_bool(field):
            kwargs["action"] = "store_false" if field.default is True else "store_true"
        else:
            choices = _choices(field)
            kwargs["metavar"] = options.get("metavar") or ("{" + ",".join(choices) + "}" if choices else name.upper())
            if _is_sequence(field) and options.get("repeat"):
                kwargs["action"] = "append"
            elif _is_sequence(field):
                kwargs.update(nargs="+", action="extend")
        target.add_argument(*flags_of(name, field), **kwargs)


def given_values(args: argparse.Namespace, model: type[BaseModel]) -> dict[str, Any]:
    """The fields the command line set (defaults were suppressed, so absent means 'not given')."""
    return {name: value for name, value in vars(args).items() if name in model.model_fields}


def validate(model: type[BaseModel], values: dict[str, Any], *, fix: str) -> Any:
    """``model(**values)``; its first problem becomes a UserError naming the flag of that field."""
    try:
        return model.model_validate(values)
    except ValidationError as error:
        def explain(problem: FieldProblem) -> tuple[str, str, str]:
            field = str(problem.loc[0]) if problem.loc else ""
            where = flags_of(field, model.model_fields[field])[0] if field in model.model_fields else "arguments"
            return where, problem.message, fix

        raise user_error_from_validation(error, explain) from None


def flags_table_markdown(model: type[BaseModel]) -> str:
    """A README table of every setting: its flags, default and meaning, as ``--help`` prints them."""
    lines = ["| flag | default | meaning |", "|---|---|---|"]
    for name, field in model.model_fields.items():
        flags = ", ".join(f"`{flag}`" for flag in flags_of(name, field))
        if field.is_required():
            default = "(required)"
        elif _is_bool(field):
            default = "on" if field.default else "off"
        else:
            default = f"`{default_text(field)}`" if default_text(field) else ""
        description = (field.description or "").replace("|", "\\|").replace("<", "&lt;")
        lines.append(f"| {flags} | {default} | {description} |")
    return "\n".join(lines)


__all__ = ["add_model_arguments", "cli", "flags_of", "flags_table_markdown", "given_values",
           "help_text", "validate"]
