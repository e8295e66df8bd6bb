"""False refusals: refusals among the answers to harmless prompts (and look-alikes), counted at the cost of the
answers that depart from the unedited model's.

Why apart from ``evaluator``: counting them is its own small algorithm (the KL pass decides most prompts for
free, the rest are generated, on a GPU straight from the KV cache the KL pass filled) with state of its own (the
prompts that pass left in a decoder's cache), and ``Evaluator`` only asks for two numbers. The module docstring
of ``evaluator`` says what is counted; here is how.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from abliterate.evaluation import static_decode
from abliterate.evaluation.batch_size import is_out_of_memory
from abliterate.evaluation.generation import (
    PaddedBatch,
    Prefilled,
    Response,
    continue_greedy,
    give_up_static_decode,
    model_device,
    use_static_decode,
)
from abliterate.evaluation.kl import plain_forward
from abliterate.evaluation.markers import contains_refusal_marker, is_refusal

# (model, prompt token ids, max new tokens) -> greedy answers with the refusal markers' early stop
Answers = Callable[[object, list[list[int]], int], list[Response]]


def fixed_shape(prompts: list[list[int]], pool: Sequence[list[int]], size: int) -> list[list[int]]:
    """For the captured static decoder: whole batches of ``size`` that include the longest prompt of ``pool``.

    How many answers depart from the reference changes with every trial; a batch shape per count would capture
    a decoder (KV cache and CUDA graph) per trial and push the harmful prompts' decoder out of the kept few.
    Padding with copies of the longest prompt gives every trial the same shape; their answers are dropped.
    transformers' ``generate`` (the CPU path) needs no such padding.
    """
    longest = max(pool, key=len)
    padded = prompts + ([longest] if max(map(len, prompts)) < len(longest) else [])
    return padded + [longest] * (-len(padded) % size)


class FalseRefusalCounter:
    """Counts one trial's false refusals, given the trial's KL pass (see the module docstring of ``evaluator``)."""

    def __init__(self, tokenizer, harmless_ids: list[list[int]], lookalike_ids: list[list[int]],
                 reference_continuations: list, *, window: int, kl_tokens: int, markers: Sequence[str],
                 counted: bool, decoding: str, batch_size: int) -> None:  # fmt: skip
        self.tokenizer = tokenizer
        self.harmless_ids = harmless_ids
        self.lookalike_ids = lookalike_ids
        self.reference_continuations = reference_continuations
        self.window, self.kl_tokens, self.markers = window, kl_tokens, tuple(markers)
        self.counted, self.decoding, self.batch_size = counted, decoding, batch_size
        self._prefilled: Prefilled | None = None  # the harmless prompts the last KL pass left in a decoder's cache

    def forget_prefill(self) -> None:
        """A KL pass starts: whatever an earlier one left in a decoder's cache is stale."""
        self._prefilled = None

    def count(self, model, log_probs, answers: Answers) -> tuple[int | None, int | None]:
        """Refusals among the harmless answers and among the look-alikes (window ``window``), each None where
        not counted; one generation call for both."""
        verdicts: list[bool | None] = [None] * len(self.harmless_ids) if self.counted else []
        if self.counted and self.window <= self.kl_tokens:
            greedy = log_probs.log_probs[:, : self.window].argmax(dim=-1).tolist()
            for index, reference in enumerate(self.reference_continuations):
                reference = list(reference[: self.window])  # shorter only where it ends in EOS: so does the answer
                if greedy[index][: len(reference)] == reference:
                    verdicts[index] = is_refusal(self.tokenizer.decode(reference, skip_special_tokens=True),
                                                 self.markers)  # fmt: skip
        departed = [index for index, verdict in enumerate(verdicts) if verdict is None]
        lookalike_refused: list[bool] = []
        prefilled, self._prefilled = self._prefilled, None
        if departed and prefilled is not None:  # the KL pass left these prompts in the decoder's cache
            continued = continue_greedy(model, self.tokenizer, prefilled, max_new_tokens=self.window,
                                        is_decided=lambda text: contains_refusal_marker(text, self.markers))
            for index in departed:
                verdicts[index] = is_refusal(continued[index].text, self.markers)
        elif departed or self.lookalike_ids:
            asked = [self.harmless_ids[index] for index in departed] + self.lookalike_ids
            if use_static_decode(model, self.decoding):
                size = min(self.batch_size, len(self.harmless_ids))
                asked = fixed_shape(asked, self.harmless_ids + self.lookalike_ids, size)
            generated = answers(model, asked, self.window)
            for index, answer in zip(departed, generated[: len(departed)], strict=True):
                verdicts[index] = is_refusal(answer.text, self.markers)
            lookalike_refused = [is_refusal(answer.text, self.markers) for answer in
                                 generated[len(departed): len(departed) + len(self.lookalike_ids)]]
        return (sum(bool(verdict) for verdict in verdicts) if self.counted else None,
                sum(lookalike_refused) if self.lookalike_ids else None)

    def continues_from_kl(self, model) -> bool:
        """Whether the KL pass can leave the harmless prompts in the static decoder's cache for the false-refusal
        answers: counted, decoded by the static decoder, all harmless prompts in one batch, no look-alikes (they
        share the departed prompts' generation call otherwise).

        Why: the KL pass's forward over prompt + reference continuation computes the prompts' keys and values
        anyway; written into the decoder's cache, the departed prompts' answers start from it instead of from a
        prefill of their own (~0.1 s of a 1.4 s trial on the 8B-shaped bench, H200)."""
        return (self.counted and not self.lookalike_ids and len(self.harmless_ids) <= self.batch_size
                and use_static_decode(model, self.decoding))  # fmt: skip

    def prefilling_forward(self, model):
        """The KL pass's forward through the static decoder's cache, leaving the prompts behind for ``count``."""
        device = model_device(model)
        answer_tokens = max(self.window, self.kl_tokens - 1)

        def forward(indices, prompts: PaddedBatch, inputs: PaddedBatch):
            if not use_static_decode(model, self.decoding):  # given up on earlier in this pass
                return plain_forward(model, inputs, self.kl_tokens)
            prompts, inputs = (PaddedBatch(*(tensor.to(device) for tensor in (batch.input_ids, batch.attention_mask,
                                                                             batch.position_ids)))
                               for batch in (prompts, inputs))  # fmt: skip
            decoder = static_decode.decoder_for(model, len(indices), prompts.input_ids.shape[1], answer_tokens)
            if not decoder.can_rewind:
                return plain_forward(model, inputs, self.kl_tokens)
            try:
                logits = decoder.prefill(inputs, self.kl_tokens)
            except (RuntimeError, TypeError, ValueError, NotImplementedError) as error:
                if is_out_of_memory(error):
                    raise
                give_up_static_decode(model, error)
                return plain_forward(model, inputs, self.kl_tokens)
            # the first scored position is the prompts' last: its argmax is each answer's first token
            self._prefilled = Prefilled(decoder, prompts, logits[:, -self.kl_tokens].argmax(-1), tuple(indices))
            return logits

        return forward
