"""NVFP4 re-export: untouched tensors byte-identical, edited ones equal to ModelOpt's own quantization."""

from __future__ import annotations

import json

import pytest
import torch
from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

from abliterate.export.formats_out import export_nvfp4
from abliterate.export.streaming_merge import StreamingMerger
from tests.abliterate.export.conftest import (
    LAYERS,
    llama_config,
    load_all,
    make_trial,
    moe_config,
    shard_layout,
)


def _bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _modelopt_quantize(weight: torch.Tensor):
    scale_2 = NVFP4QTensor.get_weights_scaling_factor_2(weight)
    block_scale, _ = NVFP4QTensor.get_weights_scaling_factor(weight, 16, scale_2)
    packed = NVFP4QTensor.quantize(weight.clone(), 16, block_scale, scale_2)[0]._quantized_data
    return packed, block_scale, scale_2


@pytest.mark.parametrize("model", ["llama", "moe"])
@pytest.mark.parametrize("source", ["base_model", "dequantized"])
def test_nvfp4_reexport(request, tmp_path, source, model):
    base_dir, stage1_dir = request.getfixturevalue("nvfp4_pair" if model == "llama" else "moe_nvfp4_pair")
    edit = make_trial(llama_config() if model == "llama" else moe_config(), tmp_path / "trial")
    tmp_path = tmp_path / "out"
    tmp_path.mkdir()
    if source == "base_model":
        merger = StreamingMerger.from_directory(base_dir, edit)
    else:
        merger = StreamingMerger.from_directory(stage1_dir, edit, dtype=torch.float32)
    report = export_nvfp4(merger, stage1_dir, tmp_path, show_progress=False)
    original, exported = load_all(stage1_dir), load_all(tmp_path)
    assert exported.keys() == original.keys()
    assert shard_layout(tmp_path) == shard_layout(stage1_dir)
    requantized = set(report["requantized_weights"])
    # Llama: o_proj of layers 1-3 and down_proj of layers 0-3; MoE: o_proj and every expert's down_proj of
    # both layers. No member of a shared-scale group is edited, so nothing else is re-quantized.
    assert requantized == set(merger.plan.edits)
    assert len(requantized) == (2 * LAYERS - 1 if model == "llama" else 2 + 2 * 4)
    replaced = {f"{w}{suffix}" for w in requantized for suffix in ("", "_scale", "_scale_2")}
    for name, tensor in exported.items():
        assert tensor.dtype == original[name].dtype, name
        if name not in replaced:
            assert _bytes(tensor) == _bytes(original[name]), f"{name} not copied bit for bit"
    for weight_name in requantized:
        merged = merger.merged(weight_name)  # the full-precision merged weight the export quantized
        packed, block_scale, scale_2 = _modelopt_quantize(merged)
        assert torch.equal(exported[weight_name], packed), weight_name
        assert torch.equal(exported[f"{weight_name}_scale"].view(torch.uint8), block_scale.view(torch.uint8))
        assert torch.equal(exported[f"{weight_name}_scale_2"], scale_2.float())
        assert not torch.equal(exported[weight_name], original[weight_name]), f"{weight_name} was not edited"
    assert json.loads((tmp_path / "hf_quant_config.json").read_text())["quantization"]["quant_algo"] == "NVFP4"
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["quant_method"] == "modelopt"


def test_edited_fused_projection_keeps_the_group_scale_shared(nvfp4_pair, tmp_path):
    """q/k/v share weight_scale_2 in ModelOpt's export; editing q must re-share it (max) and re-quantize k, v."""
    from abliterate.artifacts import ChosenTrial, EditRecord

    base_dir, stage1_dir = nvfp4_pair
    q_name = "model.layers.0.self_attn.q_proj.weight"
    direction = torch.zeros(64)
    direction[int(load_all(base_dir)[q_name].float().abs().amax(dim=1).argmax())] = 1.0  # the row holding q's max
    record = EditRecord(q_name, 0, "attn", -3.0, "d", None, False)  # strength < 0 amplifies: q's amax grows
    trial = ChosenTrial.from_parts({"method": "rank1", "rank": 1, "svd_seed": 0}, [record], {"d": direction})
    merger = StreamingMerger.from_directory(base_dir, trial)
    report = export_nvfp4(merger, stage1_dir, tmp_path, show_progress=False)
    group = [f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"]
    assert sorted(report["requantized_weights"]) == sorted(group)
    exported, original = load_all(tmp_path), load_all(stage1_dir)
    merged = {name: merger.merged(name) for name in group}
    shared = max(NVFP4QTensor.get_weights_scaling_factor_2(w) for w in merged.values())
    assert shared > original[f"{q_name}_scale_2"]
    for name in group:
        assert torch.equal(exported[f"{name}_scale_2"], shared.float())
        block_scale, _ = NVFP4QTensor.get_weights_scaling_factor(merged[name], 16, shared)
        packed = NVFP4QTensor.quantize(merged[name].clone(), 16, block_scale, shared)[0]._quantized_data
        assert torch.equal(exported[name], packed), name
        assert torch.equal(exported[f"{name}_scale"].view(torch.uint8), block_scale.view(torch.uint8)), name
    other = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(exported[other], original[other])


def test_base_model_of_another_shape_is_refused(nvfp4_pair, tmp_path):
    from foundation.errors import UserError
    from tests.abliterate.export.conftest import save_sharded

    _, stage1_dir = nvfp4_pair
    config = llama_config()
    config.intermediate_size = 256  # same names, other shapes: not the model stage 1 quantized
    save_sharded(config, tmp_path / "other")
    merger = StreamingMerger.from_directory(tmp_path / "other", make_trial(llama_config(), tmp_path / "trial"))
    with pytest.raises(UserError, match="down_proj.weight has shape"):
        export_nvfp4(merger, stage1_dir, tmp_path / "out", show_progress=False)
