"""Look-alike refusals and skill accuracy (issue 17): recorded only where measured, shown, and capped by --select."""

import pytest

from abliterate.search.objectives import TrialMetrics, skill_loss_points
from abliterate.search.selection import (
    Candidate,
    collateral_text,
    effective_refusals,
    front_table,
    parse_selection,
    select_trial,
)
from foundation.errors import UserError

BASE = TrialMetrics(20, 20, 0, 0.0, 0.0, 0.0, 0, 10, None, 0, 50, 40, 50)  # 80% skill, no look-alike refused


def _trial(number, refusals, kl, lookalikes, skill):
    metrics = TrialMetrics(refusals, 20, 20 - refusals, kl, 0.0, 0.0, 0, 10, None, lookalikes, 50, skill, 50)
    return Candidate(number, metrics, effective_refusals(metrics, BASE), "global", 4.0)


CANDIDATES = [
    _trial(0, 20, 0.0001, 0, 40),
    _trial(1, 0, 0.01, 12, 40),  # lowest KL at 0 refusals, but refuses 12 of 50 look-alikes
    _trial(2, 0, 0.02, 2, 30),   # few look-alike refusals, but 20 points of skill lost
    _trial(3, 0, 0.04, 2, 39),   # 2 points lost
    _trial(4, 0, 0.08, 1, 40),
]


def test_records_without_the_sets_are_unchanged_and_with_them_carry_the_counts():
    plain = TrialMetrics(3, 20, 17, 0.01, 0.0, 0.0, 1, 10)
    assert set(plain.to_dict()) == {"refusals", "n_harmful", "compliance", "kl", "kl_first_token", "seconds",
                                    "false_refusals", "n_harmless", "marker_refusals"}
    assert TrialMetrics.from_dict(plain.to_dict()) == plain and collateral_text(plain) == ""
    measured = CANDIDATES[1].metrics
    record = measured.to_dict()
    assert (record["lookalike_refusals"], record["n_lookalike"], record["skill_correct"], record["n_skill"]) == (12, 50, 40, 50)
    assert TrialMetrics.from_dict(record) == measured
    assert collateral_text(measured) == " look-alike refusals 12/50 skill 40/50"
    assert skill_loss_points(CANDIDATES[2].metrics, BASE) == pytest.approx(20.0)
    assert skill_loss_points(plain, BASE) is None


def test_lookalike_and_skill_caps_choose_the_right_trial():
    assert select_trial("best_kl_under 0", CANDIDATES, 20, 10, base=BASE)[0].number == 1  # no cap: as before
    assert select_trial("best_kl_under 0, lookalike_refusals<=2", CANDIDATES, 20, 10, base=BASE)[0].number == 2
    assert select_trial("best_kl_under 0, lookalike_refusals<=0.04", CANDIDATES, 20, 10, base=BASE)[0].number == 2  # 4% of 50
    chosen, reason = select_trial("best_kl_under 0, lookalike_refusals<=2, skill_loss<=2", CANDIDATES, 20, 10, base=BASE)
    assert chosen.number == 3
    assert reason == ("lowest KL among trials with at most 0 effective refusals and at most 2 look-alike refusals "
                      "and at most 2 points of skill accuracy lost")
    assert select_trial("best_kl_under 0 and skill_loss<=0 false_refusals<=0", CANDIDATES, 20, 10, base=BASE)[0].number == 1
    chosen, reason = select_trial("best_kl_under 0, lookalike_refusals<=0", CANDIDATES, 20, 10, base=BASE)
    assert chosen.number == 0 and reason.endswith("at most 0 look-alike refusals; took the fewest (20)")  # the unedited-like
    chosen, reason = select_trial("best_kl_under 0, lookalike_refusals<=0", CANDIDATES[1:], 20, 10, base=BASE)
    assert chosen.number == 4 and reason == "no trial has at most 0 look-alike refusals; took the fewest (1)"


def test_parse_and_misuse_of_the_caps():
    selection = parse_selection("best_kl_under 0.05, lookalike_refusals<=0.1, skill_loss<=2.5", 20, 10, 50)
    assert (selection.number, selection.max_lookalike_refusals, selection.max_skill_loss) == (1.0, 5.0, 2.5)
    assert selection.max_false_refusals is None
    with pytest.raises(UserError, match="cannot read the skill-loss cap"):
        parse_selection("best_kl_under 1, skill>=0.8", 20, 10)
    with pytest.raises(UserError, match="cannot read the look-alike refusal cap"):
        parse_selection("lookalike_refusals<=1 best_kl_under 1", 20, 10)
    with pytest.raises(UserError, match="twice"):
        parse_selection("best_kl_under 1, skill_loss<=1, skill_loss<=2", 20, 10)
    with pytest.raises(UserError, match="'trial N' names one"):
        parse_selection("trial 2, skill_loss<=1", 20, 10)
    plain = [Candidate(0, TrialMetrics(0, 20, 20, 0.01, 0.0, 0.0), 0, "global", 4.0)]
    with pytest.raises(UserError, match="no lookalike_test"):
        select_trial("best_kl_under 1, lookalike_refusals<=1", plain, 20, 10)
    with pytest.raises(UserError, match="no skill_test"):
        select_trial("best_kl_under 1, skill_loss<=1", CANDIDATES, 20, 10)  # no unedited model's accuracy given
    from pydantic import ValidationError

    from abliterate.settings import AbliterateSettings

    with pytest.raises(ValidationError, match="skill-loss cap"):
        AbliterateSettings(model="m", select="best_kl_under 1, skill_los<=1")
    assert AbliterateSettings(model="m", select="best_kl_under 0.05, lookalike_refusals<=5, skill_loss<=2").select


def test_front_table_shows_the_columns_only_where_measured():
    from rich.console import Console

    def render(candidates):
        console = Console(width=250, record=True)
        console.print(front_table(candidates))
        return console.export_text()

    plain = render([Candidate(0, TrialMetrics(0, 20, 20, 0.01, 0.0, 0.0, 1, 10), 0, "global", 4.0)])
    assert "look-alike" not in plain and "skill" not in plain
    text = render(CANDIDATES[1:3])
    assert "look-alike refusals" in text and "skill" in text and "12/50" in text and "30/50" in text
