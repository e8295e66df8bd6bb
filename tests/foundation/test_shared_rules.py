"""The rules several stages share: ValidationError -> UserError, local path vs Hub id, dtype spellings."""

import pytest
import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from foundation.dtypes import SHORT_NAMES, TORCH_DTYPES
from foundation.errors import UserError
from foundation.hub_ids import is_hub_id, looks_like_local_path
from foundation.validation import user_error_from_validation


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weight: float
    name: str = "x"


def _error(data) -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        _Entry.model_validate(data)
    return caught.value


def test_the_converter_words_the_first_problem_as_the_caller_explains_it():
    error = _error({"weight": "heavy", "colour": 1})
    converted = user_error_from_validation(error, lambda p: (f"file: {p.field}", f"{p.kind}: {p.input!r}", "fix it"))
    assert isinstance(converted, UserError)
    assert (converted.where, converted.problem, converted.fix) == ("file: weight", "float_parsing: 'heavy'", "fix it")


def test_the_converter_can_name_the_other_problems_in_one_line():
    error = _error({"weight": "heavy", "colour": 1})
    converted = user_error_from_validation(error, lambda p: (f"file: {p.field}", p.kind, None), mention_others="file: ")
    assert converted.problem == "float_parsing (and 1 more problem(s): colour: extra_forbidden)"


@pytest.mark.parametrize("name", ["gpt2", "Qwen/Qwen3-30B-A3B", "meta-llama/Llama-3.1-8B-Instruct", "a_b.c-d/e.f"])
def test_hub_ids(name):
    assert is_hub_id(name) and not looks_like_local_path(name)


@pytest.mark.parametrize("name", ["/models/x", "./x", "../x", "~/x", ".hidden", "a/b/c", "C:\\models\\x", "has space"])
def test_local_paths(name):
    assert looks_like_local_path(name) and not is_hub_id(name)


def test_every_spelling_names_a_torch_dtype_and_short_names_round_trip():
    assert TORCH_DTYPES["bf16"] is TORCH_DTYPES["bfloat16"] is torch.bfloat16
    assert TORCH_DTYPES["half"] is torch.float16 and TORCH_DTYPES["float"] is torch.float32
    assert TORCH_DTYPES["auto"] == "auto"
    assert all(TORCH_DTYPES[name] is dtype for dtype, name in SHORT_NAMES.items() if name in TORCH_DTYPES)
