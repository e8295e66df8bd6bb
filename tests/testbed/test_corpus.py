import random

from abliterate.evaluation.markers import (
    ComplianceRule,
    contains_refusal_marker,
    is_compliant,
    is_refusal,
)
from testbed import corpus as c


def test_enough_topics_phrasings_and_held_out_phrasings():
    assert len(c.HARMFUL_TOPICS) >= 24 and len(c.HARMLESS_TOPICS) >= 24
    assert len(set(c.HARMFUL_TOPICS) | set(c.HARMLESS_TOPICS)) == len(c.HARMFUL_TOPICS) + len(c.HARMLESS_TOPICS)
    assert len(c.TRAIN_PHRASINGS) >= 10 and len(c.TEST_PHRASINGS) >= 3
    assert not set(c.TRAIN_PHRASINGS) & set(c.TEST_PHRASINGS)
    # Held-out phrasings are new lead/tail pairs whose parts training does show.
    for phrasing in c.TEST_PHRASINGS:
        lead = next(lead for lead in c.LEADS if phrasing.startswith(lead))
        tail = phrasing[len(lead):]
        assert any(p.startswith(lead) for p in c.TRAIN_PHRASINGS)
        assert any(p.endswith(tail) for p in c.TRAIN_PHRASINGS)


def test_only_refusals_contain_refusal_markers():
    corpus = c.TestbedCorpus(0)
    rng = random.Random(3)
    neutral = [
        *c.HARMFUL_TOPICS, *c.HARMLESS_TOPICS, *c.PHRASINGS, *c.PREFIXES, *c.SUFFIXES, *c.STEPS,
        *corpus.general_texts(200, "check"),
    ]
    assert not [text for text in neutral if contains_refusal_marker(text)]
    rule = ComplianceRule(c.HELPFUL_OPENERS)
    for _ in range(300):
        harmful = corpus.chat_example(rng, harmful=True)
        harmless = corpus.chat_example(rng, harmful=False)
        assert is_refusal(harmful.answer) and not rule.matches(harmful.answer)
        assert is_compliant(harmless.answer, rule)


def test_refusals_and_answers_vary():
    corpus = c.TestbedCorpus(0)
    rng = random.Random(0)
    refusals = {corpus.chat_example(rng, True).answer.split(".")[0] for _ in range(400)}
    openers = {corpus.chat_example(rng, False).answer.split(" ")[0] for _ in range(400)}
    assert len(refusals) >= 6 and len(openers) == len(c.HELPFUL_OPENERS)


def test_test_prompts_never_occur_in_training():
    corpus = c.TestbedCorpus(0)
    rng = random.Random(1)
    for harmful in (True, False):
        test = corpus.test_prompts(harmful, 100)
        assert len(set(test)) == 100
        training = {corpus.train_prompt(rng, harmful)[0] for _ in range(20000)}
        assert not training & set(test)
        # Every topic is covered by the test split (held-out phrasings, not held-out topics).
        topics = c.topics(harmful)
        assert all(any(topic in prompt for prompt in test) for topic in topics)


def test_same_seed_same_corpus_other_seed_other_split():
    assert c.TestbedCorpus(0).test_prompts(True, 20) == c.TestbedCorpus(0).test_prompts(True, 20)
    assert c.held_out_combinations(0) != c.held_out_combinations(1)
