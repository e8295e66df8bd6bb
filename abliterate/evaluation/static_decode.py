"""Greedy decoding on a preallocated KV cache, with the decode step replayed as a CUDA graph on a GPU.

Why: at batch 100 one decode step of an 8B model costs ~1,300 kernel launches
issued from Python. transformers' ``generate`` with its dynamic cache took
38.7 ms per step on an H200 where the weights bound it at 3.4 ms, and its
static cache with ``torch.compile`` took 52 s to compile before the first
answer. A trial decodes the same prompts with the same shapes every time, so
the step is captured once per batch shape (a CUDA graph: a fraction of a
second) and replayed for every later step of every trial. The edit's LoRA
factors are written in place between trials, so the captured graph sees them.

Everything that would break a capture stays outside the step: the padding
mask is a prebuilt 4-D additive mask (transformers uses a 4-D mask as given),
positions and the cache index are device tensors advanced in place, and the
early-stop test (EOS or a decided answer) reads the tokens back only every
``check_every`` steps (on a GPU judged one check later, so the GPU does not
wait on the judge). On a CPU the same loop runs eagerly; it gives the
tokens ``generate`` gives (tested), so both devices share one code path.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from transformers import StaticCache
from transformers.cache_utils import StaticLayer

from abliterate.evaluation import fused_norm, fused_rotary
from abliterate.evaluation.grouped_heads import grouped_attention

_KEPT_DECODERS = 4  # per model, one per batch size: the full batches, a remainder batch, spares


_RECURRENT_CONFIG_KEYS = ("hybrid_override_pattern", "layers_block_type", "ssm_cfg", "mamba_d_ssm", "linear_attn_config")


def supports_static_decode(model) -> bool:
    """Attention-only decoders that transformers can compile (its own flag), on one device; not hybrid Mamba models."""
    config = model.config.get_text_config(decoder=True)
    devices = {str(device) for device in (getattr(model, "hf_device_map", None) or {}).values()}
    if not getattr(model, "_can_compile_fullgraph", False) or len(devices) > 1 or "disk" in devices:
        return False
    if model.__dict__.get("_static_decode_failed"):
        return False
    return not any(getattr(config, key, None) for key in _RECURRENT_CONFIG_KEYS)


class RowJudge:
    """Decides, from the tokens read back every few steps, where each row's answer ends and why.

    A row ends at its first EOS, or at the shortest prefix whose text is
    decided (a refusal marker appeared), whichever comes first; exactly what
    a per-step stopping criterion gives, with a text decode per row only at
    the checks and within the last window.
    """

    def __init__(self, tokenizer, eos_ids: set[int], is_decided: Callable[[str], bool] | None) -> None:
        self.tokenizer, self.eos_ids, self.is_decided = tokenizer, eos_ids, is_decided
        self.ends: dict[int, tuple[int, str]] = {}  # row -> (length, "eos" | "decided")
        self.checked = 0

    def _decided_within(self, row: Sequence[int], start: int, stop: int) -> int | None:
        if self.is_decided is None or not self.is_decided(self.tokenizer.decode(list(row[:stop]), skip_special_tokens=True)):
            return None
        for length in range(max(1, start + 1), stop + 1):
            if self.is_decided(self.tokenizer.decode(list(row[:length]), skip_special_tokens=True)):
                return length
        return stop

    def update(self, tokens: torch.Tensor) -> bool:
        """Read ``tokens`` [batch, steps]; True when every row has ended."""
        rows: list[list[int]] = tokens.tolist()
        for index, row in enumerate(rows):
            if index in self.ends:
                continue
            eos = next((position for position, token in enumerate(row) if token in self.eos_ids), None)
            limit = eos + 1 if eos is not None else len(row)
            decided = self._decided_within(row, self.checked, limit)
            if decided is not None and not (eos is not None and decided > eos):
                self.ends[index] = (decided, "decided")
            elif eos is not None:
                self.ends[index] = (eos + 1, "eos")
        self.checked = tokens.shape[1]
        return len(self.ends) == len(rows)

    def end_of(self, index: int, generated: int) -> tuple[int, str]:
        return self.ends.get(index, (generated, "length"))


def _additive_mask(attention_mask: torch.Tensor, cache_len: int, dtype: torch.dtype) -> torch.Tensor:
    """[batch, 1, prompt, cache_len] causal + padding mask for the prefill (0 = attend, min = masked)."""
    batch, prompt = attention_mask.shape
    keys = torch.arange(cache_len, device=attention_mask.device)
    queries = torch.arange(prompt, device=attention_mask.device)
    causal = keys[None, :] <= queries[:, None]
    padded = torch.zeros(batch, cache_len, dtype=torch.bool, device=attention_mask.device)
    padded[:, :prompt] = attention_mask.bool()
    allowed = causal[None, None] & padded[:, None, None, :]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


_CAPTURE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _capture_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device for every capture and its warm-up.

    Why: torch keeps a cuBLAS workspace for each (handle, stream) pair it has seen, for the process's life; a new
    stream per capture (the batch-size probe's decoders, the reference continuations', the harmful answers')
    left one more each time: 0.40 GB of a trial's 6.85 GB peak on an H200 (bench/stage2_trial_profile.py
    --memory_history, 2026-12-02).
    """
    if device not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[device] = torch.cuda.Stream(device)
    return _CAPTURE_STREAMS[device]


