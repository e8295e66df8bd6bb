"""Choosing the generation batch size: the largest that fits and is fastest.

Throughput grows with batch size until the device saturates or memory runs
out; on CPUs it can also fall again. So batch sizes are tried in doubling
steps on a short probe, out-of-memory ends the search, and the size with the
best items-per-second wins (a larger size must be clearly faster to win, so
noise does not pick a size that only wastes memory).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

_CLEARLY_FASTER = 1.05


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def candidate_batch_sizes(n_items: int, max_batch_size: int) -> list[int]:
    limit = max(1, min(n_items, max_batch_size))
    sizes = []
    size = 1
    while size < limit:
        sizes.append(size)
        size *= 2
    sizes.append(limit)
    return sizes


def find_fastest_batch_size(
    run_probe: Callable[[int], None],
    n_items: int,
    max_batch_size: int = 128,
    clock: Callable[[], float] = time.perf_counter,
) -> int:
    """``run_probe(batch_size)`` processes one batch of that size."""
    run_probe(1)  # warm-up: first-call overheads (allocation, kernels) are not throughput
    best_size, best_rate = 1, 0.0
    for size in candidate_batch_sizes(n_items, max_batch_size):
        try:
            start = clock()
            run_probe(size)
            elapsed = max(clock() - start, 1e-9)
        except Exception as error:  # noqa: BLE001 - only OOM is expected, others re-raised
            if not is_out_of_memory(error):
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            break
        rate = size / elapsed
        if best_rate == 0.0 or rate > best_rate * _CLEARLY_FASTER:
            best_size, best_rate = size, rate
    return best_size
