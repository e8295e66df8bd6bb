"""Edits: the delta equals the matrix formula, LoRA reproduces it on every layout, reset is exact."""

import copy

import pytest
import torch

from abliterate.architectures import discover
from abliterate.edits.delta import abliteration_delta, abliteration_factors
from abliterate.edits.kernel import KernelParameters, layer_strength
from abliterate.edits.lora import LoraAbliterator
from abliterate.edits.plan import AbliterationParameters, edit_directions, plan_edits
from tests.tiny_models import ALL_MODELS, dense_llama, family_config

PARAMETERS = AbliterationParameters(
    "per_layer", None,
    {"attn": KernelParameters(1.0, 1.0, 0.5, 2.0), "mlp": KernelParameters(1.2, 1.0, 0.3, 3.0)},
)


def _unit(size, seed):
    return torch.nn.functional.normalize(torch.randn(size, generator=torch.Generator().manual_seed(seed)), dim=0)


def test_rank1_delta_equals_explicit_projection_formula():
    weight = torch.randn(64, 40, generator=torch.Generator().manual_seed(1))
    v = _unit(64, 2)
    strength = 0.8
    explicit = (torch.eye(64) - strength * torch.outer(v, v)) @ weight
    torch.testing.assert_close(weight + abliteration_delta(weight, v, strength), explicit, atol=1e-5, rtol=1e-5)
    # With lambda = 1 the edited weight writes nothing along v.
    full = weight + abliteration_delta(weight, v, 1.0)
    assert (v @ full).abs().max() < 1e-5


def test_fused_and_transposed_experts_are_edited_per_expert():
    experts = torch.randn(3, 64, 20, generator=torch.Generator().manual_seed(3))
    v = _unit(64, 4)
    delta = abliteration_delta(experts, v, 1.1)
    for index in range(3):
        torch.testing.assert_close(delta[index], abliteration_delta(experts[index], v, 1.1))
    transposed = experts.transpose(1, 2).contiguous()  # [experts, in, hidden]
    torch.testing.assert_close(abliteration_delta(transposed, v, 1.1, transposed=True), delta.transpose(1, 2))


def test_norm_preserving_keeps_row_norms_at_full_rank_and_approximates_at_low_rank():
    weight = torch.randn(32, 24, generator=torch.Generator().manual_seed(5))
    v = _unit(32, 6)
    full_rank = weight + abliteration_delta(weight, v, 1.0, method="norm_preserving", rank=24)
    torch.testing.assert_close(full_rank.norm(dim=1), weight.norm(dim=1), atol=1e-4, rtol=1e-4)
    left, right = abliteration_factors(weight, v, 1.0, method="norm_preserving", rank=3)
    assert left.shape == (32, 3) and right.shape == (3, 24)
    # Deterministic: the merge recomputes the same factors.
    again = abliteration_factors(weight, v, 1.0, method="norm_preserving", rank=3)
    assert torch.equal(left, again[0]) and torch.equal(right, again[1])


@pytest.mark.parametrize("method", ["rank1", "norm_preserving"])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("subspace", [False, True])
def test_large_weights_get_the_one_shot_delta_without_full_size_temporaries(monkeypatch, method, transposed, subspace):
    """Above the size limit the factors come from products of the weight with thin matrices; the delta is the same."""
    from abliterate.edits import delta as delta_module

    weight = torch.randn(96, 40, generator=torch.Generator().manual_seed(7))  # canonical [hidden 96, in 40]
    stored = weight.T.contiguous() if transposed else weight
    direction = torch.linalg.qr(torch.randn(96, 2, generator=torch.Generator().manual_seed(8))).Q.T if subspace \
        else _unit(96, 8)
    one_shot = abliteration_factors(stored, direction, 0.9, method=method, rank=4, transposed=transposed, seed=3)
    calls = []
    large = delta_module._large_factors
    monkeypatch.setattr(delta_module, "_large_factors", lambda *a, **k: calls.append(1) or large(*a, **k))
    monkeypatch.setattr(delta_module, "_LARGE_ABOVE", 1000)  # 3,840 values: the large-weight path
    factored = abliteration_factors(stored, direction, 0.9, method=method, rank=4, transposed=transposed, seed=3)
    assert calls, "the large-weight path must have run"
    assert [t.shape for t in factored] == [t.shape for t in one_shot]
    torch.testing.assert_close(factored[0] @ factored[1], one_shot[0] @ one_shot[1], atol=1e-5, rtol=1e-4)
    if method == "rank1":  # and the delta is the projection formula itself
        basis = direction.reshape(-1, 96)
        torch.testing.assert_close(factored[0] @ factored[1], -0.9 * basis.T @ (basis @ weight), atol=1e-5, rtol=1e-4)
    else:  # at full rank the rows keep their norms (the norm-preserving property itself)
        full = abliteration_factors(stored, direction, 0.9, method=method, rank=40, transposed=transposed, seed=3)
        edited = weight + full[0] @ full[1]
        torch.testing.assert_close(edited.norm(dim=1), weight.norm(dim=1), atol=1e-4, rtol=1e-4)


def test_layer_kernel_shape():
    kernel = KernelParameters(max_weight=1.2, max_weight_position=4.0, min_weight=0.4, min_weight_distance=2.0)
    assert layer_strength(4, kernel) == pytest.approx(1.2)
    assert layer_strength(3, kernel) == pytest.approx(0.8)
    assert layer_strength(6, kernel) == pytest.approx(0.4)
    assert layer_strength(7, kernel) == 0.0
    assert layer_strength(1, kernel) == 0.0


