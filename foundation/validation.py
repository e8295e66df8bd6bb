"""The one converter from a pydantic ``ValidationError`` to a ``UserError``.

Pydantic reports a list of ``{loc, type, msg, input, ctx}`` records; a user
needs one message naming the input and its fix. Every stage validates its own
files and flags, and each knows best how to word *its* problems, so a caller
passes an ``explain`` function (one problem -> where, problem, fix); this
module owns the rest: reading pydantic's records the same way everywhere,
taking the first problem in full, and optionally naming the others in one
line, so no stage hand-rolls ``error.errors()[0]`` again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from foundation.errors import UserError


@dataclass(frozen=True)
class FieldProblem:
    """One record of a ValidationError, in the names callers use."""

    loc: tuple[Any, ...]
    kind: str  # pydantic's error type: "missing", "extra_forbidden", "greater_than_equal", ...
    message: str  # pydantic's own words
    input: Any
    ctx: dict[str, Any]

    @property
    def field(self) -> str:
        """The location as dotted text (``datasets.1.weight``); empty when the whole input is wrong."""
        return ".".join(str(part) for part in self.loc)

    @property
    def own(self) -> Any:
        """The exception a validator raised itself (it may carry its own problem and fix), else None."""
        return self.ctx.get("error")


Explain = Callable[[FieldProblem], tuple[str, str, str | None]]


def field_problems(error: ValidationError) -> list[FieldProblem]:
    return [FieldProblem(tuple(detail["loc"]), detail["type"], detail["msg"].removeprefix("Value error, "), detail.get("input"),
                         detail.get("ctx") or {}) for detail in error.errors(include_url=False)]


def user_error_from_validation(error: ValidationError, explain: Explain, *, mention_others: str | None = None) -> UserError:
    """The first problem as ``explain`` words it.

    ``mention_others``: when set, any further problems are appended to the problem text in one line,
    each as its ``where`` with this prefix removed (so a long file label is not repeated).
    """
    problems = field_problems(error)
    where, problem, fix = explain(problems[0])
    if mention_others is not None and len(problems) > 1:
        others = []
        for other in problems[1:]:
            other_where, other_problem, _ = explain(other)
            others.append(f"{other_where.removeprefix(mention_others)}: {other_problem}")
        problem += f" (and {len(others)} more problem(s): " + "; ".join(others) + ")"
    return UserError(where, problem, fix)
