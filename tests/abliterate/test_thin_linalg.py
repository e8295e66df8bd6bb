"""The GPU's small factorizations (float64 Gram on the host) give the bases and SVDs of LAPACK's QR and SVD.

Run on the CPU by calling the Gram functions directly (on a CPU tensor the public ones take LAPACK's, as before).
"""

import pytest
import torch

from abliterate.edits import delta, thin_linalg
from abliterate.edits.delta import abliteration_factors


def _random(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_gram_basis_is_orthonormal_and_spans_the_range_qr_spans():
    tall = _random(300, 11, seed=1) * torch.logspace(0, -4, 11)  # a condition number of 1e4
    basis = thin_linalg.gram_range_basis(tall)
    reference = torch.linalg.qr(tall).Q
    assert basis.shape == (300, 11)
    torch.testing.assert_close(basis.T @ basis, torch.eye(11), atol=1e-5, rtol=0)
    torch.testing.assert_close(basis @ basis.T, reference @ reference.T, atol=1e-5, rtol=0)


def test_gram_basis_drops_what_the_matrix_does_not_span():
    low_rank = (_random(200, 3, seed=2).double() @ _random(3, 11, seed=3).double()).float()
    basis = thin_linalg.gram_range_basis(low_rank)
    assert 3 <= basis.shape[1] <= 11  # float32 rounding of the product may add directions ~1e-7 of the largest
    torch.testing.assert_close(basis @ (basis.T @ low_rank), low_rank, atol=1e-5, rtol=0)
    assert thin_linalg.gram_range_basis(torch.zeros(50, 11)).shape == (50, 0)


def test_gram_svd_equals_lapack_svd():
    wide = _random(11, 400, seed=4) * torch.logspace(0, -3, 11)[:, None]
    u, s, vh = thin_linalg.gram_svd(wide)
    ref_u, ref_s, ref_vh = torch.linalg.svd(wide, full_matrices=False)
    torch.testing.assert_close(s, ref_s, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close((u * s) @ vh, wide, atol=1e-5, rtol=0)
    signs = torch.sign((vh * ref_vh).sum(dim=1))  # singular vectors are defined up to sign
    torch.testing.assert_close(vh * signs[:, None], ref_vh, atol=1e-4, rtol=0)
    torch.testing.assert_close(u * signs, ref_u, atol=1e-4, rtol=0)


def test_gram_svd_of_a_zero_or_empty_matrix_is_finite_zeros():
    u, s, vh = thin_linalg.gram_svd(torch.zeros(11, 40))
    assert torch.isfinite(vh).all() and not s.any() and not ((u * s) @ vh).any()
    u, s, vh = thin_linalg.gram_svd(torch.zeros(0, 40))
    assert u.shape == (0, 0) and s.shape == (0,) and vh.shape == (0, 40)


@pytest.mark.parametrize("large", [False, True])
def test_factors_through_the_gram_path_give_the_lapack_path_delta(monkeypatch, large):
    """The whole norm-preserving edit, its small factorizations as on a GPU: the same delta (one-shot and
    large-weight paths), and a zero-strength edit gives zero factors instead of NaNs."""
    weight = _random(96, 40, seed=5)
    direction = torch.nn.functional.normalize(_random(96, seed=6), dim=0)
    if large:
        monkeypatch.setattr(delta, "_LARGE_ABOVE", 1000)
    reference = abliteration_factors(weight, direction, 0.8, method="norm_preserving", rank=3, seed=2)
    monkeypatch.setattr(delta, "range_basis", thin_linalg.gram_range_basis)
    monkeypatch.setattr(delta, "wide_svd", thin_linalg.gram_svd)
    left, right = abliteration_factors(weight, direction, 0.8, method="norm_preserving", rank=3, seed=2)
    assert left.shape == reference[0].shape and right.shape == reference[1].shape
    torch.testing.assert_close(left @ right, reference[0] @ reference[1], atol=1e-5, rtol=1e-4)
    left, right = abliteration_factors(weight, direction, 0.0, method="norm_preserving", rank=3, seed=2)
    assert torch.isfinite(left).all() and torch.isfinite(right).all() and not (left @ right).any()


def test_cpu_tensors_keep_lapack():
    tall = _random(64, 11, seed=7)
    assert torch.equal(thin_linalg.range_basis(tall), torch.linalg.qr(tall).Q)
    wide = tall.T.contiguous()
    for ours, lapack in zip(thin_linalg.wide_svd(wide), torch.linalg.svd(wide, full_matrices=False), strict=True):
        assert torch.equal(ours, lapack)
    for ours, lapack in zip(thin_linalg.small_svd(tall), torch.linalg.svd(tall, full_matrices=False), strict=True):
        assert torch.equal(ours, lapack)
