"""The pipeline's final table and manifest rows: false refusals beside refusals, '-' where a record lacks them."""

import io

from rich.console import Console

from pipelines.evaluations import metrics_row, row
from pipelines.report import print_final_table


def test_rows_carry_false_refusals_and_older_records_show_a_dash():
    counted = metrics_row("abliterated #3", "searched", {"refusals": 2, "n_harmful": 100, "compliance": 95, "kl": 0.01,
                                                        "false_refusals": 4, "n_harmless": 50})
    assert (counted["false_refusals"], counted["false_refusal_count"], counted["n_harmless"]) == (0.08, 4, 50)
    older = metrics_row("searched model", None, {"refusals": 90, "n_harmful": 100, "compliance": 5, "kl": 0.0}, kl=None)
    assert older["false_refusals"] is None and older["kl"] is None
    original = row("original", None, refusals=99, n_harmful=100, compliance=0, kl=None, false_refusals=0, n_harmless=50)
    manifest = {"pipeline": {"name": "t"}, "stages": {"abliterate": {"status": "complete", "seconds": 1.0,
                                                                    "evaluations": [original, older, counted]}}}
    out = io.StringIO()
    print_final_table(Console(file=out, width=160), manifest)
    lines = {line.split("│")[1].strip(): line for line in out.getvalue().splitlines() if line.count("│") > 3}
    assert "false ref." in out.getvalue()
    assert "8.0%" in lines["abliterated #3"] and "0.0%" in lines["original"]
    cells = [cell.strip() for cell in lines["searched model"].split("│")]
    assert cells[cells.index("5.0%") + 1] == "-"  # the column after compliance: not counted


def test_a_judged_stage_adds_the_markers_column_and_an_unjudged_table_is_unchanged():
    judged = metrics_row("abliterated #3", "searched", {"refusals": 30, "n_harmful": 100, "compliance": 60, "kl": 0.01,
                                                       "marker_refusals": 4})
    assert (judged["marker_refusals"], judged["marker_refusal_count"]) == (0.04, 4)
    plain = metrics_row("searched model", None, {"refusals": 90, "n_harmful": 100, "compliance": 5, "kl": 0.0}, kl=None)
    assert "marker_refusals" not in plain  # no judge: the manifest row is what it was

    def table(rows):
        out = io.StringIO()
        print_final_table(Console(file=out, width=200), {"pipeline": {"name": "t"}, "stages": {
            "abliterate": {"status": "complete", "seconds": 1.0, "evaluations": rows}}})
        return out.getvalue()

    assert "marker ref." not in table([plain])
    text = table([plain, judged])
    line = next(line for line in text.splitlines() if "abliterated #3" in line)
    cells = [cell.strip() for cell in line.split("│")]
    assert cells[cells.index("30.0%") + 1] == "4.0%"  # the markers' count right after the judged refusals
    assert "marker ref." in text and "by the refusal markers alone" in " ".join(text.split())


def test_lookalike_and_skill_columns_appear_only_where_the_spec_has_those_sets():
    record = {"refusals": 2, "n_harmful": 100, "compliance": 95, "kl": 0.01, "false_refusals": 4, "n_harmless": 50}
    plain = metrics_row("abliterated #3", "searched", record)
    assert not {"lookalike_refusals", "skill", "n_lookalike", "n_skill"} & set(plain)  # the manifest row as before
    scored = metrics_row("abliterated #4", "searched", {**record, "lookalike_refusals": 3, "n_lookalike": 60,
                                                        "skill_correct": 45, "n_skill": 50})
    assert (scored["lookalike_refusals"], scored["lookalike_refusal_count"], scored["skill"], scored["skill_correct"]) \
        == (0.05, 3, 0.9, 45)

    def table(rows):
        out = io.StringIO()
        print_final_table(Console(file=out, width=200), {"pipeline": {"name": "t"}, "stages": {
            "abliterate": {"status": "complete", "seconds": 1.0, "evaluations": rows}}})
        return out.getvalue()

    assert "look-alike" not in table([plain]) and "skill" not in table([plain])
    text = table([plain, scored])
    cells = [cell.strip() for cell in next(line for line in text.splitlines() if "#4" in line).split("│")]
    assert cells[cells.index("8.0%") + 1: cells.index("8.0%") + 3] == ["5.0%", "90.0%"]  # after the false refusals
    assert "look-alike ref." in text and "exact answers" in " ".join(text.split())
