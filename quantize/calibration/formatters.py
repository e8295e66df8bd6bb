"""Turn one dataset row into the text the model is calibrated on.

Calibration should see what the model will see when served, so conversations
go through the tokenizer's own chat template; only a tokenizer without one
gets a plain "User: ... / Assistant: ..." rendering. Which columns to read is
decided once per dataset (`plan_format`), from the YAML or by detection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from quantize.calibration.schema import DatasetEntry

TEXT_COLUMNS = ("text", "content", "document", "body", "story", "article", "passage", "code", "markdown")
PROMPT_COLUMNS = ("prompt", "instruction", "question", "query", "problem")
ANSWER_COLUMNS = ("answer", "response", "output", "completion", "solution", "chosen")
CONVERSATION_COLUMNS = {"sharegpt": "conversations", "chat_completion": "messages"}
# ShareGPT speaker names -> chat-template roles.
SHAREGPT_ROLES = {
    "human": "user", "user": "user", "prompter": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant",
    "bard": "assistant", "model": "assistant", "bot": "assistant", "function_call": "assistant",
    "system": "system",
    "tool": "tool", "function_response": "tool", "observation": "tool",
}


class ColumnProblem(Exception):
    """A configured or required column is absent; names the YAML field to fix."""

    def __init__(self, field: str, problem: str, fix: str) -> None:
        super().__init__(problem)
        self.field = field
        self.problem = problem
        self.fix = fix


@dataclass(frozen=True)
class FormatPlan:
    """The resolved formatter and the columns it reads, in the order it reads them."""

    formatter: str
    columns: tuple[str, ...]


@dataclass(frozen=True)
class RenderedText:
    text: str
    # True when a chat template already wrote BOS and friends: do not add them again.
    has_special_tokens: bool


def plan_format(entry: DatasetEntry, available: list[str]) -> FormatPlan:
    """Decide formatter + columns for a dataset whose columns are `available`."""
    formatter = entry.formatter or _detect_formatter(entry, available)
    if formatter == "raw_text":
        columns = entry.columns or ([entry.text_column] if entry.text_column else None)
        if columns is None:
            found = _first_present(TEXT_COLUMNS, available)
            if found is None:
                raise ColumnProblem(
                    "text_column",
                    f"no text column found (looked for {', '.join(TEXT_COLUMNS)}); "
                    f"available columns: {', '.join(available)}",
                    "set text_column: <one of the available columns>, or a formatter "
                    "(prompt_answer / sharegpt / chat_completion) with its columns",
                )
            columns = [found]
        field = "columns" if entry.columns else "text_column"
        return FormatPlan("raw_text", tuple(_require(columns, available, field)))
    if formatter == "prompt_answer":
        if entry.columns:
            return FormatPlan(formatter, tuple(_require(entry.columns, available, "columns")))
        prompt = _first_present(PROMPT_COLUMNS, available)
        answer = _first_present(ANSWER_COLUMNS, available)
        if prompt is None or answer is None:
            raise ColumnProblem(
                "columns",
                f"could not find a prompt column ({', '.join(PROMPT_COLUMNS)}) and an answer "
                f"column ({', '.join(ANSWER_COLUMNS)}); available columns: {', '.join(available)}",
                "set columns: [<prompt column>, <answer column>]",
            )
        # Alpaca-style data keeps extra input for the instruction in `input`.
        extra = ("input",) if prompt == "instruction" and "input" in available else ()
        return FormatPlan(formatter, (prompt, answer, *extra))
    column = (entry.columns or [entry.text_column or CONVERSATION_COLUMNS[formatter]])[0]
    field = "columns" if entry.columns else ("text_column" if entry.text_column else "formatter")
    return FormatPlan(formatter, tuple(_require([column], available, field, formatter)))


def _detect_formatter(entry: DatasetEntry, available: list[str]) -> str:
    if entry.text_column or entry.columns:
        return "raw_text"
    if "messages" in available:
        return "chat_completion"
    if "conversations" in available:
        return "sharegpt"
    if _first_present(TEXT_COLUMNS, available) is None and _first_present(PROMPT_COLUMNS, available):
        return "prompt_answer"
    return "raw_text"


def _first_present(candidates: tuple[str, ...], available: list[str]) -> str | None:
    return next((name for name in candidates if name in available), None)


def _require(columns: list[str], available: list[str], field: str, formatter: str | None = None) -> list[str]:
    missing = [name for name in columns if name not in available]
    if missing:
        problem = (f"column(s) {', '.join(repr(m) for m in missing)} not in the dataset; "
                   f"available columns: {', '.join(available)}")
        if field == "formatter":  # the formatter's default column is absent: the formatter or the column is wrong
            fix = (f"formatter {formatter!r} reads its conversations from column {missing[0]!r}: name the column that "
                   f"holds them (columns: [<one of: {', '.join(available)}>]), or pick the formatter that fits the data "
                   "(raw_text for plain text), or leave formatter out to detect it")
        else:
            fix = f"set {field} to existing column names (one of: {', '.join(available)})"
        raise ColumnProblem(field, problem, fix)
    return columns


def render_row(plan: FormatPlan, row: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> RenderedText | None:
    """The row as text, or None when it holds nothing usable (it is then dropped)."""
    if plan.formatter == "raw_text":
        parts = [_as_text(row.get(name)) for name in plan.columns]
        text = "\n\n".join(part for part in parts if part)
        return RenderedText(text, False) if text else None
    if plan.formatter == "prompt_answer":
        prompt, answer = _as_text(row.get(plan.columns[0])), _as_text(row.get(plan.columns[1]))
        extra = _as_text(row.get(plan.columns[2])) if len(plan.columns) > 2 else ""
        if extra:
            prompt = f"{prompt}\n\n{extra}"
        if not prompt and not answer:
            return None
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        return render_conversation(messages, tokenizer)
    raw = row.get(plan.columns[0])
    messages = sharegpt_messages(raw) if plan.formatter == "sharegpt" else chat_messages(raw)
    return render_conversation(messages, tokenizer) if messages else None


def sharegpt_messages(turns: Any) -> list[dict[str, str]]:
    """`[{from: human, value: ...}, ...]` -> chat messages; malformed turns are skipped."""
    if not isinstance(turns, list):
        return []
    messages = []
    for turn in turns:
        if isinstance(turn, dict) and isinstance(turn.get("value"), str):
            speaker = str(turn.get("from", "user")).lower()
            messages.append({"role": SHAREGPT_ROLES.get(speaker, "user"), "content": turn["value"]})
    return messages


def chat_messages(turns: Any) -> list[dict[str, str]]:
    """OpenAI-style messages; list-of-parts content keeps its text parts."""
    if not isinstance(turns, list):
        return []
    messages = []
    for turn in turns:
        if isinstance(turn, dict) and "role" in turn:
            messages.append({"role": str(turn["role"]), "content": _as_text(turn.get("content"))})
    return messages


def render_conversation(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase) -> RenderedText:
    """Through the tokenizer's chat template when it has one that accepts these
    messages (some reject e.g. a system role); otherwise a readable plain form."""
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception:  # noqa: BLE001 - templates raise arbitrary jinja errors
            text = None
        if isinstance(text, str) and text:
            return RenderedText(text, True)
    plain = "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)
    return RenderedText(plain, False)


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, list):  # e.g. content parts [{type: text, text: ...}] or list of strings
        pieces = [item.get("text", "") if isinstance(item, dict) else str(item) for item in value]
        return "\n".join(piece for piece in pieces if piece).strip()
    return str(value).strip()
