"""Build the testbed checkpoint: ``python -m testbed.build --out testbed/model [--small] [--overwrite]``.

Trains (``testbed.train``), saves safetensors + tokenizer + generation config,
reloads what was saved and measures it (``testbed.measure``), writes
``metrics.json`` and the model card, all inside a temporary directory that
becomes ``--out`` only when everything succeeded. A full-size build whose
measurements fail the shipping gate is not written (``--small`` builds, for
tests, are never gated).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from abliterate.evaluation.prompt_sets import DEFAULT_SPEC, load_prompt_spec
from foundation.atomic_output import atomic_output_dir, check_writable_output
from foundation.errors import UserError
from testbed.card import model_card
from testbed.corpus import HARMFUL_TOPICS, HARMLESS_TOPICS
from testbed.measure import measure
from testbed.tokenizer import CHAT_TEMPLATE
from testbed.train import TrainConfig, deterministic_torch, train

console = Console()


def save_checkpoint(model, tokenizer, directory: Path) -> None:
    model.to(torch.bfloat16).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    # Tools that read the template only from tokenizer_config.json (the reference abliterator) need it there.
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["chat_template"] = CHAT_TEMPLATE
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=100,
    ).save_pretrained(directory)


def load_checkpoint(directory: Path):
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16, use_safetensors=True).eval()
    return model, tokenizer


def train_with_progress(config: TrainConfig):
    columns = (
        TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.3f}"),
        TimeElapsedColumn(), TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("train", total=config.steps, loss=float("nan"))
        return train(config, lambda step, loss: progress.update(task, completed=step + 1, loss=loss))


def build(
    out: Path,
    *,
    small: bool,
    overwrite: bool,
    seed: int = 0,
    spec_path: Path = DEFAULT_SPEC,
    config: TrainConfig | None = None,
) -> dict:
    """``config`` overrides the size chosen by ``small`` (tests); ``small`` still means ungated."""
    check_writable_output(out, overwrite)
    prompts = load_prompt_spec(spec_path)
    config = config or (TrainConfig.small(seed) if small else TrainConfig(seed=seed))
    with deterministic_torch(config.threads):  # measuring too: same thread count, same numbers
        return _build(out, small=small, overwrite=overwrite, prompts=prompts, config=config)


def _build(out: Path, *, small: bool, overwrite: bool, prompts, config: TrainConfig) -> dict:
    start = time.perf_counter()
    model, tokenizer, stats = train_with_progress(config)
    console.print(f"trained in {time.perf_counter() - start:.0f} s: {stats}")
    with atomic_output_dir(out, overwrite) as temp:
        save_checkpoint(model, tokenizer, temp)
        saved_model, saved_tokenizer = load_checkpoint(temp)
        metrics = measure(saved_model, saved_tokenizer, prompts, log=console.print)
        metrics["training"] = {**stats, "config": config.as_dict()}
        metrics["architecture"] = {
            key: getattr(saved_model.config, key)
            for key in (
                "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads",
            )
        }
        metrics["corpus"] = {"harmful_topics": len(HARMFUL_TOPICS), "harmless_topics": len(HARMLESS_TOPICS)}
        (temp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
        (temp / "README.md").write_text(model_card(metrics), encoding="utf-8")
        if not small and not metrics["gate"]["passed"]:
            rejected = out.parent / f".rejected-{out.name}"
            shutil.rmtree(rejected, ignore_errors=True)
            shutil.copytree(temp, rejected)
            raise UserError(
                "testbed recipe",
                f"the built model fails the shipping gate: {json.dumps(metrics['gate'])}",
                f"change the recipe (testbed/train.py, testbed/corpus.py) and rebuild; {out} was not written "
                f"(the rejected build is in {rejected} for inspection)",
            )
    console.print(f"built {out} in {time.perf_counter() - start:.0f} s; gate passed: {metrics['gate']['passed']}")
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory, e.g. testbed/model")
    parser.add_argument("--small", action="store_true", help="reduced size (tests): ungated, well under a minute")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompts", type=Path, default=DEFAULT_SPEC, help="prompt-set spec used for measuring")
    args = parser.parse_args(argv)
    try:
        build(args.out, small=args.small, overwrite=args.overwrite, seed=args.seed, spec_path=args.prompts)
    except UserError as error:
        console.print(f"[red]error:[/red] {error}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
