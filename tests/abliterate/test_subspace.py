"""--directions subspace: the rank-k basis, its edit (projection of the whole subspace), rank 1 = today's edit."""

import copy

import pytest
import torch

from abliterate.architectures import discover
from abliterate.directions import interpolated_direction, interpolated_subspace, refusal_directions, refusal_subspaces
from abliterate.edits.delta import abliteration_delta, abliteration_factors
from abliterate.edits.kernel import KernelParameters
from abliterate.edits.lora import LoraAbliterator
from abliterate.edits.plan import AbliterationParameters, edit_directions, plan_edits
from tests.tiny_models import dense_llama


def _residuals(seed, prompts=24, layers=4, hidden=16, offsets=None):
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(prompts, layers, hidden, generator=generator)
    if offsets is not None:  # each third of the prompts shifted along its own direction (three "categories")
        for group, offset in enumerate(offsets):
            values[group::len(offsets)] += offset
    return values


def _orthonormal(k, hidden, seed):
    return torch.linalg.qr(torch.randn(hidden, k, generator=torch.Generator().manual_seed(seed))).Q.T  # [k, hidden]


def test_subspace_rank1_is_the_mean_difference_direction_bit_for_bit():
    harmful, harmless = _residuals(1), _residuals(2)
    for projected in (False, True):
        single = refusal_directions(harmful, harmless, projected=projected)
        bases = refusal_subspaces(harmful, harmless, 1, projected=projected)
        assert bases.shape == (4, 1, 16)
        assert torch.equal(bases[:, 0], single)
        assert torch.equal(refusal_subspaces(harmful, harmless, 4, projected=projected)[:, 0], single)


def test_subspace_is_orthonormal_and_spans_each_category_offset():
    categories = 8.0 * _orthonormal(3, 16, 7)  # three category directions, one per third of the prompts
    harmful = _residuals(3, prompts=60, offsets=list(categories)) * 1.0
    harmless = _residuals(4, prompts=60)
    bases = refusal_subspaces(harmful, harmless, 3)
    for index in range(bases.shape[0]):
        gram = bases[index] @ bases[index].T
        torch.testing.assert_close(gram, torch.eye(3), atol=1e-5, rtol=0)
        # every category offset lies (mostly) inside the found subspace; one direction alone cannot hold all three
        captured = (categories @ bases[index].T).norm(dim=1) / categories.norm(dim=1)
        assert captured.min() > 0.9, captured
        single = (categories @ bases[index, 0]).abs() / categories.norm(dim=1)
        assert single.min() < 0.8, single


def test_projected_subspace_is_orthogonal_to_the_harmless_mean():
    harmful, harmless = _residuals(5) + 3.0, _residuals(6) + 1.0
    bases = refusal_subspaces(harmful, harmless, 3, projected=True)
    harmless_unit = torch.nn.functional.normalize(harmless.mean(dim=0), dim=-1)
    assert (bases @ harmless_unit.unsqueeze(-1)).abs().max() < 1e-5


def test_too_few_prompts_leave_zero_rows_and_bad_rank_is_refused():
    harmful, harmless = _residuals(8, prompts=2), _residuals(9, prompts=2)
    bases = refusal_subspaces(harmful, harmless, 5)
    assert (bases[:, 3:] == 0).all()  # 2 prompts: the mean difference + at most 2 more directions
    broken = _residuals(8, prompts=6)
    broken[:, 2] = float("nan")  # a layer whose residuals are NaN: no direction, and no subspace either
    bases = refusal_subspaces(broken, _residuals(9, prompts=6), 3)
    assert (bases[2] == 0).all() and bases[1].abs().sum() > 0
    with pytest.raises(ValueError, match="rank must be >= 1"):
        refusal_subspaces(harmful, harmless, 0)


def test_subspace_edit_removes_the_whole_subspace_exactly():
    weight = torch.randn(32, 20, generator=torch.Generator().manual_seed(10))
    basis = _orthonormal(3, 32, 11)
    edited = weight + abliteration_delta(weight, basis, 1.0)
    assert (basis @ edited).abs().max() < 1e-5  # nothing written along any basis vector
    explicit = (torch.eye(32) - 0.7 * basis.T @ basis) @ weight
    torch.testing.assert_close(weight + abliteration_delta(weight, basis, 0.7), explicit, atol=1e-5, rtol=1e-5)
    left, right = abliteration_factors(weight, basis, 0.7)
    assert left.shape == (32, 3) and right.shape == (3, 20)
    # transposed storage and fused experts take the same basis
    experts = torch.randn(2, 32, 20, generator=torch.Generator().manual_seed(12))
    delta = abliteration_delta(experts, basis, 0.7)
    torch.testing.assert_close(delta[1], abliteration_delta(experts[1], basis, 0.7))
    torch.testing.assert_close(abliteration_delta(experts.transpose(1, 2), basis, 0.7, transposed=True),
                               delta.transpose(1, 2))


def test_subspace_of_rank1_gives_todays_delta_and_norm_preserving_uses_rank_at_least_k():
    weight = torch.randn(32, 20, generator=torch.Generator().manual_seed(13))
    v = _orthonormal(1, 32, 14)
    for method in ("rank1", "norm_preserving"):
        torch.testing.assert_close(abliteration_delta(weight, v, 0.9, method=method),
                                   abliteration_delta(weight, v[0], 0.9, method=method), atol=1e-6, rtol=1e-6)
    left, right = abliteration_factors(weight, _orthonormal(5, 32, 15), 1.0, method="norm_preserving", rank=3)
    assert left.shape == (32, 5) and right.shape == (5, 20)
    with pytest.raises(ValueError, match=r"\[k, hidden\]"):
        abliteration_delta(weight, torch.zeros(2, 2, 32), 1.0)


def test_interpolated_subspace_keeps_row0_as_the_interpolated_direction_and_stays_orthonormal():
    harmful, harmless = _residuals(16, prompts=40), _residuals(17, prompts=40)
    bases = refusal_subspaces(harmful, harmless, 3)
    for index in (0.0, 1.3, 2.5, 3.0):
        basis = interpolated_subspace(bases, index)
        torch.testing.assert_close(basis[0], interpolated_direction(bases[:, 0], index), atol=1e-6, rtol=0)
        torch.testing.assert_close(basis @ basis.T, torch.eye(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(interpolated_subspace(bases, 2.0), bases[2], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="outside"):
        interpolated_subspace(bases, 3.5)


@pytest.mark.parametrize("scope", ["global", "per_layer"])
def test_lora_subspace_edit_matches_explicit_weights_and_rank1_matches_todays(scope):
    model = dense_llama(layers=3)
    architecture = discover(model)
    reference, single_model = copy.deepcopy(model), copy.deepcopy(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    hidden = model.config.hidden_size
    bases = torch.stack([_orthonormal(3, hidden, 20 + i) for i in range(architecture.num_layers + 1)])
    parameters = AbliterationParameters(scope, 1.6 if scope == "global" else None,
                                        {"attn": KernelParameters(1.0, 1.0, 0.5, 2.0), "mlp": KernelParameters(1.2, 1.0, 0.3, 3.0)})
    with torch.no_grad():
        base = model(ids).logits
    abliterator = LoraAbliterator(model, architecture.components, method="rank1", direction_rank=3)
    assert abliterator.rank == 3
    abliterator.apply(parameters, bases)
    vectors = edit_directions(parameters, bases)
    with torch.no_grad():
        edited = model(ids).logits
        for edit in plan_edits(parameters, architecture.components):
            weight = getattr(reference.get_submodule(edit.component.module_name), edit.component.parameter_name)
            weight.add_(abliteration_delta(weight, vectors[edit.direction_key], edit.strength,
                                           transposed=edit.component.transposed))
        assert (edited - base).abs().max() > 1e-3
        torch.testing.assert_close(edited, reference(ids).logits, atol=2e-5, rtol=1e-4)
        abliterator.reset()
        assert torch.equal(model(ids).logits, base)
        # k = 1 through the subspace path = today's single-direction edit
        abliterator.apply(parameters, bases[:, :1])
        subspace_rank1 = model(ids).logits
        LoraAbliterator(single_model, discover(single_model).components, method="rank1").apply(parameters, bases[:, 0])
        torch.testing.assert_close(subspace_rank1, single_model(ids).logits, atol=1e-6, rtol=1e-6)