def _family_model(family):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(family_config(family)).float().eval()


# Fused 3-D experts beside plain Linears also named down_proj (DeepSeek-V3's dense layer 0 and shared_experts,
# Qwen3-Next's shared_expert): PEFT's v5 MoE conversion would retarget those Linears to the experts' parameter.
SHARED_LEAF_NAMES = {family: (lambda family=family: _family_model(family)) for family in ("deepseek_v3", "qwen3_next")}


@pytest.mark.parametrize("method", ["rank1", "norm_preserving"])
@pytest.mark.parametrize("name", sorted(ALL_MODELS) + sorted(SHARED_LEAF_NAMES))
def test_lora_edit_matches_explicit_weights_and_reset_restores_exact_logits(name, method):
    model = {**ALL_MODELS, **SHARED_LEAF_NAMES}[name]()
    architecture = discover(model)
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(ids).logits
    directions = torch.nn.functional.normalize(torch.randn(architecture.num_layers + 1, 64), dim=-1)
    abliterator = LoraAbliterator(model, architecture.components, method=method, rank=3)
    edited_count = abliterator.apply(PARAMETERS, directions)
    assert edited_count == len(plan_edits(PARAMETERS, architecture.components)) > 0
    vectors = edit_directions(PARAMETERS, directions)
    with torch.no_grad():
        edited = model(ids).logits
        for edit in plan_edits(PARAMETERS, architecture.components):
            weight = getattr(reference.get_submodule(edit.component.module_name), edit.component.parameter_name)
            weight.add_(abliteration_delta(weight, vectors[edit.direction_key], edit.strength, method=method, rank=3,
                                           transposed=edit.component.transposed))
        explicit = reference(ids).logits
        assert (edited - base).abs().max() > 1e-3  # the edit does something
        torch.testing.assert_close(edited, explicit, atol=2e-5, rtol=1e-4)
        abliterator.reset()
        assert torch.equal(model(ids).logits, base)


@pytest.mark.parametrize("family", sorted(SHARED_LEAF_NAMES))
def test_every_down_proj_beside_fused_experts_gets_its_own_lora(family):
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import ParamWrapper

    model = SHARED_LEAF_NAMES[family]()
    components = discover(model).components
    linears = [c.module_name for c in components if c.num_experts is None and c.module_name.endswith("down_proj")]
    fused = [c.module_name for c in components if c.num_experts is not None]
    assert linears and fused, "the tiny config has both kinds"
    LoraAbliterator(model, components, method="rank1")
    assert all(isinstance(model.get_submodule(name), LoraLinear) for name in linears)
    assert all(isinstance(model.get_submodule(name), ParamWrapper) for name in fused)
    # exactly one adapter layer each: the experts are not wrapped a second time by the Linears' injection
    assert not any(isinstance(model.get_submodule(name).get_base_layer(), ParamWrapper) for name in fused)


def test_nan_components_are_skipped_and_counted():
    """(Weights on the meta device are edited through their offload hook or refused: tests/abliterate/test_multi_device.py.)"""
    model = dense_llama(layers=3)
    architecture = discover(model)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    abliterator = LoraAbliterator(model, architecture.components, method="rank1")
    reasons = sorted((s.component.module_name, s.reason) for s in abliterator.skipped)
    assert reasons == [("model.layers.0.mlp.down_proj", "NaN/inf weights")]
    assert len(abliterator.components) == len(architecture.components) - 1


def test_the_finiteness_check_reads_every_block_of_rows(monkeypatch):
    """The check runs a block of rows at a time (GPU memory): an inf in the last block is still found."""
    from abliterate.edits import lora

    monkeypatch.setattr(lora, "_FINITE_CHECK_ROWS", 2)
    model = dense_llama(layers=3)
    architecture = discover(model)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[-1, 3] = float("inf")  # the last row, far past the first block
    abliterator = LoraAbliterator(model, architecture.components, method="rank1")
    assert [s.component.module_name for s in abliterator.skipped] == ["model.layers.1.mlp.down_proj"]


@pytest.mark.parametrize("name", sorted(ALL_MODELS))
def test_the_gpus_lockstep_edit_writes_the_adapter_the_one_by_one_edit_writes(name, monkeypatch):
    """On a GPU a trial's in-place components go through batched_factors together; forced here on the CPU
    (with the large-weight steps for every 2-D weight), the adapter holds the same factors, bit for bit."""
    from abliterate.edits import delta as delta_module

    monkeypatch.setattr(delta_module, "_LARGE_ABOVE", 100)
    adapters = []
    for lockstep in (False, True):
        model = ALL_MODELS[name]()
        architecture = discover(model)
        directions = torch.nn.functional.normalize(torch.randn(architecture.num_layers + 1, 64,
                                                               generator=torch.Generator().manual_seed(3)), dim=-1)
        abliterator = LoraAbliterator(model, architecture.components, method="norm_preserving", rank=3)
        monkeypatch.setattr(LoraAbliterator, "_in_place_on_gpu", lambda self, component, on=lockstep: on)
        abliterator.apply(PARAMETERS, directions)
        adapters.append({key: value.clone() for key, value in model.state_dict().items() if "lora" in key})
    assert adapters[0].keys() == adapters[1].keys() and adapters[0]
    assert any(value.abs().max() > 0 for value in adapters[0].values())
    for key, value in adapters[0].items():
        assert torch.equal(adapters[1][key], value), key
