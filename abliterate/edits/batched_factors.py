"""A trial's edit factors on a GPU, every component's randomized SVD advanced in lockstep.

Why: on a GPU each small factorization of a component's randomized SVD is a round trip to the host (a float64
Gram matrix copied there and decomposed, ``thin_linalg``): four per component, so an 8B trial that edits 64
components made 256 of them, each draining the GPU's queue and leaving it idle while the host caught up: a
profiled edit took 257 ms of host time for 48 ms of GPU time (bench/stage2_trial_profile.py, H200, 2026-12-03).
Here every component runs to its next factorization (``delta.large_factor_steps``), all their Gram matrices go
to the host in one copy and are decomposed in one batched call, and the answers go back: four round trips per
trial. Each component's factors are the ones ``delta.abliteration_factors`` computes alone, bit for bit (the same
operations on the same values; only their order across components changes).

The price: each step takes its weight again (a packed NVFP4 weight is dequantized four times instead of once,
50-70 us of GPU time each on the 8B shapes), never more than one at a time. Measured in stage 2 on the same
three trials (H200, 2026-12-03 16:00 and 16:55): 0.188 / 0.086 / 0.324 s one by one, 0.091 / 0.048 / 0.149 s in
lockstep; the profiled edit's host time 257 -> 109 ms, its GPU time 48 -> 54 ms. Where a dequantization is
many kernels (``bench/edit_factors_bench.py``'s pure-torch one) lockstep is slower: 0.237 s against 0.193 s.
"""

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


def factors_in_lockstep(jobs: Sequence[FactorJob], *, method: delta.Method, rank: int,
                        seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``delta.abliteration_factors`` of every job, in the jobs' order."""
    results: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(jobs)
    running: dict[int, Generator] = {}
    requests: dict[int, delta.FactorRequest] = {}
    for index, job in enumerate(jobs):
        weight = job.load()
        if weight.ndim != 2 or weight.numel() <= delta._LARGE_ABOVE:  # the one-shot path: no round trips to share
            results[index] = delta.abliteration_factors(weight, job.direction.to(weight.device), job.strength,
                                                        method=method, rank=rank, transposed=job.transposed, seed=seed)
            continue
        steps = delta.large_factor_steps(weight, job.load, job.direction.to(weight.device), job.strength,
                                         method=method, rank=rank, transposed=job.transposed, seed=seed)
        del weight
        _advance(index, steps, None, running, requests, results)
    while requests:
        answers = answer_together(list(requests.values()))
        for (index, _), answer in zip(list(requests.items()), answers):
            _advance(index, running[index], answer, running, requests, results)
    return results  # type: ignore[return-value]


def _advance(index: int, steps: Generator, answer, running: dict, requests: dict, results: list) -> None:
    try:
        requests[index] = next(steps) if answer is None else steps.send(answer)
        running[index] = steps
    except StopIteration as done:
        results[index] = done.value
        requests.pop(index, None)
        running.pop(index, None)


def answer_together(requests: Sequence[delta.FactorRequest]) -> list:
    """``range_basis`` / ``wide_svd`` of each request; the CUDA ones through one host copy and one batched
    eigendecomposition per Gram size (CPU ones and empty ones as alone: LAPACK's QR and SVD)."""
    answers: list = [None] * len(requests)
    groups: dict[int, list[int]] = {}
    for index, (kind, matrix) in enumerate(requests):
        if not _host_round_trip(matrix) or _columns(requests[index]).shape[1] == 0:
            answers[index] = thin_linalg.range_basis(matrix) if kind == "basis" else thin_linalg.wide_svd(matrix)
        else:
            groups.setdefault(_columns(requests[index]).shape[1], []).append(index)
    for members in groups.values():
        grams = torch.stack([thin_linalg.gram_matrix(_columns(requests[i])) for i in members])
        values, vectors = thin_linalg.host_eigh(grams)  # the one round trip
        for row, index in enumerate(members):
            kind, matrix = requests[index]
            finish = thin_linalg.basis_from_eigh if kind == "basis" else thin_linalg.svd_from_eigh
            answers[index] = finish(matrix, values[row], vectors[row])
    return answers


def _host_round_trip(matrix: torch.Tensor) -> bool:
    """Whether ``thin_linalg`` factorizes ``matrix`` through a Gram matrix on the host (on a GPU: yes)."""
    return matrix.device.type == "cuda"


def _columns(request: delta.FactorRequest) -> torch.Tensor:
    kind, matrix = request
    return matrix if kind == "basis" else matrix.T
