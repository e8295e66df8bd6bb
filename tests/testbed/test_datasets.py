from pathlib import Path

import pytest

from abliterate.evaluation.prompt_sets import DEFAULT_SPEC, load_prompt_spec
from foundation.errors import UserError
from testbed.corpus import HELPFUL_OPENERS
from testbed.datasets import write_datasets

COMMITTED = Path(__file__).resolve().parents[2] / "datasets_yaml"


def test_committed_datasets_are_exactly_what_the_generator_writes(tmp_path):
    written = write_datasets(tmp_path, seed=0)
    assert len(written) >= 8
    for path in written:
        relative = path.relative_to(tmp_path)
        assert (COMMITTED / relative).read_bytes() == path.read_bytes(), relative


def test_offline_corpora_are_small_and_well_formed():
    import json

    for name, field in (("general_text.jsonl", "text"), ("chat_conversations.jsonl", "messages")):
        path = COMMITTED / "corpora" / name
        assert path.stat().st_size < 400_000
        records = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(records) >= 300 and all(field in record for record in records)
    messages = json.loads((COMMITTED / "corpora" / "chat_conversations.jsonl").read_text().splitlines()[0])["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]


def test_spec_names_the_split_files_markers_and_openers():
    spec = load_prompt_spec(DEFAULT_SPEC)
    assert len(spec.harmful_test) == len(spec.harmless_test) == 100
    assert len(spec.harmful_train) == len(spec.harmless_train) == 256
    assert not set(spec.harmful_train) & set(spec.harmful_test)
    assert spec.compliance_openers == HELPFUL_OPENERS
    assert "sorry" in spec.refusal_markers and spec.perplexity_texts
    names = sorted(p.name for p in (COMMITTED / "prompts").iterdir())
    assert names == ["harmful_test.jsonl", "harmful_train.jsonl", "harmless_test.jsonl", "harmless_train.jsonl"]


def test_bad_spec_is_a_user_error(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("harmful_train: missing.jsonl\n")
    with pytest.raises(UserError, match="harmless_train"):
        load_prompt_spec(spec)
    spec.write_text(
        "harmful_train: a.jsonl\nharmless_train: a.jsonl\nharmful_test: a.jsonl\nharmless_test: a.jsonl\n"
    )
    (tmp_path / "a.jsonl").write_text('{"text": "no prompt field"}\n')
    with pytest.raises(UserError, match="prompt"):
        load_prompt_spec(spec)
