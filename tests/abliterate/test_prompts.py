"""Prompt sets from a spec and from single-file overrides; bad inputs are UserErrors naming the flag."""

import pytest
from tiny_chat import write_prompts

from abliterate.prompts import load_prompt_sets
from foundation.errors import UserError


def test_spec_with_overrides_and_limits(tmp_path):
    spec = write_prompts(tmp_path / "prompts")
    override = tmp_path / "harmful.txt"
    override.write_text("first harmful\n\nsecond harmful\n")
    sets = load_prompt_sets(spec, {"harmful_test": override}, limit_train=3)
    assert sets.harmful_test == ("first harmful", "second harmful")
    assert len(sets.harmful_train) == 3 and len(sets.harmless_test) == 4
    assert sets.refusal_markers == ("sorry", "i cannot") and sets.compliance_openers == ("Sure",)


def test_missing_spec_and_missing_file_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="--prompts"):
        load_prompt_sets(tmp_path / "nope.yaml", {})
    with pytest.raises(UserError, match="--prompts: prompt spec .* is a directory"):
        load_prompt_sets(tmp_path, {})
    spec = write_prompts(tmp_path / "prompts")
    with pytest.raises(UserError, match="--harmless_test"):
        load_prompt_sets(spec, {"harmless_test": tmp_path / "missing.jsonl"})


def test_malformed_or_non_mapping_spec_names_the_file_and_line(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("harmful_train: [a,\n")
    with pytest.raises(UserError, match=r"broken\.yaml:2:1: invalid YAML syntax"):
        load_prompt_sets(broken, {})
    listing = tmp_path / "listing.yaml"
    listing.write_text("- just\n- a list\n")
    with pytest.raises(UserError, match=r"listing\.yaml: Input should be a valid dictionary"):
        load_prompt_sets(listing, {})


def test_empty_prompt_file_is_refused_naming_the_flag(tmp_path):
    spec = write_prompts(tmp_path / "prompts")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(UserError, match=r"--harmful_train: .*empty\.txt holds no prompts"):
        load_prompt_sets(spec, {"harmful_train": empty})
