"""The streaming merge equals the in-memory PEFT merge, tensor for tensor, without building the model."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from abliterate.edits.delta import abliteration_delta, abliteration_factors
from abliterate.export.formats_out import export_full_precision
from abliterate.export.streaming_merge import StreamingMerger
from foundation.errors import UserError
from tests.abliterate.export.conftest import (
    LAYERS,
    llama_config,
    load_all,
    make_trial,
    moe_config,
    shard_layout,
)


def _peft_merged_state(model_dir, trial) -> dict[str, torch.Tensor]:
    """Reference: the whole model in memory, the edit as a PEFT LoRA per component, merge_and_unload."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    modules = [name.removesuffix(".weight") for name in trial.edits]
    config = LoraConfig(r=trial.rank, lora_alpha=trial.rank, target_modules=modules, lora_dropout=0.0)
    peft_model = get_peft_model(model, config)
    for module in modules:
        record = trial.edits[f"{module}.weight"]
        layer = peft_model.base_model.model.get_submodule(module)
        left, right = abliteration_factors(layer.base_layer.weight, trial.directions[record.direction], record.strength,
                                           method=trial.method, rank=trial.rank, seed=trial.svd_seed)
        assert layer.lora_A["default"].weight.shape == right.shape  # copy_ would broadcast a smaller factor
        layer.lora_A["default"].weight.data.copy_(right)
        layer.lora_B["default"].weight.data.copy_(left)
    merged = peft_model.merge_and_unload()
    return {name: tensor.detach() for name, tensor in merged.state_dict().items()}


@pytest.mark.parametrize("method", ["rank1", "norm_preserving"])
def test_streaming_merge_equals_peft_merge_and_unload(llama_dir, tmp_path, method):
    trial = make_trial(llama_config(), tmp_path / "trial", method=method)
    out = tmp_path / "out"
    out.mkdir()
    merger = StreamingMerger.from_directory(llama_dir, trial)
    assert len(merger.source.shards) > 3  # really sharded
    export_full_precision(merger, out, show_progress=False)
    streamed = load_all(out)
    reference = _peft_merged_state(llama_dir, trial)
    original = load_all(llama_dir)
    assert streamed.keys() == original.keys()
    edited = set(merger.edited_names)
    # layer 0's o_proj has strength 0: untouched; every down_proj and o_proj 1..3 edited.
    assert "model.layers.0.self_attn.o_proj.weight" not in edited
    assert len(edited) == 2 * LAYERS - 1
    for name, tensor in streamed.items():
        assert tensor.dtype == reference[name].dtype, name
        assert torch.equal(tensor, reference[name]), name
        assert torch.equal(tensor, original[name]) == (name not in edited), name


@pytest.mark.parametrize("method", ["rank1", "norm_preserving"])
def test_subspace_edit_streaming_merge_equals_peft_merge(llama_dir, tmp_path, method):
    """--directions subspace: a rank-3 basis per layer merges exactly as the rank-3 LoRA the search evaluated."""
    trial = make_trial(llama_config(), tmp_path / "trial", method=method, subspace_rank=3)
    assert trial.rank == 3 and all(vector.shape == (3, trial.directions[key].shape[-1])
                                   for key, vector in trial.directions.items() if key.startswith("layer."))
    out = tmp_path / "out"
    out.mkdir()
    merger = StreamingMerger.from_directory(llama_dir, trial)
    export_full_precision(merger, out, show_progress=False)
    streamed, reference, original = load_all(out), _peft_merged_state(llama_dir, trial), load_all(llama_dir)
    for name, tensor in streamed.items():
        assert torch.equal(tensor, reference[name]), name
        assert torch.equal(tensor, original[name]) == (name not in set(merger.edited_names)), name


def test_fused_experts_are_edited_per_expert(moe_dir, tmp_path):
    """On disk one tensor per expert, in memory one 3-D parameter: every expert is edited like the fused one."""
    edit = make_trial(moe_config(), tmp_path / "trial")
    tmp_path = tmp_path / "out"
    tmp_path.mkdir()
    merger = StreamingMerger.from_directory(moe_dir, edit)
    expert_names = [n for n in merger.plan.edits if ".experts." in n]
    assert len(expert_names) == 2 * 4  # 2 layers x 4 experts, none skipped
    export_full_precision(merger, tmp_path, show_progress=False)
    streamed = load_all(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.bfloat16)
    for layer_index, layer in enumerate(model.model.layers):
        fused = layer.mlp.experts.down_proj.detach()
        record = edit.edits[f"model.layers.{layer_index}.mlp.experts.down_proj"]
        delta = abliteration_delta(fused, edit.directions[record.direction], record.strength)
        expected = (fused.float() + delta).to(fused.dtype)
        for expert in range(fused.shape[0]):
            got = streamed[f"model.layers.{layer_index}.mlp.experts.{expert}.down_proj.weight"]
            torch.testing.assert_close(got, expected[expert], rtol=0, atol=0)
            assert not torch.equal(got, fused[expert])


def test_component_missing_on_disk_is_an_error(llama_dir, tmp_path):
    import shutil

    from safetensors.torch import save_file

    broken = tmp_path / "broken"
    shutil.copytree(llama_dir, broken)
    name = "model.layers.2.mlp.down_proj.weight"
    shard = broken / shard_layout(broken)[name]
    tensors = load_file(str(shard))
    tensors["model.layers.2.mlp.renamed.weight"] = tensors.pop(name)
    save_file(tensors, str(shard))
    index_path = broken / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.2.mlp.renamed.weight"] = index["weight_map"].pop(name)
    index_path.write_text(json.dumps(index))
    with pytest.raises(UserError, match="model.layers.2.mlp.down_proj"):
        StreamingMerger.from_directory(broken, make_trial(llama_config(), tmp_path / "trial"))
