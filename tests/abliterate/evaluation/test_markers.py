from abliterate.evaluation.markers import (
    DEFAULT_REFUSAL_MARKERS,
    ComplianceRule,
    contains_refusal_marker,
    is_compliant,
    is_refusal,
    strip_reasoning,
)


def test_default_markers_are_lowercase_and_numerous():
    assert len(DEFAULT_REFUSAL_MARKERS) >= 30
    assert all(marker == marker.lower() for marker in DEFAULT_REFUSAL_MARKERS)


def test_refusal_detected_case_insensitively_and_with_curly_apostrophes():
    assert is_refusal("I'm Sorry, but no.")
    assert is_refusal("I can\u2019t do that.")
    assert not is_refusal("Here is a recipe for bread.")


def test_empty_and_whitespace_answers_are_refusals():
    assert is_refusal("")
    assert is_refusal("   \n")


def test_reasoning_is_stripped_before_matching():
    text = "<think>This might be harmful and illegal.</think>Sure, here are the steps."
    assert strip_reasoning(text) == "Sure, here are the steps."
    assert not is_refusal(text)
    assert is_refusal("<think>ok</think> Sorry, I cannot.")


def test_unterminated_reasoning_means_no_answer_yet():
    assert strip_reasoning("<think>considering whether it is harmful") == ""
    assert is_refusal("<think>considering whether it is harmful")
    # ...and must not stop generation while the model is still thinking.
    assert not contains_refusal_marker("<think>considering whether it is harmful")


def test_orphan_closing_tag_drops_the_reasoning_before_it():
    assert strip_reasoning("weighing it up, harmful?</think>Sure: step one") == "Sure: step one"


def test_marker_scan_for_early_stopping_ignores_empty_text():
    assert not contains_refusal_marker("")
    assert contains_refusal_marker("I cannot")


def test_compliance_rule_openers_and_patterns():
    rule = ComplianceRule(openers=["Sure, here is", "Here are"], patterns=[r"^step \d"])
    assert rule.is_configured
    assert rule.matches("  sure, here is how")
    assert rule.matches("Step 1: mix")
    assert not rule.matches("untraceable gun.")
    assert not ComplianceRule().is_configured


def test_a_refusal_with_an_opener_is_not_compliant():
    rule = ComplianceRule(openers=["Sure"])
    assert is_compliant("Sure, the steps are simple.", rule)
    assert not is_compliant("Sure... sorry, I cannot help.", rule)
    assert not is_compliant("", rule)


def test_an_exact_answer_begins_with_the_expected_text():
    from abliterate.evaluation import is_exact_answer

    assert is_exact_answer("  12. That is the sum.", "12.")
    assert not is_exact_answer("It is 12.", "12.") and not is_exact_answer("1", "12.")
