"""KL divergence from the unedited model over several generated positions.

First-token KL misses edits that leave the first token alone and change the
rest of the answer (on the testbed prototype every trial of the reference had
first-token KL < 1e-5). So the unedited model's greedy continuation of each
harmless prompt is fixed once, and both models are teacher-forced on
prompt + that continuation: the KL at each of the first N positions compares
the two next-token distributions given the same history. Positions after the
unedited model's EOS are not scored.

Both sides are computed by the same function with the same batching, so an
unchanged model scores exactly zero.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from abliterate.evaluation.generation import PaddedBatch, batches_by_length, left_pad, model_device

# (row indices, prompts, prompts + continuation tokens) -> logits of at least the last n_positions positions
Forward = Callable[[Sequence[int], PaddedBatch, PaddedBatch], torch.Tensor]


@dataclass(frozen=True)
class ContinuationLogProbs:
    """Next-token log-probabilities at the first N answer positions.

    ``log_probs`` is [prompts, N, vocab] (fp32, on the CPU); ``mask`` is
    [prompts, N], True where the position exists in the continuation.
    """

    log_probs: torch.Tensor
    mask: torch.Tensor


@torch.inference_mode()
def continuation_log_probs(
    model,
    prompt_token_ids: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    *,
    n_positions: int,
    pad_id: int,
    batch_size: int,
    forward: Forward | None = None,
) -> ContinuationLogProbs:
    """Teacher-force prompt + continuation and keep the answer positions' log-probs.

    ``forward`` runs the model on one batch (its tensors on the CPU); default ``plain_forward``. The evaluator's
    keeps the prompts in a static decoder's cache, so that answers can decode on from them."""
    if len(prompt_token_ids) != len(continuations):
        raise ValueError("one continuation per prompt is needed")
    if forward is None:
        def forward(indices, prompts, inputs):
            return plain_forward(model, inputs, n_positions)
    per_prompt: list[torch.Tensor | None] = [None] * len(prompt_token_ids)
    mask = torch.zeros((len(prompt_token_ids), n_positions), dtype=torch.bool)
    for index, continuation in enumerate(continuations):
        mask[index, : min(len(continuation), n_positions)] = True
    for indices in batches_by_length([len(ids) for ids in prompt_token_ids], batch_size):
        prompts = left_pad([prompt_token_ids[index] for index in indices], pad_id)
        # The continuation is appended after the left-padded prompt. The last
        # continuation token never needs to be fed (nothing is scored after it),
        # so N positions need N - 1 continuation tokens; missing ones are padding.
        tail = torch.full((len(indices), n_positions - 1), pad_id, dtype=torch.long)
        for row, index in enumerate(indices):
            tokens = list(continuations[index][: n_positions - 1])
            if tokens:
                tail[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        input_ids = torch.cat([prompts.input_ids, tail], dim=1)
        attention_mask = torch.cat([prompts.attention_mask, torch.ones_like(tail)], dim=1)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = forward(indices, prompts, PaddedBatch(input_ids, attention_mask, position_ids))
        answer_logits = logits[:, logits.shape[1] - n_positions :, :]
        log_probs = answer_logits.float().log_softmax(dim=-1).cpu()
        for row, index in enumerate(indices):
            per_prompt[index] = log_probs[row]
    return ContinuationLogProbs(torch.stack([item for item in per_prompt if item is not None]), mask)


def plain_forward(model, inputs: PaddedBatch, n_positions: int) -> torch.Tensor:
    """One forward without a cache; only the scored positions, the last ``n_positions``, get the vocabulary
    projection where the model allows it (at a 128k vocabulary, all positions' logits of a batch of 100 are over
    a GB)."""
    device = model_device(model)
    keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
    return model(
        input_ids=inputs.input_ids.to(device),
        attention_mask=inputs.attention_mask.to(device),
        position_ids=inputs.position_ids.to(device),
        use_cache=False,
        **({"logits_to_keep": n_positions} if keeps_logits else {}),
    ).logits


def mean_kl_divergence(reference: ContinuationLogProbs, candidate: ContinuationLogProbs) -> float:
    """KL(reference || candidate), averaged over every scored position."""
    if reference.log_probs.shape != candidate.log_probs.shape:
        raise ValueError(f"shape mismatch: {tuple(reference.log_probs.shape)} vs {tuple(candidate.log_probs.shape)}")
    p_log = reference.log_probs
    per_position = (p_log.exp() * (p_log - candidate.log_probs)).sum(dim=-1)  # [prompts, N]
    mask = reference.mask
    if not bool(mask.any()):
        return 0.0
    # Guard against -inf - -inf = nan where the reference gives zero probability.
    per_position = torch.nan_to_num(per_position, nan=0.0)
    return float(per_position[mask].mean().clamp(min=0.0))


def first_position_kl(reference: ContinuationLogProbs, candidate: ContinuationLogProbs) -> float:
    """The reference method's first-token-only KL, kept for comparison."""
    first = ContinuationLogProbs(reference.log_probs[:, :1], reference.mask[:, :1])
    return mean_kl_divergence(first, ContinuationLogProbs(candidate.log_probs[:, :1], candidate.mask[:, :1]))
