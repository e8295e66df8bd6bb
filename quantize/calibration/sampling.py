"""Pure arithmetic of a mix: how many samples to draw from each dataset, how
many to keep, the final order, and the fingerprint of the result.

Kept free of I/O so that the numbers the summary table shows can be tested
exactly, and so that the same YAML and seed always give the same token ids.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Sequence
from fractions import Fraction


def requested_total(max_samples: int, oversample_ratio: float) -> int:
    """ceil(max_samples * ratio), computed exactly: 100 * 1.1 must give 110, not 111."""
    return math.ceil(Fraction(str(oversample_ratio)) * max_samples)


def split_by_weights(total: int, weights: Sequence[float]) -> list[int]:
    """Integer shares of `total` proportional to `weights`, summing to `total`.

    Largest-remainder rounding; ties go to the earlier entry, so the split
    depends only on the YAML, never on dict or set ordering.
    """
    weight_sum = sum(weights)
    if total <= 0 or weight_sum <= 0:
        return [0] * len(weights)
    exact = [Fraction(str(w)) / Fraction(str(weight_sum)) * total for w in weights]
    shares = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in by_remainder[: total - sum(shares)]:
        shares[i] += 1
    return shares


def allocate_used(total: int, weights: Sequence[float], available: Sequence[int]) -> list[int]:
    """How many kept samples each dataset contributes to the final `total`.

    Weights decide; a dataset with fewer kept samples than its share gives all
    it has, and the rest of the total is re-split by weight among the others
    (water-filling), so the sum is min(total, sum(available)).
    """
    used = [0] * len(weights)
    capped: set[int] = set()
    target = min(total, sum(a for a, w in zip(available, weights) if w > 0))
    while True:
        free = [i for i in range(len(weights)) if i not in capped and weights[i] > 0]
        budget = target - sum(available[i] for i in capped)
        shares = dict(zip(free, split_by_weights(budget, [weights[i] for i in free])))
        short = [i for i in free if shares[i] > available[i]]
        if not short:
            for i in free:
                used[i] = shares[i]
            return used
        for i in short:
            capped.add(i)
            used[i] = available[i]


def dataset_seed(seed: int, dataset_name: str) -> int:
    """A per-dataset seed, stable across processes (unlike `hash`)."""
    digest = hashlib.sha256(f"{seed}:{dataset_name}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def seeded_shuffle(items: list, seed: int) -> list:
    shuffled = list(items)
    random.Random(seed).shuffle(shuffled)
    return shuffled


def token_ids_sha256(samples: Sequence[Sequence[int]]) -> str:
    """SHA-256 of the samples as compact JSON (`[[1,2],[3]]`): easy to recompute anywhere."""
    payload = json.dumps([list(map(int, s)) for s in samples], separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()