class StaticDecoder:
    """One batch size's cache, step buffers and (on CUDA) captured decode step.

    The captured step depends on the batch size and the cache length only, not on the prompt length (the prompt
    is prefilled outside the graph), so one decoder serves every call of its batch size that fits its cache:
    the false-refusal and skill answers decode in the harmful answers' KV cache instead of a cache of their own.
    """

    def __init__(self, model, batch: int, cache_len: int, dtype: torch.dtype) -> None:
        self.model = model
        self.batch, self.cache_len = batch, cache_len
        device = next(model.parameters()).device
        self.device, self.dtype = device, dtype
        self.cache = StaticCache(config=model.config, max_cache_len=self.cache_len)
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.cache_position = torch.zeros(1, dtype=torch.long, device=device)
        self.step_mask = torch.zeros(batch, 1, 1, self.cache_len, dtype=dtype, device=device)
        self.next_token = torch.zeros(batch, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.modules_key = modules_key(model)

    def _step(self) -> None:
        with grouped_attention(self.model), fused_norm.fused_rms_norms(self.model), fused_rotary.fused_rotary(self.model):
            logits = self.model(input_ids=self.ids, position_ids=self.positions, cache_position=self.cache_position,
                                attention_mask=self.step_mask, past_key_values=self.cache, use_cache=True,
                                logits_to_keep=1).logits
        self.next_token.copy_(logits[:, -1].argmax(-1))

    def _capture(self) -> None:
        """Warm up on the device's capture stream (Triton autotuning, cuBLAS handles), then record one step on it."""
        stream = _capture_stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._step()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=stream):
            self._step()
        # The warm-up's transients lie freed in the capture stream's own pages, which the default stream cannot
        # allocate from: handed back, they do not stand beside the next forward's at the process's peak.
        torch.cuda.empty_cache()

    def fits(self, batch: int, prompt_len: int, max_new_tokens: int) -> bool:
        return batch == self.batch and prompt_len + max_new_tokens <= self.cache_len

    def prefill(self, batch, logits_to_keep: int = 1) -> torch.Tensor:
        """Forward a left-padded ``batch`` into the cache (column i to slot i); the last ``logits_to_keep``
        positions' logits [batch, logits_to_keep, vocab].

        ``run(..., first_tokens=...)`` decodes on from a prefill of the prompt alone or, where ``can_rewind``, of
        the prompt followed by more columns (the KL pass's teacher-forced continuation): the steps overwrite those
        slots one by one, and a slot stays masked until its step has written it, so the later columns are never
        attended to."""
        rows, length = batch.input_ids.shape
        if not self.fits(rows, length, 0):
            raise ValueError(f"a batch of {rows} x {length} does not fit this decoder ({self.batch} rows, cache of "
                             f"{self.cache_len})")
        self.cache.reset()
        mask = _additive_mask(batch.attention_mask, self.cache_len, self.dtype)
        cache_position = torch.arange(length, device=self.device)
        with grouped_attention(self.model):
            return self.model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                              cache_position=cache_position, attention_mask=mask, past_key_values=self.cache,
                              use_cache=True, logits_to_keep=logits_to_keep).logits

    @property
    def can_rewind(self) -> bool:
        """Whether the next write position can be set back: every cache layer is transformers' full-attention
        ``StaticLayer``, which writes at its own counter (``cumulative_length``, a device tensor the captured step
        advances in place) and ignores the ``cache_position`` it is given. Sliding-window layers keep more state."""
        return all(type(layer) is StaticLayer for layer in self.cache.layers)

    def _rewind(self, length: int) -> None:
        for layer in self.cache.layers:
            layer.cumulative_length.fill_(length)

    def run(self, batch, max_new_tokens: int, judge: RowJudge, check_every: int,
            lagged: bool | None = None, first_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Generated tokens [batch, <= max_new_tokens] for a left-padded ``batch`` (``generation.PaddedBatch``).

        Rows keep going after they end; ``judge`` says where each one ends, so the tokens a row keeps do not
        depend on the step the loop stops at. ``lagged`` (default: on a GPU) judges each check's tokens one
        check later (``TokenReadback``); else each check reads the tokens back and judges them at once.
        ``first_tokens`` [batch]: ``batch`` is already in the cache (a ``prefill`` of it, perhaps with more
        columns after it: then only where ``can_rewind``) and these are the tokens its last column predicts; no
        prefill here.
        """
        prompt_len = batch.input_ids.shape[1]
        if not self.fits(batch.input_ids.shape[0], prompt_len, max_new_tokens):
            raise ValueError(f"a batch of {batch.input_ids.shape[0]} x {prompt_len} + {max_new_tokens} new tokens "
                             f"does not fit this decoder ({self.batch} rows, cache of {self.cache_len})")
        prompt_mask = _additive_mask(batch.attention_mask, self.cache_len, self.dtype)
        generated = torch.empty(self.batch, max_new_tokens, dtype=torch.long, device=self.device)
        if first_tokens is None:
            generated[:, 0] = self.prefill(batch)[:, -1].argmax(-1)
        else:
            if not self.can_rewind:
                raise ValueError("this decoder's cache cannot be rewound (sliding-window layers): prefill in run()")
            self._rewind(prompt_len)
            generated[:, 0] = first_tokens
        self.step_mask.copy_(prompt_mask[:, :, -1:, :])
        self.positions.copy_(batch.position_ids[:, -1:])
        self.cache_position.fill_(prompt_len - 1)
        steps = 1
        lagged = self.device.type == "cuda" if lagged is None else lagged
        readback = TokenReadback(generated) if lagged else None
        while steps < max_new_tokens:
            if steps % check_every == 0:
                if readback is None:
                    ended = judge.update(generated[:, :steps])
                else:
                    ended = readback.pending and judge.update(readback.result())
                    readback.start(steps)
                if ended:
                    break
            self.ids.copy_(generated[:, steps - 1 : steps])
            self.positions.add_(1)
            self.cache_position.add_(1)
            self.step_mask.index_fill_(-1, self.cache_position, 0.0)
            if self.device.type == "cuda":
                if self.graph is None:
                    self._capture()  # its warm-up computes this very step; the replay recomputes it identically
                self.graph.replay()
            else:
                self._step()
            generated[:, steps] = self.next_token
            steps += 1
        tokens = generated[:, :steps]
        judge.update(tokens)
        return tokens


class TokenReadback:
    """The generated tokens of one check, copied to the host behind the steps queued after it.

    Why: reading the tokens back at a check waits for the GPU to finish that step, and the GPU then idles while
    the judge decodes 100 rows of text (a decode step of an 8B model is ~10 ms; a check with its drained queue
    cost more). Judged one check later instead, the copy has long landed and the GPU works through the steps
    queued since; the price is up to one check interval of steps decoded after every row has ended, which only
    a call whose rows all end early pays.
    """

    def __init__(self, generated: torch.Tensor) -> None:
        self.generated = generated
        pinned = generated.device.type == "cuda"
        self.host = torch.empty(generated.shape, dtype=generated.dtype, pin_memory=pinned)
        self.event = torch.cuda.Event() if pinned else None
        self.steps = 0

    @property
    def pending(self) -> bool:
        return self.steps > 0

    def start(self, steps: int) -> None:
        """Copy the first ``steps`` tokens of every row (asynchronously on a GPU)."""
        self.host[:, :steps].copy_(self.generated[:, :steps], non_blocking=self.event is not None)
        if self.event is not None:
            self.event.record()
        self.steps = steps

    def result(self) -> torch.Tensor:
        """The tokens of the last ``start``, once they are on the host."""
        if self.event is not None:
            self.event.synchronize()
        return self.host[:, : self.steps]


def modules_key(model) -> tuple[int, ...]:
    """Which module objects make up ``model`` (by identity, in order).

    Why: a captured step replays the kernels of the modules it was captured with. Stage 2 builds its evaluator,
    and so the base evaluation's decoder, before it injects the LoRA adapters; a decoder kept from then replayed
    every later trial's decode steps without the adapters' side path (the edit reached the prefills only; H200
    profile of 2026-12-04 06:25: no LoRA kernel among a trial's 106 decode steps)."""
    return tuple(id(module) for module in model.modules())


def decoder_for(model, batch: int, prompt_len: int, max_new_tokens: int) -> StaticDecoder:
    """The model's decoder for this batch size, kept across trials (least recently used batch sizes dropped).

    A call that does not fit the kept decoder's cache replaces it with one sized for this call (the old cache
    and graph are freed), so the longest call of a batch size - the harmful answers - sets the size once.
    Decoders made before a module of the model was replaced (``modules_key``) are all dropped first.
    """
    decoders: OrderedDict = model.__dict__.get("_static_decoders") or OrderedDict()
    if decoders and next(iter(decoders.values())).modules_key != modules_key(model):
        forget_decoders(model)
        decoders = OrderedDict()
    model.__dict__["_static_decoders"] = decoders
    kept = decoders.get(batch)
    if kept is not None and kept.fits(batch, prompt_len, max_new_tokens):
        decoders.move_to_end(batch)
        return kept
    decoders.pop(batch, None)
    del kept  # its KV cache goes before the larger one is allocated
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    decoders[batch] = StaticDecoder(model, batch, prompt_len + max_new_tokens, dtype)
    while len(decoders) > _KEPT_DECODERS:
        decoders.popitem(last=False)
    return decoders[batch]


def forget_decoders(model) -> None:
    """Drop captured graphs and caches (after the model's modules were replaced, e.g. an adapter injected, or
    once a batch size is done with) and hand their memory back to the device, so a later, larger allocation
    finds it mapped for whichever stream asks instead of beside it."""
    decoders = model.__dict__.pop("_static_decoders", None)
    if decoders and any(decoder.device.type == "cuda" for decoder in decoders.values()):
        decoders.clear()
        torch.cuda.empty_cache()
