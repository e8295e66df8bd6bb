"""Shared fixtures: one tiny Llama on disk, one calibration set, and the
checkpoints quantized from them once per session (ModelOpt import ~10 s,
each tiny quantize + export about a second)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from tests.tiny_models import llama_config

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "datasets_yaml" / "corpora" / "general_text.jsonl"
SKIPPED_MODULE = "model.layers.1.mlp.down_proj"


def quiet_console() -> Console:
    return Console(file=io.StringIO(), width=200)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """LlamaForCausalLM (hidden 64, 2 layers) + byte-level BPE tokenizer with a chat template."""
    from transformers import GenerationConfig, LlamaForCausalLM

    from testbed.tokenizer import train_tokenizer

    texts = [json.loads(line)["text"] for line in CORPUS.read_text().splitlines()[:400]]
    tokenizer = train_tokenizer(texts, vocab_size=320)
    config = llama_config(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, max_new_tokens=16)
    directory = tmp_path_factory.mktemp("source") / "tiny-llama"
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def mix_yaml(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mix") / "test_mix.yaml"
    path.write_text(
        "datasets:\n"
        f"  - name: general\n    path: {CORPUS}\n    text_column: text\n    formatter: raw_text\n"
        "calibration:\n  max_samples: 12\n  max_seq_len: 48\n  seed: 7\n  min_token_length: 8\n  oversample_ratio: 1.5\n"
    )
    return path


@pytest.fixture(scope="session")
def work_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("quantized")


def quantize_args(model_dir: Path, mix: Path, output: Path, *extra: str) -> list[str]:
    return ["--input_model", str(model_dir), "--output_model", str(output), "--dataset_yaml", str(mix),
            "--batch_size", "4", *extra]


def run_cli(argv: list[str], offload: bool = False) -> str:
    """Run the CLI in-process with a captured console; returns what it printed."""
    from quantize import cli

    console = quiet_console()
    original = cli.Console
    cli.Console = lambda *a, **k: console  # noqa: E731 - capture the CLI's console
    try:
        assert cli.main(argv, offload=offload) == 0
    finally:
        cli.Console = original
    return console.file.getvalue()


@pytest.fixture(scope="session")
def quantized(tiny_model_dir, mix_yaml, work_dir) -> dict[str, Path]:
    """format -> exported checkpoint. nvfp4 also skips one module; fp8 also quantizes the KV cache."""
    outputs = {}
    extras = {
        "nvfp4": ["--skip_layers", "*layers.1.mlp.down_proj"],
        "w4a16_nvfp4": [],
        "fp8": ["--kv_cache", "fp8"],
        "w4a8": [],
    }
    for format_name, extra in extras.items():
        output = work_dir / format_name
        run_cli(quantize_args(tiny_model_dir, mix_yaml, output, "--format", format_name, *extra))
        outputs[format_name] = output
    return outputs


def load_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(directory).glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors
