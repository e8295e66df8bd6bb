"""The weight change of one component, as a pure function of its weight.

Both the search (through LoRA factors) and the streaming merge (on
full-precision weights, shard by shard, without the model) call these, so the
merged checkpoint carries exactly the edit that was evaluated.

Orientation: a component's weight maps into the residual stream. In the
canonical layout the residual axis comes first, ``[hidden, in]`` (a Linear
weight) or ``[experts, hidden, in]`` (fused experts). ``transposed=True``
means the stored layout has the residual axis last (``[in, hidden]`` /
``[experts, in, hidden]``, e.g. gpt-oss experts); inputs and outputs then use
that stored layout.

Methods:

* ``rank1``: ``W' = (I - lambda v v^T) W``; delta ``= (-lambda v)(v^T W)``,
  exactly rank one.
* ``norm_preserving``: the rank-1 edit, then each row of ``W'`` (one residual
  feature) rescaled to its original norm, so the edit changes directions, not
  magnitudes; the resulting delta is replaced by its best rank-``rank``
  approximation (randomized SVD with a fixed CPU seed, so every device and the
  merge compute the same factors up to float rounding; its small factorizations
  in ``thin_linalg``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Generator
from typing import Literal

import torch

from abliterate.edits.thin_linalg import range_basis, small_svd, wide_svd

Method = Literal["rank1", "norm_preserving"]
METHODS: tuple[str, ...] = ("rank1", "norm_preserving")
_OVERSAMPLE = 8
_POWER_ITERATIONS = 2
# Above this many values a 2-D weight's factors are computed without full-size temporaries (``_large_factors``):
# the one-shot norm-preserving delta holds ~4 fp32 copies of the weight, which were the largest GPU allocation
# of a trial on an 8B model (+1.0 GB over the resting 6.8 GB, bench/stage2_trial_profile.py). Smaller weights
# keep the one-shot computation (the same factors up to float rounding either way). 2**23, not 2**24: an 8B
# o_proj (4096 x 4096 = 2**24 values) takes the steps too, so that on a GPU its small factorizations join the
# trial's batched ones (``batched_factors``) instead of four host round trips of its own.
_LARGE_ABOVE = 1 << 23


def _canonical(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """fp32 weight with the residual axis second to last ([..., hidden, in])."""
    weight = weight.float()
    return weight.transpose(-2, -1) if transposed else weight


def _low_rank(matrix: torch.Tensor, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(left [m, r], right [r, n])`` with ``left @ right`` ~ best rank-r approximation of ``matrix``."""
    rows, columns = matrix.shape
    sketch_size = min(rank + _OVERSAMPLE, rows, columns)
    if sketch_size == min(rows, columns):
        u, s, vh = small_svd(matrix)
    else:
        basis = range_basis(matrix @ random_probe(seed, columns, sketch_size, matrix.device).to(matrix.dtype))
        for _ in range(_POWER_ITERATIONS):
            basis = range_basis(matrix @ (matrix.T @ basis))
        u_small, s, vh = wide_svd(basis.T @ matrix)
        u = basis @ u_small
    rank = min(rank, s.shape[0])
    return u[:, :rank] * s[:rank], vh[:rank]


