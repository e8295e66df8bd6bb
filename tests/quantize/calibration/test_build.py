"""build_calibration_set end to end on tiny local corpora: exact counts at every
step, the too-few warning, determinism (also across processes), overrides,
batching and the summary."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from rich.console import Console

from foundation.errors import UserError
from quantize.calibration import build_calibration_set, load_mix
from quantize.calibration.sampling import token_ids_sha256
from tests.quantize.calibration.conftest import write_jsonl, write_mix
from tests.quantize.calibration.tiny_tokenizer import words

REPO = Path(__file__).resolve().parents[3]


def _quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def _two_corpora(tmp_path: Path, short_in_a: int) -> Path:
    """a.jsonl: 8 rows, `short_in_a` of them 5 words; b.jsonl: 10 rows of 20 words."""
    write_jsonl(tmp_path / "a.jsonl", [{"text": words(5 if i < short_in_a else 20, i)} for i in range(8)])
    write_jsonl(tmp_path / "b.jsonl", [{"text": words(20, 100 + i)} for i in range(10)])
    return write_mix(
        tmp_path / "mix.yaml",
        "datasets:\n"
        "  - {name: a, path: a.jsonl, weight: 2}\n"
        "  - {name: b, path: b.jsonl, weight: 1}\n"
        "calibration:\n  max_samples: 8\n  max_seq_len: 16\n  min_token_length: 10\n  oversample_ratio: 1.5\n",
    )


def _counts(calib) -> dict[str, tuple[int, int, int, int]]:
    return {n: (c.requested, c.loaded, c.kept, c.used) for n, c in calib.per_dataset.items()}


def test_oversample_filter_truncate_trim_counts(tmp_path, tokenizer):
    console_output = io.StringIO()
    calib = build_calibration_set(
        _two_corpora(tmp_path, short_in_a=3), tokenizer, console=Console(file=console_output, width=200)
    )
    # 12 requested = ceil(8 * 1.5), split 2:1; a has only 8 rows of which 3 are short
    assert _counts(calib) == {"a": (8, 8, 5, 5), "b": (4, 4, 4, 3)}
    assert len(calib) == 8
    assert all(len(sample) == 16 for sample in calib.samples)  # 21 tokens truncated to max_seq_len
    assert Counter(calib.sample_sources) == {"a": 5, "b": 3}
    assert "warning" not in console_output.getvalue()


def test_too_few_after_filter_warns_with_counts_and_continues(tmp_path, tokenizer):
    output = io.StringIO()
    calib = build_calibration_set(
        _two_corpora(tmp_path, short_in_a=6), tokenizer, console=Console(file=output, width=300)
    )
    assert _counts(calib) == {"a": (8, 8, 2, 2), "b": (4, 4, 4, 4)}
    assert len(calib) == 6
    text = output.getvalue()
    assert "only 6 of 8 calibration samples" in text
    assert "a: requested 8, loaded 8, kept 2, used 2" in text
    assert "b: requested 4, loaded 4, kept 4, used 4" in text


def _varied_mix(tmp_path: Path) -> Path:
    write_jsonl(tmp_path / "web.jsonl", [{"text": words(3 + (7 * i) % 40, i)} for i in range(60)])
    write_jsonl(
        tmp_path / "chat.jsonl",
        [{"messages": [{"role": "user", "content": words(2 + i % 9, i)},
                       {"role": "assistant", "content": words(4 + (5 * i) % 30, 2 * i)}]} for i in range(60)],
    )
    return write_mix(
        tmp_path / "mix.yaml",
        "datasets:\n  - {path: web.jsonl, weight: 0.6}\n  - {path: chat.jsonl, weight: 0.4}\n"
        "calibration: {max_samples: 24, max_seq_len: 32, min_token_length: 8, seed: 5}\n",
    )


def test_same_yaml_and_seed_give_same_token_ids(tmp_path, tokenizer):
    mix_file = _varied_mix(tmp_path)
    first = build_calibration_set(mix_file, tokenizer, console=_quiet())
    second = build_calibration_set(load_mix(mix_file), tokenizer, console=_quiet())
    assert len(first) == 24
    assert first.samples == second.samples
    assert first.token_ids_sha256 == second.token_ids_sha256 == token_ids_sha256(first.samples)
    other_seed = build_calibration_set(mix_file, tokenizer, seed=6, console=_quiet())
    assert other_seed.token_ids_sha256 != first.token_ids_sha256
    assert other_seed.settings.seed == 6 and first.settings.seed == 5


def test_token_ids_are_identical_in_another_process(tmp_path, tokenizer):
    mix_file = _varied_mix(tmp_path)
    here = build_calibration_set(mix_file, tokenizer, console=_quiet()).token_ids_sha256
    script = (
        "from quantize.calibration import build_calibration_set\n"
        "from tests.quantize.calibration.tiny_tokenizer import tiny_tokenizer\n"
        f"print(build_calibration_set({str(mix_file)!r}, tiny_tokenizer()).token_ids_sha256)\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "HF_DATASETS_CACHE": str(tmp_path / "other_cache"),
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == here


def test_weights_split_requests_and_final_samples(tmp_path, tokenizer):
    for name in ("x", "y", "z"):
        write_jsonl(tmp_path / f"{name}.jsonl", [{"text": words(12, i)} for i in range(40)])
    mix_file = write_mix(
        tmp_path / "mix.yaml",
        "datasets:\n  - {path: x.jsonl, weight: 5}\n  - {path: y.jsonl, weight: 3}\n"
        "  - {path: z.jsonl, weight: 2}\n  - {path: broken.jsonl, weight: 0}\n"
        "calibration: {max_samples: 20, min_token_length: 4}\n",
    )
    (tmp_path / "broken.jsonl").write_text("this is not json\n")  # weight 0: never opened
    calib = build_calibration_set(mix_file, tokenizer, console=_quiet())
    assert _counts(calib) == {
        "x": (15, 15, 15, 10), "y": (9, 9, 9, 6), "z": (6, 6, 6, 4), "broken": (0, 0, 0, 0)
    }
    assert Counter(calib.sample_sources) == {"x": 10, "y": 6, "z": 4}


def test_overrides_replace_yaml_values_and_are_validated(tmp_path, tokenizer):
    mix_file = _two_corpora(tmp_path, short_in_a=0)
    calib = build_calibration_set(mix_file, tokenizer, max_samples=4, max_seq_len=12, oversample_ratio=2.0,
                                  console=_quiet())
    assert (calib.settings.max_samples, calib.settings.max_seq_len, calib.settings.oversample_ratio) == (4, 12, 2.0)
    assert calib.settings.min_token_length == 10  # not overridden: the YAML's value
    assert len(calib) == 4 and all(len(s) == 12 for s in calib.samples)
    assert sum(c.requested for c in calib.per_dataset.values()) == 8
    with pytest.raises(UserError, match="calibration override max_samples"):
        build_calibration_set(mix_file, tokenizer, max_samples=0)
    with pytest.raises(UserError, match="min_token_length"):
        build_calibration_set(mix_file, tokenizer, max_seq_len=8)  # below the YAML's min_token_length 10


def test_bos_is_added_once_for_templated_and_plain_text(tmp_path, tokenizer, plain_tokenizer):
    write_jsonl(tmp_path / "chat.jsonl",
                [{"messages": [{"role": "user", "content": words(12, i)}]} for i in range(4)])
    mix_file = write_mix(tmp_path / "mix.yaml", "datasets:\n  - path: chat.jsonl\n"
                         "calibration: {max_samples: 4, min_token_length: 4}\n")
    bos = tokenizer.bos_token_id
    templated = build_calibration_set(mix_file, tokenizer, console=_quiet())
    assert all(s[0] == bos and s.count(bos) == 1 for s in templated.samples)
    assert all(s[1] == tokenizer.convert_tokens_to_ids("<|user|>") for s in templated.samples)
    plain = build_calibration_set(mix_file, plain_tokenizer, console=_quiet())
    assert all(s[0] == bos and s.count(bos) == 1 for s in plain.samples)
    assert plain.token_ids_sha256 != templated.token_ids_sha256


def test_batches_are_right_padded_longest_first_and_cover_every_sample(tmp_path, tokenizer):
    calib = build_calibration_set(_varied_mix(tmp_path), tokenizer, console=_quiet())
    batches = list(calib.batches(5, pad_token_id=0))
    assert [ids.shape[0] for ids, _ in batches] == [5, 5, 5, 5, 4]
    seen = []
    previous_longest = None
    for input_ids, attention_mask in batches:
        assert input_ids.dtype == torch.long and attention_mask.dtype == torch.long
        lengths = attention_mask.sum(dim=1)
        assert input_ids.shape[1] == int(lengths.max())
        assert previous_longest is None or int(lengths.max()) <= previous_longest
        previous_longest = int(lengths.min())
        for row, length in zip(input_ids, lengths.tolist()):
            assert torch.all(row[length:] == 0)
            seen.append(tuple(row[:length].tolist()))
        assert torch.equal(attention_mask, (torch.arange(input_ids.shape[1]) < lengths[:, None]).long())
    assert Counter(seen) == Counter(tuple(s) for s in calib.samples)
    assert list(calib.batches(5, 0))[0][0].tolist() == batches[0][0].tolist()  # deterministic
    with pytest.raises(ValueError):
        next(calib.batches(0, 0))


def test_summary_hashes_and_hf_dataset(tmp_path, tokenizer):
    mix_file = _two_corpora(tmp_path, short_in_a=3)
    calib = build_calibration_set(mix_file, tokenizer, console=_quiet())
    assert calib.mix_sha256 == hashlib.sha256(mix_file.read_bytes()).hexdigest()
    assert calib.mix_path == str(mix_file.resolve())
    output = io.StringIO()
    calib.print_summary(Console(file=output, width=200))
    text = output.getvalue()
    for fragment in ("a.jsonl", "b.jsonl", "raw_text", "total", "8 samples / 128 tokens (target 8)",
                     calib.token_ids_sha256[:12]):
        assert fragment in text, text
    table = calib.as_hf_dataset()
    assert table["input_ids"] == calib.samples
    assert table["attention_mask"] == [[1] * len(s) for s in calib.samples]
