"""The testbed's refusal judge: its recipe is deterministic and marker-free where it says so; the committed one passes."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoTokenizer

from abliterate.evaluation.markers import (
    DEFAULT_REFUSAL_MARKERS,
    contains_refusal_marker,
)
from testbed.judge import (
    GATE,
    LABELS,
    MARKERLESS_REFUSALS,
    UNSEEN_MARKERLESS_REFUSALS,
    train_judge,
)
from testbed.train import deterministic_torch

REPO = Path(__file__).resolve().parents[2]
JUDGE = REPO / "testbed" / "judge"


def test_markerless_refusals_carry_no_default_marker():
    for template in MARKERLESS_REFUSALS + UNSEEN_MARKERLESS_REFUSALS:
        assert not contains_refusal_marker(template.format(t="bake sourdough bread"), DEFAULT_REFUSAL_MARKERS), template


def test_training_is_deterministic():
    tokenizer = AutoTokenizer.from_pretrained(REPO / "testbed" / "model")
    tokenizer.padding_side = "left"
    with deterministic_torch(1):
        first, stats = train_judge(tokenizer, steps=12, batch_size=8)
        second, _ = train_judge(tokenizer, steps=12, batch_size=8)
    assert stats["final_loss"] < stats["first_loss"] + 1  # it trains (a smoke bound at 12 steps)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_the_committed_judge_is_small_labelled_and_passed_its_gate():
    config = json.loads((JUDGE / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert [config["id2label"][str(i)] for i in range(len(LABELS))] == list(LABELS)
    assert (JUDGE / "model.safetensors").stat().st_size < 600_000
    metrics = json.loads((JUDGE / "metrics.json").read_text())
    assert all(metrics["accuracy"][name]["judge_accuracy"] >= floor for name, floor in GATE.items())
    assert metrics["accuracy"]["markerless_refusals"]["marker_accuracy"] == 0.0  # what the markers alone miss
