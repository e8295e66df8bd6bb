"""Each formatter, column detection, and chat-template rendering with its fallback."""

from __future__ import annotations

import pytest

from quantize.calibration.formatters import (
    ColumnProblem,
    FormatPlan,
    plan_format,
    render_conversation,
    render_row,
)
from quantize.calibration.schema import DatasetEntry


def entry(**fields) -> DatasetEntry:
    return DatasetEntry.model_validate({"path": "owner/dataset", **fields})


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        (["id", "text"], FormatPlan("raw_text", ("text",))),
        (["content", "meta"], FormatPlan("raw_text", ("content",))),
        (["prompt", "messages"], FormatPlan("chat_completion", ("messages",))),
        (["id", "conversations"], FormatPlan("sharegpt", ("conversations",))),
        (["question", "answer"], FormatPlan("prompt_answer", ("question", "answer"))),
        (["instruction", "input", "output"], FormatPlan("prompt_answer", ("instruction", "output", "input"))),
    ],
)
def test_formatter_and_columns_are_detected(columns, expected):
    assert plan_format(entry(), columns) == expected


def test_given_columns_win_over_detection():
    assert plan_format(entry(text_column="body2"), ["text", "body2"]) == FormatPlan("raw_text", ("body2",))
    plan = plan_format(entry(formatter="prompt_answer", columns=["prompt", "story"]), ["prompt", "story"])
    assert plan == FormatPlan("prompt_answer", ("prompt", "story"))
    plan = plan_format(entry(formatter="sharegpt", columns=["dialog"]), ["dialog"])
    assert plan == FormatPlan("sharegpt", ("dialog",))


def test_named_column_that_does_not_exist_lists_available():
    with pytest.raises(ColumnProblem) as caught:
        plan_format(entry(text_column="txt"), ["text", "id"])
    assert caught.value.field == "text_column"
    assert "'txt'" in caught.value.problem and "available columns: text, id" in caught.value.problem


def test_undetectable_text_column_lists_available():
    with pytest.raises(ColumnProblem) as caught:
        plan_format(entry(formatter="raw_text"), ["id", "score"])
    assert caught.value.field == "text_column" and "available columns: id, score" in caught.value.problem


def test_conversation_formatter_without_its_column():
    with pytest.raises(ColumnProblem) as caught:
        plan_format(entry(formatter="chat_completion"), ["text"])
    assert "'messages'" in caught.value.problem and "available columns: text" in caught.value.problem


def test_raw_text_joins_several_columns_and_drops_empty_rows(tokenizer):
    plan = FormatPlan("raw_text", ("title", "body"))
    rendered = render_row(plan, {"title": "A title", "body": " the body "}, tokenizer)
    assert rendered.text == "A title\n\nthe body" and not rendered.has_special_tokens
    assert render_row(plan, {"title": None, "body": "  "}, tokenizer) is None


def test_prompt_answer_goes_through_chat_template(tokenizer):
    plan = FormatPlan("prompt_answer", ("instruction", "output", "input"))
    row = {"instruction": "Sum", "input": "1 2", "output": "3"}
    rendered = render_row(plan, row, tokenizer)
    assert rendered.text == "<s><|user|> Sum\n\n1 2 </s> <|assistant|> 3 </s> "
    assert rendered.has_special_tokens


def test_sharegpt_roles_are_mapped(tokenizer):
    plan = FormatPlan("sharegpt", ("conversations",))
    row = {"conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Hello"},
        {"from": "weird"},  # malformed turn: skipped
    ]}
    rendered = render_row(plan, row, tokenizer)
    assert rendered.text == "<s><|system|> Be brief. </s> <|user|> Hi </s> <|assistant|> Hello </s> "
    assert render_row(plan, {"conversations": "not a list"}, tokenizer) is None


def test_chat_completion_flattens_content_parts(tokenizer):
    plan = FormatPlan("chat_completion", ("messages",))
    row = {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Look"}, {"type": "image"}]},
        {"role": "assistant", "content": "Nice"},
    ]}
    assert render_row(plan, row, tokenizer).text == "<s><|user|> Look </s> <|assistant|> Nice </s> "


def test_plain_fallback_without_chat_template(plain_tokenizer):
    plan = FormatPlan("chat_completion", ("messages",))
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    rendered = render_row(plan, row, plain_tokenizer)
    assert rendered.text == "User: Hi\n\nAssistant: Yo"
    assert not rendered.has_special_tokens  # BOS gets added at tokenization


def test_template_that_rejects_messages_falls_back_to_plain(plain_tokenizer):
    tokenizer = _copy_with_template(plain_tokenizer, "{% if messages[0]['role'] == 'system' %}"
                                    "{{ raise_exception('no system role') }}{% endif %}ok")
    rendered = render_conversation([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}], tokenizer)
    assert rendered.text == "System: S\n\nUser: U" and not rendered.has_special_tokens
    assert render_conversation([{"role": "user", "content": "U"}], tokenizer).text == "ok"


def _copy_with_template(tokenizer, template):
    import copy

    clone = copy.deepcopy(tokenizer)
    clone.chat_template = template
    return clone
