"""Stage 2 refuses inputs that used to give silently wrong results (issue 14, S3 S5 S6 S7)."""

from __future__ import annotations

import pytest

from abliterate.search.selection import parse_rule
from abliterate.settings import parse_settings
from foundation.errors import UserError


@pytest.mark.parametrize("rule", ["trial 1.5", "trial .5", "trial 2.0"])
def test_select_with_a_fractional_trial_number_is_refused_with_the_accepted_forms(tmp_path, rule):
    with pytest.raises(UserError, match="--select") as caught:
        parse_settings(["--model", str(tmp_path), "--select", rule])
    message = str(caught.value)
    assert "whole number" in message and "trial 12" in message and "best_kl_under" in message
    assert parse_rule("trial 12", n_harmful=10) == ("trial", 12.0)
