"""The arithmetic of a mix: weight splits, oversampling, trimming, hashing."""

from __future__ import annotations

import hashlib
import math
from fractions import Fraction

from hypothesis import given
from hypothesis import strategies as st

from quantize.calibration.sampling import (
    allocate_used,
    dataset_seed,
    requested_total,
    seeded_shuffle,
    split_by_weights,
    token_ids_sha256,
)


def test_requested_total_is_exact_ceiling():
    assert requested_total(512, 1.5) == 768
    assert requested_total(100, 1.1) == 110  # float product is 110.00000000000001
    assert requested_total(7, 1.5) == 11
    assert requested_total(10, 1.0) == 10


def test_split_by_weights_examples():
    assert split_by_weights(768, [0.4, 0.3, 0.2, 0.1]) == [307, 230, 154, 77]  # 307.2, 230.4, 153.6, 76.8
    assert split_by_weights(10, [1, 1, 1]) == [4, 3, 3]  # tie: the earlier entry gets the extra one
    assert split_by_weights(5, [2, 0, 3]) == [2, 0, 3]
    assert split_by_weights(0, [1, 2]) == [0, 0]


@given(
    total=st.integers(min_value=0, max_value=5000),
    weights=st.lists(st.floats(min_value=0.01, max_value=100, allow_nan=False), min_size=1, max_size=8),
)
def test_split_sums_to_total_and_stays_within_one_of_exact(total, weights):
    shares = split_by_weights(total, weights)
    assert sum(shares) == total
    weight_sum = sum(Fraction(str(w)) for w in weights)
    for share, weight in zip(shares, weights):
        exact = Fraction(str(weight)) / weight_sum * total
        assert math.floor(exact) <= share <= math.ceil(exact)


def test_allocate_used_follows_weights_when_data_suffices():
    assert allocate_used(8, [2, 1], [12, 6]) == [5, 3]


def test_allocate_used_moves_shortfall_to_datasets_with_spare_samples():
    # dataset 0 kept only 2 of its 5-sample share; datasets 1 and 2 fill the gap by weight
    assert allocate_used(10, [2, 1, 1], [2, 10, 10]) == [2, 4, 4]


def test_allocate_used_with_too_few_samples_uses_everything():
    assert allocate_used(8, [2, 1], [2, 4]) == [2, 4]


@given(
    total=st.integers(min_value=0, max_value=300),
    data=st.lists(
        st.tuples(st.floats(min_value=0.1, max_value=10, allow_nan=False), st.integers(0, 200)),
        min_size=1,
        max_size=6,
    ),
)
def test_allocate_used_is_capped_and_complete(total, data):
    weights, available = [w for w, _ in data], [a for _, a in data]
    used = allocate_used(total, weights, available)
    assert sum(used) == min(total, sum(available))
    assert all(0 <= u <= a for u, a in zip(used, available))


def test_seeds_and_shuffles_are_stable():
    assert dataset_seed(42, "chat") == dataset_seed(42, "chat")
    assert dataset_seed(42, "chat") != dataset_seed(42, "web")
    assert dataset_seed(42, "chat") != dataset_seed(43, "chat")
    items = list(range(30))
    assert seeded_shuffle(items, 7) == seeded_shuffle(items, 7) != items
    assert sorted(seeded_shuffle(items, 7)) == items


def test_token_hash_is_sha256_of_compact_json():
    expected = hashlib.sha256(b"[[1,2,3],[4]]").hexdigest()
    assert token_ids_sha256([[1, 2, 3], [4]]) == expected
    assert token_ids_sha256([[1, 2], [3, 4]]) != token_ids_sha256([[1, 2, 3], [4]])
