"""A trial's edit factors advanced in lockstep (batched_factors) are each component's own factors, bit for bit,
with one host round trip per step for all components on the GPU's (Gram) path."""

from __future__ import annotations

import pytest
import torch

from abliterate.edits import batched_factors, delta, thin_linalg
from abliterate.edits.batched_factors import FactorJob, factors_in_lockstep


def _together(jobs, method="norm_preserving"):
    """factors_in_lockstep's deliveries, in the jobs' order, and the order they came in."""
    delivered: dict[int, tuple] = {}
    factors_in_lockstep(jobs, lambda index, left, right: delivered.setdefault(index, (left, right)), method=method,
                        rank=3, seed=2)
    return [delivered[index] for index in range(len(jobs))], list(delivered)


def _random(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _jobs(loads: list[int]) -> list[FactorJob]:
    """Large 2-D weights (one transposed, one subspace edit), a small one and a fused-experts one; each load
    appends the weight's index to ``loads``."""
    def job(weight, direction, strength, transposed=False):
        index = len(made)
        made.append(index)

        def load():
            loads.append(index)
            return weight.clone()  # a new tensor each time, as a dequantization gives
        return FactorJob(load, direction, strength, transposed)

    made: list[int] = []
    unit = lambda seed: torch.nn.functional.normalize(_random(96, seed=seed), dim=0)  # noqa: E731
    subspace = torch.linalg.qr(_random(96, 2, seed=9)).Q.T.contiguous()
    return [job(_random(96, 40, seed=1), unit(2), 0.8), job(_random(40, 96, seed=3), unit(4), 1.3, transposed=True),
            job(_random(96, 30, seed=5), subspace, 0.5), job(_random(96, 8, seed=6), unit(7), 1.1),
            job(_random(3, 96, 20, seed=8), unit(10), 0.9)]


def _alone(jobs, method):
    return [delta.abliteration_factors(j.load(), j.direction, j.strength, method=method, rank=3,
                                       transposed=j.transposed, seed=2) for j in jobs]


@pytest.fixture
def large_above(monkeypatch):
    monkeypatch.setattr(delta, "_LARGE_ABOVE", 1000)  # 3,840 and 2,880 values: the large-weight steps


@pytest.mark.parametrize("method", ["norm_preserving", "rank1"])
def test_lockstep_factors_are_each_components_own(large_above, method):
    loads: list[int] = []
    jobs = _jobs(loads)
    expected = _alone(jobs, method)
    loads.clear()
    together, order = _together(jobs, method)
    if method == "norm_preserving":
        assert order == [3, 4, 0, 1, 2]  # the one-shot ones at once (their factors not held for the batch)
    for (left, right), (ref_left, ref_right) in zip(together, expected, strict=True):
        assert torch.equal(left, ref_left) and torch.equal(right, ref_right)
    steps = 1 + delta._POWER_ITERATIONS + 1 if method == "norm_preserving" else 1
    assert [loads.count(index) for index in range(5)] == [steps] * 3 + [1, 1]  # large ones again at every step


def test_on_the_gpus_path_all_components_share_one_round_trip_per_step(large_above, monkeypatch):
    """The Gram path as on a GPU: the same factors as each component alone on that path, and the host
    eigendecompositions batched: one call per step (4 steps) instead of one per component and step (12)."""
    monkeypatch.setattr(delta, "range_basis", thin_linalg.gram_range_basis)
    monkeypatch.setattr(delta, "wide_svd", thin_linalg.gram_svd)
    jobs = _jobs([])
    expected = _alone(jobs, "norm_preserving")
    calls = []
    eigh = thin_linalg.host_eigh
    monkeypatch.setattr(thin_linalg, "host_eigh", lambda grams: calls.append(grams.shape) or eigh(grams))
    monkeypatch.setattr(batched_factors, "_host_round_trip", lambda matrix: True)
    together, _ = _together(jobs)
    for (left, right), (ref_left, ref_right) in zip(together, expected, strict=True):
        torch.testing.assert_close(left, ref_left, rtol=0, atol=0)
        torch.testing.assert_close(right, ref_right, rtol=0, atol=0)
    # three large components (sketches of rank 3 + 8 columns) in 4 batched calls; the 3 experts (4 each) on their
    # own (the small weight's one exact SVD is LAPACK's here, on a CPU tensor)
    assert [tuple(shape) for shape in calls] == [(11, 11)] * 12 + [(3, 11, 11)] * 4


def test_a_zero_strength_component_in_the_batch_gives_zero_factors(large_above, monkeypatch):
    monkeypatch.setattr(batched_factors, "_host_round_trip", lambda matrix: True)
    jobs = _jobs([])
    jobs[0] = FactorJob(jobs[0].load, jobs[0].direction, 0.0)
    ((left, right), *rest), _ = _together(jobs)
    assert torch.isfinite(left).all() and torch.isfinite(right).all() and not (left @ right).any()
    assert all((l @ r).abs().max() > 0 for l, r in rest)


def test_requests_are_stacked_per_device_and_gram_size():
    """A model spread over GPUs: one stack per device (torch.stack refuses tensors of two devices)."""
    requests = [("basis", torch.zeros(50, 11)), ("basis", torch.zeros(50, 11, device="meta")),
                ("svd", torch.zeros(11, 70)), ("basis", torch.zeros(50, 5)), ("basis", torch.zeros(50, 0))]
    groups = batched_factors._groups(requests, lambda matrix: True)
    assert groups == {(torch.device("cpu"), 11): [0, 2], (torch.device("meta"), 11): [1], (torch.device("cpu"), 5): [3]}


def test_no_weight_outlives_its_own_step(large_above):
    """At most one loaded weight alive at a time, the one-shot ones included (their factors come at once)."""
    import weakref

    alive: list[weakref.ref] = []
    most = [0]

    def tracked(job):
        def load():
            weight = job.load()
            most[0] = max(most[0], sum(ref() is not None for ref in alive) + 1)
            alive.append(weakref.ref(weight))
            return weight
        return FactorJob(load, job.direction, job.strength, job.transposed)

    _together([tracked(job) for job in _jobs([])])
    assert most[0] == 1


def test_bad_inputs_are_refused_as_one_by_one_refuses_them(large_above):
    job = _jobs([])[0]
    with pytest.raises(ValueError, match="unknown method"):
        _together([job], method="nonsense")
    wrong = FactorJob(job.load, torch.ones(192), 1.0)  # twice the residual size: not a [2, 96] basis
    with pytest.raises(ValueError, match="residual axis has 96"):
        _together([wrong])
