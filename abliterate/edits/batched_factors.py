"""A trial's edit factors on a GPU, the large components' randomized SVDs advanced in lockstep.

Why: on a GPU each small factorization of a component's randomized SVD is a round trip to the host (a float64
Gram matrix copied there and decomposed, ``thin_linalg``): four per component, so an 8B trial that edits 64
components made 256 of them, each draining the GPU's queue and leaving it idle while the host caught up: a
profiled edit took 257 ms of host time for 48 ms of GPU time (bench/stage2_trial_profile.py, H200, 2026-12-03).

Here every component above ``delta._LARGE_ABOVE`` values (every o_proj and down_proj of an 8B model) runs to its
next factorization (``delta.large_factor_steps``); their Gram matrices go to the host in one copy per device and
are decomposed in one batched call, four times per trial (each answer still goes back to its device in a copy
or three of its own). Smaller weights and fused experts keep their own round trips. Each component's factors
are the ones ``delta.abliteration_factors`` computes alone, bit for bit (the same operations on the same values;
only their order across components changes).

The price: each step takes its weight again (a packed NVFP4 weight is dequantized four times instead of once,
50-70 us of GPU time each on the 8B shapes), never more than one at a time.

Measured in stage 2 on the same three trials (H200, 2026-12-03 16:00 and 16:55), when only the down_projs
(above 2**24 values then) went in lockstep: 0.188 / 0.086 / 0.324 s one by one, 0.091 / 0.048 / 0.149 s in
lockstep; the profiled edit's host time 257 -> 109 ms, its GPU time 48 -> 54 ms. Where a dequantization is many
kernels (``bench/edit_factors_bench.py``'s pure-torch one) lockstep was slower: 0.237 s against 0.193 s, with a
peak 56 MB higher (848,224,256 against 791,781,376 B above the resting allocation; a weight of the one-shot path
was then still held while the next one loaded, fixed since)."""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass

import torch

from abliterate.edits import delta, thin_linalg


@dataclass(frozen=True)
class FactorJob:
    """One component's edit: ``load()`` returns its weight (may be called several times), the rest as in
    ``delta.abliteration_factors``."""

    load: Callable[[], torch.Tensor]
    direction: torch.Tensor
    strength: float
    transposed: bool = False


Deliver = Callable[[int, torch.Tensor, torch.Tensor], None]


def factors_in_lockstep(jobs: Sequence[FactorJob], deliver: Deliver, *, method: delta.Method, rank: int,
                        seed: int) -> None:
    """``delta.abliteration_factors`` of every job, handed to ``deliver(index, left, right)`` as soon as each is
    done (a weight of the one-shot path, small or fused experts, at once: its factors are not held for the
    batch); the large 2-D weights advance in lockstep."""
    running: dict[int, Generator] = {}
    requests: dict[int, delta.FactorRequest] = {}
    for index, job in enumerate(jobs):
        weight = job.load()
        direction = job.direction.to(weight.device)
        if not delta.takes_large_path(weight):  # its small factorizations are its own (per expert, say)
            left, right = delta.abliteration_factors(weight, direction, job.strength, method=method, rank=rank,
                                                     transposed=job.transposed, seed=seed)
            del weight
            deliver(index, left, right)
            continue
        steps = delta.large_factor_steps(weight, job.load, direction, job.strength, method=method, rank=rank,
                                         transposed=job.transposed, seed=seed)
        del weight
        _advance(index, steps, None, running, requests, deliver)
    while requests:
        answers = answer_together(list(requests.values()))
        for (index, _), answer in zip(list(requests.items()), answers):
            _advance(index, running[index], answer, running, requests, deliver)


def _advance(index: int, steps: Generator, answer, running: dict, requests: dict, deliver: Deliver) -> None:
    try:
        requests[index] = next(steps) if answer is None else steps.send(answer)
        running[index] = steps
    except StopIteration as done:
        requests.pop(index, None)
        running.pop(index, None)
        deliver(index, *done.value)


def answer_together(requests: Sequence[delta.FactorRequest]) -> list:
    """``range_basis`` / ``wide_svd`` of each request; the CUDA ones through one host copy and one batched
    eigendecomposition per device and Gram size (CPU ones and empty ones as alone: LAPACK's QR and SVD)."""
    answers: list = [None] * len(requests)
    groups = _groups(requests, _host_round_trip)
    batched = {index for members in groups.values() for index in members}
    for index, (kind, matrix) in enumerate(requests):
        if index not in batched:
            answers[index] = thin_linalg.range_basis(matrix) if kind == "basis" else thin_linalg.wide_svd(matrix)
    for members in groups.values():
        grams = torch.stack([thin_linalg.gram_matrix(_columns(requests[i])) for i in members])
        values, vectors = thin_linalg.host_eigh(grams)  # the one round trip
        for row, index in enumerate(members):
            kind, matrix = requests[index]
            finish = thin_linalg.basis_from_eigh if kind == "basis" else thin_linalg.svd_from_eigh
            answers[index] = finish(matrix, values[row], vectors[row])
    return answers


def _groups(requests: Sequence[delta.FactorRequest],
            round_trip: Callable[[torch.Tensor], bool]) -> dict[tuple[torch.device, int], list[int]]:
    """Indices of the requests answered through a host round trip, by device (a model spread over GPUs: one
    stack each) and Gram size; empty ones are answered alone."""
    groups: dict[tuple[torch.device, int], list[int]] = {}
    for index, request in enumerate(requests):
        columns = _columns(request)
        if round_trip(request[1]) and columns.shape[1] > 0:
            groups.setdefault((columns.device, columns.shape[1]), []).append(index)
    return groups


def _host_round_trip(matrix: torch.Tensor) -> bool:
    """Whether ``thin_linalg`` factorizes ``matrix`` through a Gram matrix on the host (on a GPU: yes)."""
    return matrix.device.type == "cuda"


def _columns(request: delta.FactorRequest) -> torch.Tensor:
    kind, matrix = request
    return matrix if kind == "basis" else matrix.T
