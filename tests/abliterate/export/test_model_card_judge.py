"""The export's model card shows the markers' count beside judged refusals, and nothing extra without a judge."""

from abliterate.export.model_card import metrics_rows


def test_judged_refusals_carry_the_marker_count_in_the_card():
    judged = {"refusals": 30, "marker_refusals": 4, "n_harmful": 100, "compliance": 60, "kl": 0.01}
    plain = {"refusals": 5, "n_harmful": 100, "compliance": 95, "kl": 0.01}
    lines = metrics_rows([("judged", judged), ("plain", plain)])
    assert "| judged | 30/100 (judge; markers 4/100) | 60/100 |" in lines[2]
    assert "| plain | 5/100 | 95/100 |" in lines[3] and "markers" not in lines[3]
