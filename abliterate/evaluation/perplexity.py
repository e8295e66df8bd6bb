"""Perplexity on held-out plain text: a damage measure independent of chat.

Refusal counts and KL look at answers to prompts; perplexity on text the
model never saw shows whether an edit (or quantization) hurt the language
model underneath. Computed as exp(total NLL / total predicted tokens) so
long and short texts weigh by their token counts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from abliterate.evaluation.generation import model_device, pad_token_id


def tokenize_texts(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids per text (BOS as the tokenizer adds it), cut to ``max_length``."""
    encoded = [tokenizer(text)["input_ids"][:max_length] for text in texts]
    return [ids for ids in encoded if len(ids) >= 2]


@torch.inference_mode()
def perplexity(model, tokenizer, texts: Sequence[str], *, batch_size: int = 8, max_length: int = 512) -> float:
    sequences = tokenize_texts(tokenizer, texts, max_length)
    if not sequences:
        raise ValueError("perplexity needs at least one text of two or more tokens")
    pad_id = pad_token_id(tokenizer)
    device = model_device(model)
    total_nll = 0.0
    total_tokens = 0
    order = sorted(range(len(sequences)), key=lambda index: len(sequences[index]))
    for start in range(0, len(order), batch_size):
        batch = [sequences[index] for index in order[start : start + batch_size]]
        length = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(batch):  # right padding: positions start at 0
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False).logits
        log_probs = logits[:, :-1].float().log_softmax(dim=-1).cpu()
        targets = input_ids[:, 1:]
        token_log_probs = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        valid = attention_mask[:, 1:].bool()
        total_nll -= float(token_log_probs[valid].sum())
        total_tokens += int(valid.sum())
    return math.exp(total_nll / total_tokens)