def abliteration_factors(
    weight: torch.Tensor,
    direction: torch.Tensor,
    strength: float,
    *,
    method: Method = "rank1",
    rank: int = 3,
    transposed: bool = False,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(left [..., hidden, r], right [..., r, in])`` fp32 with canonical delta ``left @ right``.

    ``weight`` is 2-D or 3-D (fused experts, one edit per expert); ``direction``
    a unit vector of the residual size, or an orthonormal basis ``[k, hidden]`` of a refusal
    subspace (``--directions subspace``: the whole subspace is projected out, a rank-k delta; the
    norm-preserving approximation then uses ``max(rank, k)``); ``strength`` is lambda.
    """
    _check_inputs(weight, direction, method, transposed)
    if takes_large_path(weight):
        return _large_factors(weight, direction, strength, method=method, rank=rank, transposed=transposed, seed=seed)
    canonical = _canonical(weight, transposed)
    v = direction.to(device=canonical.device, dtype=torch.float32)
    if v.ndim == 1:
        projection = torch.einsum("h,...hi->...i", v, canonical).unsqueeze(-2)  # v^T W: [..., 1, in]
        left = (-strength * v).unsqueeze(-1).expand(*canonical.shape[:-2], v.shape[0], 1)  # [..., hidden, 1]
    else:  # an orthonormal basis V [k, hidden] of a subspace: W' = (I - lambda V^T V) W
        projection = torch.einsum("kh,...hi->...ki", v, canonical)  # V W: [..., k, in]
        left = (-strength * v.T).expand(*canonical.shape[:-2], v.shape[1], v.shape[0])  # [..., hidden, k]
        rank = max(rank, v.shape[0])  # the norm-preserving delta of a rank-k edit needs at least rank k
    if method == "rank1":
        return left.contiguous(), projection
    edited = canonical + left @ projection
    row_norms = canonical.norm(dim=-1, keepdim=True)
    edited_norms = edited.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    full_delta = edited * (row_norms / edited_norms) - canonical
    if full_delta.ndim == 2:
        return _low_rank(full_delta, rank, seed)
    pairs = [_low_rank(matrix, rank, seed + index) for index, matrix in enumerate(full_delta)]
    return torch.stack([pair[0] for pair in pairs]), torch.stack([pair[1] for pair in pairs])


def _check_inputs(weight: torch.Tensor, direction: torch.Tensor, method: str, transposed: bool) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if direction.ndim not in (1, 2):
        raise ValueError(f"direction must be [hidden] or a basis [k, hidden], got shape {tuple(direction.shape)}")
    residual = weight.shape[-1] if transposed else weight.shape[-2]
    if residual != direction.shape[-1]:
        raise ValueError(f"direction has {direction.shape[-1]} features, weight's residual axis has {residual}")


def takes_large_path(weight: torch.Tensor) -> bool:
    """Whether ``abliteration_factors`` computes ``weight``'s factors through ``large_factor_steps``."""
    return weight.ndim == 2 and weight.numel() > _LARGE_ABOVE


def _large_factors(
    weight: torch.Tensor, direction: torch.Tensor, strength: float, *, method: Method, rank: int, transposed: bool,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``abliteration_factors`` of a large 2-D weight, with no temporary the size of the weight: its steps
    (``large_factor_steps``), each small factorization answered as soon as it is asked for."""
    steps = large_factor_steps(weight, lambda: weight, direction, strength, method=method, rank=rank,
                               transposed=transposed, seed=seed)
    try:
        request = next(steps)
        while True:
            kind, matrix = request
            request = steps.send(range_basis(matrix) if kind == "basis" else wide_svd(matrix))
    except StopIteration as done:
        return done.value


FactorRequest = tuple[str, torch.Tensor]  # ("basis", tall [n, k]) -> range_basis; ("svd", wide [k, n]) -> wide_svd


def large_factor_steps(
    weight: torch.Tensor, reload: Callable[[], torch.Tensor], direction: torch.Tensor, strength: float, *,
    method: Method, rank: int, transposed: bool, seed: int,
) -> Generator[FactorRequest, object, tuple[torch.Tensor, torch.Tensor]]:
    """The large-weight factors as steps that yield each small factorization they need and return the factors.

    With ``E = W + L P`` (L = -lambda V^T, P = V W) and per-row scales ``s = |W_h| / |E_h|``, the norm-preserving
    delta is ``diag(s - 1) W + diag(s) L P``: the row norms of E follow from |W_h|, ``W P^T`` and ``P P^T``, and
    the randomized SVD only needs the delta's products with thin matrices, which are products of W. The same
    math as the one-shot path, in a few matmuls.

    Why steps: on a GPU each small factorization is a round trip to the host (``thin_linalg``), and a trial's
    edit is dozens of components; ``batched_factors`` advances all of them together, one round trip per step for
    all. No reference to the weight is kept across a yield: each later step takes it again from ``reload()``
    (a packed weight is dequantized again, bit for bit the same), so components in lockstep never hold more than
    one full-size weight.
    """
    _check_inputs(weight, direction, method, transposed)
    canonical = _canonical(weight, transposed)  # [hidden, in] fp32 (a view when the weight is fp32 already)
    del weight
    basis = direction.to(device=canonical.device, dtype=torch.float32).reshape(-1, canonical.shape[0])  # [k, hidden]
    projection = basis @ canonical  # [k, in]
    left = (-strength * basis.T).contiguous()  # [hidden, k]
    if method == "rank1":
        return left, projection
    norms = torch.linalg.vector_norm(canonical, dim=-1)
    cross = canonical @ projection.T  # [hidden, k]
    edited_squares = norms.square() + 2 * (left * cross).sum(-1) + ((left @ (projection @ projection.T)) * left).sum(-1)
    del cross
    scale = norms / edited_squares.clamp_min(0).sqrt().clamp_min(1e-12)
    row_factor = (scale - 1).unsqueeze(-1)  # [hidden, 1]
    scaled_left = scale.unsqueeze(-1) * left  # [hidden, k]

    def times(canonical: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # delta @ x
        return row_factor * (canonical @ x) + scaled_left @ (projection @ x)

    def transposed_times(canonical: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # delta^T @ y
        return canonical.T @ (row_factor * y) + projection.T @ (scaled_left.T @ y)

    rank = max(rank, basis.shape[0])
    rows, columns = canonical.shape
    sketch_size = min(rank + _OVERSAMPLE, rows, columns)
    if sketch_size == min(rows, columns):  # nothing to sketch: the exact SVD of the (then thin) delta
        return _low_rank(row_factor * canonical + scaled_left @ projection, rank, seed)
    tall = times(canonical, random_probe(seed, columns, sketch_size, projection.device))
    del canonical
    sketch = yield ("basis", tall)
    for _ in range(_POWER_ITERATIONS):
        canonical = _canonical(reload(), transposed)
        tall = times(canonical, transposed_times(canonical, sketch))
        del canonical
        sketch = yield ("basis", tall)
    canonical = _canonical(reload(), transposed)
    wide = transposed_times(canonical, sketch).T
    del canonical
    u_small, s, vh = yield ("svd", wide)
    u = sketch @ u_small
    rank = min(rank, s.shape[0])
    return u[:, :rank] * s[:rank], vh[:rank]


@functools.lru_cache(maxsize=8)
def random_probe(seed: int, columns: int, sketch_size: int, device: torch.device) -> torch.Tensor:
    """The randomized SVD's fp32 Gaussian probe [columns, sketch_size], drawn on the CPU from ``seed`` (so every
    device draws the same one) and kept: drawing it took 0.7 ms of host time per component, 15% of an 8B
    trial's edit (bench/stage2_trial_profile.py, H200, 2026-12-03). Read only: callers multiply by it."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(columns, sketch_size, generator=generator).to(device)


def abliteration_delta(
    weight: torch.Tensor,
    direction: torch.Tensor,
    strength: float,
    *,
    method: Method = "rank1",
    rank: int = 3,
    transposed: bool = False,
    seed: int = 0,
) -> torch.Tensor:
    """fp32 delta in ``weight``'s own layout: the merged weight is ``(weight.float() + delta).to(weight.dtype)``."""
    if strength == 0.0:
        return torch.zeros_like(weight, dtype=torch.float32)
    left, right = abliteration_factors(
        weight, direction, strength, method=method, rank=rank, transposed=transposed, seed=seed
    )
    delta = left @ right
    return delta.transpose(-2, -1) if transposed else delta
