"""Train the testbed: a small Llama that refuses harmful requests and helps otherwise.

Deterministic from a seed: the data order comes from ``random.Random(seed)``,
the weights from ``torch.manual_seed(seed)``, deterministic kernels are
enforced and the thread count is fixed, so the same seed on the same kind of
CPU gives the same bytes. The loss covers only what the model must produce:
the assistant's answer (with its end token) in chats, every token in plain
text (which keeps a language model under the chat behaviour, so perplexity
means something).
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    get_cosine_schedule_with_warmup,
)

from testbed.corpus import TestbedCorpus
from testbed.hard_corpus import HardCorpus
from testbed.tokenizer import END, train_tokenizer

IGNORE = -100
# The synthetic worlds a testbed is trained on: the fast default (testbed/model) and the hard one (testbed/hard).
WORLDS = {"default": TestbedCorpus, "hard": HardCorpus}

@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 6
    num_heads: int = 4
    num_kv_heads: int = 2
    steps: int = 1200
    batch_size: int = 32
    learning_rate: float = 2e-3
    warmup_steps: int = 60
    weight_decay: float = 0.01
    general_text_fraction: float = 0.15  # the rest is chat, half harmful and half harmless
    tokenizer_texts: int = 4000
    threads: int = 1  # one thread: a fixed reduction order, and no thrashing on a shared CPU

    @classmethod
    def small(cls, seed: int = 0) -> TrainConfig:
        """Reduced size for tests: learns the task in well under a minute."""
        return cls(
            seed=seed, vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2,
            num_kv_heads=1, steps=300, batch_size=16, learning_rate=5e-3, warmup_steps=20, tokenizer_texts=1500,
        )

    @classmethod
    def hard(cls, seed: int = 0) -> TrainConfig:
        """The hard testbed (issue 17): deeper than the default, CPU-trainable on one (shared) thread."""
        return cls(
            seed=seed, vocab_size=1024, hidden_size=192, intermediate_size=384, num_layers=8, num_heads=4,
            num_kv_heads=2, steps=600, batch_size=32, learning_rate=3e-3, warmup_steps=60, tokenizer_texts=4000,
            general_text_fraction=0.1, threads=1,
        )

    def as_dict(self) -> dict:
        return asdict(self)

@dataclass(frozen=True)
class Sequence:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken

@contextlib.contextmanager
def deterministic_torch(threads: int) -> Iterator[None]:
    """Deterministic kernels and a fixed thread count, restored afterwards (tests share the process)."""
    previous_threads = torch.get_num_threads()
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous_threads)
        torch.use_deterministic_algorithms(previous_deterministic)

def tokenizer_corpus(corpus: TestbedCorpus, count: int) -> list[str]:
    rng = random.Random(f"tokenizer-{corpus.seed}")
    texts = []
    for index in range(count):
        example = corpus.tokenizer_example(rng, index)
        texts += [example.prompt, example.answer]
    return texts + corpus.general_texts(count // 4, "tokenizer")

def chat_sequence(tokenizer: PreTrainedTokenizerFast, prompt: str, answer: str) -> Sequence:
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    # Prompt and answer are tokenized apart, exactly as generation sees them.
    prompt_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer + END, add_special_tokens=False)["input_ids"]
    return Sequence(prompt_ids + answer_ids, [IGNORE] * len(prompt_ids) + answer_ids)

def text_sequence(tokenizer: PreTrainedTokenizerFast, text: str) -> Sequence:
    ids = tokenizer(text)["input_ids"]  # BOS first
    return Sequence(ids, [IGNORE] + ids[1:])

def training_sequences(corpus: TestbedCorpus, tokenizer, config: TrainConfig) -> list[Sequence]:
    rng = random.Random(f"training-data-{config.seed}")
    sequences = []
    for _ in range(config.steps * config.batch_size):
        if rng.random() < config.general_text_fraction:
            sequences.append(text_sequence(tokenizer, corpus.general_text(rng)))
        else:
            example = corpus.training_chat(rng)
            sequences.append(chat_sequence(tokenizer, example.prompt, example.answer))
    return sequences

def collate(batch: list[Sequence], pad_id: int) -> dict[str, torch.Tensor]:
    length = max(len(item.input_ids) for item in batch)
    input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, item in enumerate(batch):
        size = len(item.input_ids)
        input_ids[row, :size] = torch.tensor(item.input_ids)
        labels[row, :size] = torch.tensor(item.labels)
        attention_mask[row, :size] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}

def model_config(config: TrainConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
    )

def run_steps(model, optimizer, schedule, steps: int, batch_of: Callable[[int], dict],
              on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """The loop both testbed models (the chat model and its judge) train with: one batch per step, gradients
    clipped to norm 1, the schedule stepped after the optimizer; returns each step's loss, the model in eval mode."""
    losses = []
    for step in range(steps):
        loss = model(**batch_of(step)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    return losses


def train(
    config: TrainConfig, on_step: Callable[[int, float], None] | None = None, world: str = "default"
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast, dict]:
    """Returns the trained fp32 model, its tokenizer and training statistics; ``world`` names a ``WORLDS`` entry."""
    with deterministic_torch(config.threads):
        return _train(config, on_step, world)


def _train(
    config: TrainConfig, on_step: Callable[[int, float], None] | None, world: str
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast, dict]:
    torch.manual_seed(config.seed)
    corpus = WORLDS[world](config.seed)
    tokenizer = train_tokenizer(tokenizer_corpus(corpus, config.tokenizer_texts), config.vocab_size)
    sequences = training_sequences(corpus, tokenizer, config)
    torch.manual_seed(config.seed)
    model = LlamaForCausalLM(model_config(config, tokenizer))
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate,
        betas=(0.9, 0.95),
        foreach=False,
    )
    schedule = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
    losses = run_steps(
        model, optimizer, schedule, config.steps,
        lambda step: collate(sequences[step * config.batch_size : (step + 1) * config.batch_size], tokenizer.pad_token_id),
        on_step,
    )  # fmt: skip
    tail = losses[-max(1, len(losses) // 20) :]
    stats = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "training_sequences": len(sequences),
        "final_loss": round(sum(tail) / len(tail), 4),
        "first_loss": round(losses[0], 4),
    }
    if not math.isfinite(stats["final_loss"]):
        raise RuntimeError("training diverged (non-finite loss)")
    return model, tokenizer, stats
