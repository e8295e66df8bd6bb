from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.quantize.calibration.tiny_tokenizer import tiny_tokenizer


@pytest.fixture(autouse=True)
def isolated_datasets_cache(tmp_path_factory, monkeypatch):
    """Arrow caches of the local test files go to a temp dir, not ~/.cache."""
    import datasets

    cache = tmp_path_factory.getbasetemp() / "hf_datasets_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def plain_tokenizer():
    return tiny_tokenizer(with_chat_template=False)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_mix(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
