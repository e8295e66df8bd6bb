"""The mixes shipped in datasets_yaml/ are valid, and the offline one builds a
full calibration set with a real byte-level BPE tokenizer and chat template."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from foundation.dataset_sources import resolve_source
from quantize.calibration import build_calibration_set, load_mix

MIXES = Path(__file__).resolve().parents[3] / "datasets_yaml"
CORPORA = [MIXES / "corpora" / "general_text.jsonl", MIXES / "corpora" / "chat_conversations.jsonl"]
TESTBED = Path(__file__).resolve().parents[3] / "testbed"


def test_default_mix_names_public_hub_datasets():
    mix = load_mix(MIXES / "default_mix.yaml")
    assert [entry.name for entry in mix.datasets] == ["ultrachat", "writing_prompts", "code", "web"]
    assert all(resolve_source(entry.path, MIXES).kind == "hub" for entry in mix.datasets)
    assert sum(entry.weight for entry in mix.datasets) == pytest.approx(1.0)
    assert mix.calibration.max_samples == 512 and mix.calibration.max_seq_len == 2048


@pytest.fixture(scope="module")
def real_tokenizer():
    """The testbed model's tokenizer when it has been built, else the same kind
    (byte-level BPE + chat template) trained here on the shipped corpus."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    saved = sorted(TESTBED.rglob("tokenizer.json"))
    if saved:
        return AutoTokenizer.from_pretrained(saved[0].parent)
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    texts = [json.loads(line)["text"] for line in CORPORA[0].read_text().splitlines()]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<pad>", "<bos>", "<end>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", backend.token_to_id("<bos>"))]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<end>",
                                        pad_token="<pad>")
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<end>\n{% endfor %}"
    )
    return tokenizer


@pytest.mark.skipif(not all(p.is_file() for p in CORPORA), reason="offline corpora not generated yet")
def test_offline_mix_builds_a_full_calibration_set(real_tokenizer):
    mix = load_mix(MIXES / "offline_mix.yaml")
    output = io.StringIO()
    calib = build_calibration_set(mix, real_tokenizer, console=Console(file=output, width=200))
    settings = mix.calibration
    assert len(calib) == settings.max_samples
    assert "warning" not in output.getvalue()
    counts = calib.per_dataset
    assert sum(c.requested for c in counts.values()) == 384  # ceil(256 * 1.5)
    assert {name: c.formatter for name, c in counts.items()} == {"general_text": "raw_text", "chat": "chat_completion"}
    assert all(c.loaded == c.requested and c.kept <= c.loaded for c in counts.values())
    assert all(settings.min_token_length <= len(s) <= settings.max_seq_len for s in calib.samples)
    bos = real_tokenizer.bos_token_id
    assert all(sample[0] == bos and sample.count(bos) == 1 for sample in calib.samples)
    again = build_calibration_set(MIXES / "offline_mix.yaml", real_tokenizer, console=Console(file=io.StringIO()))
    assert again.token_ids_sha256 == calib.token_ids_sha256
