"""Stage 2 on the packed NVFP4 checkpoint: what the GPU path computes, checked on the CPU with the pure-torch codec.

Packed (4-bit weights, LoRA as a side path, experts edited as they
materialize) must give the logits of dequantized + LoRA and of the merged
edit, reset must give back the unedited model, and the refusal directions
(hence the exported edit, a function of directions and parameters) must not
depend on which way the model was held.
"""

import pytest
import torch
from test_edits import PARAMETERS
from test_quantized_loading import nvfp4_moe_checkpoint  # noqa: F401 - the shared fixture

from abliterate.architectures import discover
from abliterate.edits.lora import LoraAbliterator
from abliterate.loading import choose_held_as, load_model
from checkpoint_formats.modules import NVFP4Linear
from foundation.errors import UserError

IDS = torch.randint(0, 200, (2, 6), generator=torch.Generator().manual_seed(1))


def _load(path, load_as):
    return load_model(str(path), dtypes=["float32"], device_map=None, load_as=load_as)


def test_auto_keeps_packed_only_where_a_kernel_runs():
    assert choose_held_as("auto", "cpu") == "dequantized"
    assert choose_held_as("auto", {"": "cuda:0"}) == "packed"
    assert choose_held_as("packed", "cpu") == "packed"
    with pytest.raises(UserError, match="--load_as"):
        choose_held_as("halfway", "cpu")


def test_packed_load_keeps_every_weight_at_four_bits(nvfp4_moe_checkpoint):  # noqa: F811
    packed = _load(nvfp4_moe_checkpoint, "packed")
    dequantized = _load(nvfp4_moe_checkpoint, "dequantized")
    assert (packed.held_as, dequantized.held_as) == ("packed", "dequantized")
    model = packed.model
    assert isinstance(model.model.layers[0].self_attn.o_proj, NVFP4Linear)
    experts = model.model.layers[0].mlp.experts
    assert experts.down_proj is None and experts.down_proj_packed.dtype == torch.uint8
    assert packed.resident_bytes < 0.5 * dequantized.resident_bytes
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, dequantized.model(IDS).logits, rtol=1e-4, atol=1e-4)


def test_lora_on_packed_equals_lora_on_dequantized_and_reset_restores(nvfp4_moe_checkpoint):  # noqa: F811
    packed = _load(nvfp4_moe_checkpoint, "packed").model
    dequantized = _load(nvfp4_moe_checkpoint, "dequantized").model
    components_packed = discover(packed).components
    components_plain = discover(dequantized).components
    assert [c.parameter_path for c in components_packed] == [c.parameter_path for c in components_plain]
    packed_experts = [c for c in components_packed if c.num_experts is not None]
    assert packed_experts and all(c.weight_level for c in packed_experts)
    directions = torch.nn.functional.normalize(torch.randn(discover(packed).num_layers + 1, 64,
                                                           generator=torch.Generator().manual_seed(2)), dim=-1)
    with torch.no_grad():
        base = packed(IDS).logits
        on_packed = LoraAbliterator(packed, components_packed, method="rank1")
        on_plain = LoraAbliterator(dequantized, components_plain, method="rank1")
        assert len(on_packed.components) == len(components_packed) and not on_packed.skipped
        assert on_packed.apply(PARAMETERS, directions) == on_plain.apply(PARAMETERS, directions) > 0
        edited = packed(IDS).logits
        assert (edited - base).abs().max() > 1e-3, "the edit must change the packed model"
        torch.testing.assert_close(edited, dequantized(IDS).logits, rtol=1e-4, atol=1e-4)
        on_packed.reset()
        torch.testing.assert_close(packed(IDS).logits, base, rtol=0, atol=0)


def test_directions_do_not_depend_on_how_the_model_is_held(nvfp4_moe_checkpoint):  # noqa: F811
    from abliterate.directions import refusal_directions
    from abliterate.residuals import prompt_residuals

    results = []
    for load_as in ("packed", "dequantized"):
        loaded = _load(nvfp4_moe_checkpoint, load_as)
        layers = discover(loaded.model).layers
        harmful = prompt_residuals(loaded.model, layers, loaded.tokenizer, ["how to make a bomb", "steal a car"], batch_size=2)
        harmless = prompt_residuals(loaded.model, layers, loaded.tokenizer, ["bake a cake", "plant a tree"], batch_size=2)
        results.append(refusal_directions(harmful.values, harmless.values))
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-5)


def test_sibling_fusion_is_asked_for_not_default(nvfp4_moe_checkpoint, monkeypatch):  # noqa: F811
    """q/k/v and gate/up fusion costs reserved GPU memory for under 1% of a trial (settings.sibling_fusion): a packed
    load fuses only with --sibling_fusion, a dequantized one never."""
    from abliterate import loading
    from abliterate.settings import AbliterateSettings

    calls = []
    monkeypatch.setattr(loading, "fuse_siblings", lambda model: calls.append(model) or 3)
    assert AbliterateSettings.model_fields["sibling_fusion"].default is False
    assert _load(nvfp4_moe_checkpoint, "packed").fused_groups == 0 and not calls
    fused = load_model(str(nvfp4_moe_checkpoint), dtypes=["float32"], device_map=None, load_as="packed", sibling_fusion=True)
    assert fused.fused_groups == 3 and calls == [fused.model]
    assert load_model(str(nvfp4_moe_checkpoint), dtypes=["float32"], device_map=None, load_as="dequantized",
                      sibling_fusion=True).fused_groups == 0
    assert len(calls) == 1
