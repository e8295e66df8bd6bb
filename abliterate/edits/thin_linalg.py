"""The randomized SVD's small factorizations: a basis of a tall thin matrix's range, and a wide one's SVD.

Why not ``torch.linalg.qr`` / ``svd`` on a GPU: their first call there loads cuSOLVER, which maps 105 MB into the
process outside torch's allocator (bench/cuda_context_probe.py, H200, 2026-12-03), 1.4% of a stage-2 run on an
8B-shaped model whose memory target it crossed. Both need only the
k x k Gram matrix of the k = rank + 8 columns: formed in float64 on the device (cuBLAS), decomposed on the host
(a 11 x 11 ``eigh``), applied back on the device. Gram matrices square the condition number, so the float64 Gram
keeps every singular value above ~1e-7 of the largest (the edit keeps the top 3); directions below that are
dropped from the basis (a zero edit gives an empty one, and zero factors). The price is time: four host round
trips per component, so an 8B trial's factors took 0.246 s instead of cuSOLVER's 0.152 s
(bench/edit_factors_bench.py, H200, 2026-12-03).

On the CPU both stay LAPACK's QR and SVD, exactly as before: CPU results do not move.
"""

from __future__ import annotations

import torch

_RELATIVE_FLOOR = 1e-14  # eigenvalues (squared singular values) kept above this fraction of the largest


def range_basis(tall: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning ``tall``'s range ([n, <=k] for ``tall`` [n, k], float32)."""
    if tall.device.type != "cuda":
        return torch.linalg.qr(tall).Q
    return gram_range_basis(tall)


def wide_svd(wide: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.svd(wide, full_matrices=False)`` for ``wide`` [k, n] with k small: (u [k, k], s [k], vh [k, n])."""
    if wide.device.type != "cuda":
        return torch.linalg.svd(wide, full_matrices=False)
    return gram_svd(wide)


def small_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.svd(matrix, full_matrices=False)`` for a matrix with one small dimension, either one."""
    if matrix.device.type != "cuda" or matrix.shape[0] <= matrix.shape[1]:
        return wide_svd(matrix)
    v, s, uh = gram_svd(matrix.T)
    return uh.T, s, v.T


def gram_matrix(columns: torch.Tensor) -> torch.Tensor:
    """``columns^T columns`` in float64, on ``columns``' device."""
    wide = columns.double()
    return wide.T @ wide


def host_eigh(grams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending, float64, on the host) and eigenvectors of Gram matrices [..., k, k]: one copy to
    the host for the whole batch (``batched_factors`` sends every edited component's at once)."""
    values, vectors = torch.linalg.eigh(grams.cpu())
    return values.flip(-1), vectors.flip(-1)


def gram_range_basis(tall: torch.Tensor) -> torch.Tensor:
    """``range_basis`` through the float64 Gram matrix, on any device (the GPU's path)."""
    if tall.shape[1] == 0:
        return tall
    return basis_from_eigh(tall, *host_eigh(gram_matrix(tall)))


def basis_from_eigh(tall: torch.Tensor, values: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """``gram_range_basis`` given the host eigendecomposition of ``tall``'s Gram matrix."""
    kept = values > values[0].clamp_min(0) * _RELATIVE_FLOOR
    if not bool(kept.any()):
        return tall.new_zeros(tall.shape[0], 0)
    transform = vectors[:, kept] / values[kept].sqrt()  # Q = T V L^-1/2: orthonormal in exact arithmetic
    return (tall.double() @ to_device(transform, tall.device)).to(tall.dtype)


def gram_svd(wide: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``wide_svd`` through the float64 Gram matrix of the rows, on any device (the GPU's path).

    Rows of ``vh`` whose singular value is at the floor (numerically zero) are zero, so ``u * s @ vh`` stays
    finite and equals ``wide`` whatever its rank.
    """
    if wide.shape[0] == 0:
        return wide.new_zeros(0, 0), wide.new_zeros(0), wide
    return svd_from_eigh(wide, *host_eigh(gram_matrix(wide.T)))  # wide wide^T = U S^2 U^T


def svd_from_eigh(wide: torch.Tensor, values: torch.Tensor, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``gram_svd`` given the host eigendecomposition of ``wide wide^T``."""
    kept = values > values[0].clamp_min(0) * _RELATIVE_FLOOR
    singular = values.clamp_min(0).sqrt() * kept
    inverse = torch.where(kept, 1.0 / singular.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    k = vectors.shape[0]
    packed = to_device(torch.cat([vectors, inverse[:, None], singular[:, None]], dim=1), wide.device)  # one copy
    u, inverse, singular = packed[:, :k], packed[:, k], packed[:, k + 1]
    vh = (u.T @ wide.double()) * inverse[:, None]  # S^-1 U^T W
    return u.to(wide.dtype), singular.to(wide.dtype), vh.to(wide.dtype)


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` on ``device``; to a GPU through pinned memory without waiting: a copy from pageable memory makes
    the host wait for the GPU's whole queue, and a trial's edit made ~450 such copies (one to three per answer;
    bench/stage2_trial_profile.py, H200, 2026-12-03). The pinned block is not reused before its copy is done
    (torch's host allocator records the copy's stream)."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
