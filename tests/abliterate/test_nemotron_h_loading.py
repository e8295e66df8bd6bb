"""NemotronH NVFP4 and W4A16-NVFP4 checkpoints (ModelOpt's exports; ``backbone.*`` on disk) load and edit in stage 2."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from abliterate.architectures import discover
from checkpoint_formats.loader import load_checkpoint
from checkpoint_formats.exclusions import repair_exclusions
from tests.checkpoint_formats.modelopt_checkpoints import modelopt_export
from tests.tiny_models import nemotron_h_hybrid

pytest.importorskip("modelopt.torch.quantization")
EDITABLE = {"model.layers.0.mixer.out_proj", "model.layers.1.mixer.o_proj", "model.layers.2.mixer.down_proj",
            "model.layers.3.mixer.experts", "model.layers.3.mixer.shared_experts.down_proj"}


@pytest.fixture(scope="module", params=["NVFP4_DEFAULT_CFG", "W4A16_NVFP4_CFG"])
def checkpoint(request, tmp_path_factory):
    directory = modelopt_export(nemotron_h_hybrid, tmp_path_factory.mktemp("nemotron") / "ckpt", request.param)
    repair_exclusions(directory)
    return directory


@pytest.mark.parametrize("dequantize", [True, False])
def test_loads_with_every_component_editable(checkpoint, dequantize):
    model, fmt = load_checkpoint(checkpoint, dequantize=dequantize, dtype=torch.float32)
    assert fmt.kind.is_nvfp4
    assert {c.module_name for c in discover(model).components} == EDITABLE
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as tensors:  # the router bias is read, not zeros
        stored = tensors.get_tensor("backbone.layers.3.mixer.gate.e_score_correction_bias")
    assert torch.equal(model.model.layers[3].mixer.gate.e_score_correction_bias, stored.float())
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(1, 9)[None]).logits).all()


def test_lora_edits_every_component(checkpoint):
    from abliterate.edits.lora import LoraAbliterator
    from tests.abliterate.test_edits import PARAMETERS

    from abliterate.edits.plan import plan_edits

    model, _ = load_checkpoint(checkpoint, dequantize=True, dtype=torch.float32)
    architecture = discover(model)
    assert {edit.component.module_name for edit in plan_edits(PARAMETERS, architecture.components)} == EDITABLE
    ids = torch.arange(1, 9)[None]
    directions = torch.nn.functional.normalize(torch.randn(architecture.num_layers + 1, 64,
                                                           generator=torch.Generator().manual_seed(0)), dim=-1)
    with torch.no_grad():
        base = model(ids).logits
        abliterator = LoraAbliterator(model, architecture.components, method="rank1")
        abliterator.apply(PARAMETERS, directions)
        assert (model(ids).logits - base).abs().max() > 0
        abliterator.reset()
        assert torch.equal(model(ids).logits, base)
