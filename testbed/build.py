"""Build the testbed checkpoint: ``python -m testbed.build --out testbed/model [--world hard] [--small] [--overwrite]``.

``--world`` picks the synthetic world (``testbed.train.WORLDS``): ``default`` is the fast testbed
(``testbed/model``), ``hard`` the hard one of issue 17 (``testbed/hard``: harm categories, look-alikes, a
skill), each with its own size, prompt spec, measurements, gate and model card.

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
from testbed.hard_card import hard_model_card
from testbed.hard_corpus import HARMFUL_TOPICS as HARD_HARMFUL_TOPICS
from testbed.hard_corpus import LOOKALIKE_TOPICS
from testbed.hard_measure import harmful_categories, measure_hard
from testbed.measure import measure
from testbed.tokenizer import CHAT_TEMPLATE
from testbed.train import WORLDS, TrainConfig, deterministic_torch, train

HARD_SPEC = Path("datasets_yaml/testbed_hard_prompts.yaml")

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


def train_with_progress(config: TrainConfig, world: str = "default"):
    columns = (
        TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.3f}"),
        TimeElapsedColumn(), TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("train", total=config.steps, loss=float("nan"))
        return train(config, lambda step, loss: progress.update(task, completed=step + 1, loss=loss), world)


def build(
    out: Path,
    *,
    small: bool,
    overwrite: bool,
    seed: int = 0,
    spec_path: Path | None = None,
    config: TrainConfig | None = None,
    world: str = "default",
) -> dict:
    """``config`` overrides the size chosen by ``small`` and ``world`` (tests); ``small`` still means ungated.
    ``spec_path`` defaults to the world's prompt spec."""
    if world not in WORLDS:
        raise UserError("--world", f"unknown world {world!r}", f"use one of: {', '.join(sorted(WORLDS))}")
    check_writable_output(out, overwrite)
    spec_path = spec_path or (HARD_SPEC if world == "hard" else DEFAULT_SPEC)
    prompts = load_prompt_spec(spec_path)
    if world == "hard":  # measure_hard labels each harmful test prompt with its category
        prompts = (prompts, harmful_categories(spec_path))
    full = TrainConfig.hard(seed) if world == "hard" else TrainConfig(seed=seed)
    config = config or (TrainConfig.small(seed) if small else full)
    with deterministic_torch(config.threads):  # measuring too: same thread count, same numbers
        return _build(out, small=small, overwrite=overwrite, prompts=prompts, config=config, world=world)


def _build(out: Path, *, small: bool, overwrite: bool, prompts, config: TrainConfig, world: str = "default",
           trained=None) -> dict:
    """``trained``: (model, tokenizer, stats) already trained from ``config`` and ``world`` (training skipped)."""
    start = time.perf_counter()
    model, tokenizer, stats = trained or train_with_progress(config, world)
    console.print(f"trained in {time.perf_counter() - start:.0f} s: {stats}")
    with atomic_output_dir(out, overwrite) as temp:
        save_checkpoint(model, tokenizer, temp)
        saved_model, saved_tokenizer = load_checkpoint(temp)
        if world == "hard":
            metrics = measure_hard(saved_model, saved_tokenizer, *prompts, log=console.print)
        else:
            metrics = measure(saved_model, saved_tokenizer, prompts, log=console.print)
        metrics["training"] = {**stats, "config": config.as_dict()}
        metrics["architecture"] = {
            key: getattr(saved_model.config, key)
            for key in (
                "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads",
            )
        }
        if world == "hard":
            metrics["world"] = "hard"
            metrics["corpus"] = {"harmful_topics": len(HARD_HARMFUL_TOPICS), "harmless_topics": len(HARMLESS_TOPICS),
                                 "lookalike_topics": len(LOOKALIKE_TOPICS)}
        else:
            metrics["corpus"] = {"harmful_topics": len(HARMFUL_TOPICS), "harmless_topics": len(HARMLESS_TOPICS)}
        (temp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
        (temp / "README.md").write_text((hard_model_card if world == "hard" else model_card)(metrics), encoding="utf-8")
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
    parser.add_argument("--prompts", type=Path, default=None,
                        help=f"prompt-set spec used for measuring (default: {DEFAULT_SPEC}, or {HARD_SPEC} for --world hard)")
    parser.add_argument("--world", choices=sorted(WORLDS), default="default",
                        help="default: the fast testbed (testbed/model); hard: issue 17's (testbed/hard)")
    args = parser.parse_args(argv)
    try:
        build(args.out, small=args.small, overwrite=args.overwrite, seed=args.seed, spec_path=args.prompts,
              world=args.world)
    except UserError as error:
        console.print(f"[red]error:[/red] {error}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
