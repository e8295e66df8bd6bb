"""The residual stream at the last prompt token, captured with forward hooks.

Hooks on the decoder layers work for every architecture, including those whose
``output_hidden_states`` returns nothing or something else (hybrid Mamba
models, remote code). Prompts are rendered exactly as for generation (chat
template + generation prompt, left padding), so the last column is the
position whose residual decides the first answer token. Each batch's
residuals are moved to the CPU as fp32 right away, so layers spread over
several devices stack without a device mismatch.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from rich.progress import Progress
from torch import nn

from abliterate.evaluation.chunked_mlp import sliced_mlps
from abliterate.evaluation.generation import (
    batches_by_length,
    format_chat_prompts,
    left_pad,
    model_device,
    pad_token_id,
)
from abliterate.evaluation.grouped_heads import grouped_attention


@dataclass(frozen=True)
class Residuals:
    """``values`` is [prompts, layers + 1, hidden] fp32 on the CPU.

    Index 0 is the input of the first decoder layer (the embeddings), index
    ``i`` the output of layer ``i - 1``.
    """

    values: torch.Tensor

    def nonfinite_layers(self) -> dict[int, int]:
        """Residual index -> number of prompts whose residual there is NaN/inf."""
        bad = ~torch.isfinite(self.values).all(dim=-1)  # [prompts, layers + 1]
        counts = bad.sum(dim=0)
        return {index: int(count) for index, count in enumerate(counts.tolist()) if count}


def _hidden_of(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _forward_kwargs(model: nn.Module) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


@torch.inference_mode()
def capture_last_token_residuals(
    model: nn.Module,
    layers: Sequence[nn.Module],
    token_ids: Sequence[Sequence[int]],
    *,
    pad_id: int,
    batch_size: int,
    progress: Progress | None = None,
    description: str = "residuals",
) -> Residuals:
    """Residuals of already-templated prompts (see ``format_chat_prompts``), in input order."""
    captured: list[torch.Tensor | None] = [None] * (len(layers) + 1)

    def keep(index: int, hidden: torch.Tensor) -> None:
        captured[index] = hidden[:, -1, :].detach().to("cpu", torch.float32)

    def before_first(module, args, kwargs):
        keep(0, args[0] if args else kwargs["hidden_states"])

    handles = [layers[0].register_forward_pre_hook(before_first, with_kwargs=True)]
    for index, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(lambda module, args, output, i=index + 1: keep(i, _hidden_of(output))))
    accepted = _forward_kwargs(model)
    device = model_device(model)
    rows: list[torch.Tensor | None] = [None] * len(token_ids)
    task = progress.add_task(description, total=len(token_ids)) if progress else None
    try:
        # a batch of long prompts on a GPU: the MLPs a slice of tokens at a time, no per-head K/V copies (memory)
        with sliced_mlps(model), grouped_attention(model, gpu_only=True):
            for indices in batches_by_length([len(ids) for ids in token_ids], batch_size):
                batch = left_pad([token_ids[index] for index in indices], pad_id, device)
                extra = {"logits_to_keep": 1} if "logits_to_keep" in accepted else {}
                if "position_ids" in accepted:
                    extra["position_ids"] = batch.position_ids
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False, **extra)
                stacked = torch.stack([hidden for hidden in captured if hidden is not None], dim=1)
                if stacked.shape[1] != len(layers) + 1:
                    raise RuntimeError("a decoder layer did not run; residuals are incomplete")
                for row, index in enumerate(indices):
                    rows[index] = stacked[row]
                captured[:] = [None] * len(captured)
                if progress is not None:
                    progress.advance(task, len(indices))
    finally:
        for handle in handles:
            handle.remove()
    return Residuals(torch.stack([row for row in rows if row is not None]))


def prompt_residuals(
    model: nn.Module,
    layers: Sequence[nn.Module],
    tokenizer,
    prompts: Sequence[str],
    *,
    batch_size: int,
    system_prompt: str | None = None,
    progress: Progress | None = None,
    description: str = "residuals",
) -> Residuals:
    """Render ``prompts`` with the chat template and capture their residuals."""
    token_ids = format_chat_prompts(tokenizer, prompts, system_prompt)
    return capture_last_token_residuals(
        model, layers, token_ids, pad_id=pad_token_id(tokenizer), batch_size=batch_size,
        progress=progress, description=description,
    )
