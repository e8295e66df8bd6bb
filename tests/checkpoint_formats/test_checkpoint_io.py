"""Reader, streaming writer, and the errors a damaged checkpoint must produce."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from checkpoint_formats import fp8, nvfp4
from checkpoint_formats.detect import INDEX_FILE, detect_format
from checkpoint_formats.loader import load_checkpoint
from checkpoint_formats.reader import CheckpointReader
from checkpoint_formats.writer import StreamingCheckpointWriter
from foundation.errors import UserError

IDS = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(1))


def _copy_sharded(src, dst, max_shard_bytes=20_000):
    """Re-write a checkpoint through the streaming writer into several shards."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    with CheckpointReader(src) as reader:
        writer = StreamingCheckpointWriter(dst, max_shard_bytes=max_shard_bytes)
        for name, tensor in reader.iter_tensors():
            writer.add(name, tensor)
        return writer.close({"producer": "test"})


def test_writer_shards_and_index_round_trip(modelopt_checkpoint, tmp_path):
    src, _ = modelopt_checkpoint("llama_nvfp4")
    shards = _copy_sharded(src, tmp_path / "sharded")
    assert len(shards) > 2 and all(p.name.endswith(f"-of-{len(shards):05d}.safetensors") for p in shards)
    index = json.loads((tmp_path / "sharded" / INDEX_FILE).read_text())
    assert index["metadata"]["producer"] == "test"
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    original = load_file(str(src / "model.safetensors"))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in original.values())
    with CheckpointReader(tmp_path / "sharded") as reader:
        assert sorted(reader.names()) == sorted(original)
        for name, tensor in original.items():
            assert torch.equal(reader.get(name).reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8))
        assert [len(names) for _, names in reader.iter_shards()] == [len(load_file(str(p))) for p in shards]
    a, _ = load_checkpoint(src)
    b, _ = load_checkpoint(tmp_path / "sharded")
    with torch.no_grad():
        assert torch.equal(a(IDS).logits, b(IDS).logits)


def test_single_shard_is_named_like_modelopt(tmp_path):
    writer = StreamingCheckpointWriter(tmp_path)
    writer.add("a", torch.ones(3))
    assert [p.name for p in writer.close()] == ["model.safetensors"] and not (tmp_path / INDEX_FILE).exists()
    with pytest.raises(ValueError, match="twice"):
        w = StreamingCheckpointWriter(tmp_path / "x")
        w.add("a", torch.ones(1))
        w.add("a", torch.ones(1))


def test_missing_shard_is_a_clear_error(modelopt_checkpoint, tmp_path):
    shards = _copy_sharded(modelopt_checkpoint("llama_nvfp4")[0], tmp_path / "ckpt")
    shards[1].unlink()
    with pytest.raises(UserError, match=f"missing: {shards[1].name}"):
        detect_format(tmp_path / "ckpt")


def test_truncated_and_corrupt_files_are_clear_errors(modelopt_checkpoint, tmp_path):
    src, _ = modelopt_checkpoint("llama_nvfp4")
    truncated = tmp_path / "truncated"
    shutil.copytree(src, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="model.safetensors.*(damaged|incomplete)"):
        load_checkpoint(truncated)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(src, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\xff" * 64 + data[64:])
    with pytest.raises(UserError, match="cannot be opened as safetensors"):
        load_checkpoint(corrupt, dequantize=True)
    broken_json = tmp_path / "json"
    shutil.copytree(src, broken_json)
    (broken_json / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="config.json.*not valid JSON"):
        detect_format(broken_json)


def test_shape_mismatch_names_the_tensor(modelopt_checkpoint, tmp_path):
    src, _ = modelopt_checkpoint("llama_nvfp4")
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    config = json.loads((bad / "config.json").read_text())
    config["intermediate_size"] = 96  # the checkpoint has 128
    (bad / "config.json").write_text(json.dumps(config))
    for dequantize in (True, False):
        with pytest.raises(UserError, match=r"model.layers.0.mlp.(gate|up|down)_proj.weight.*shape"):
            load_checkpoint(bad, dequantize=dequantize)


def test_missing_tensor_is_reported(modelopt_checkpoint, tmp_path):
    from safetensors.torch import save_file

    src, _ = modelopt_checkpoint("llama_nvfp4")
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    del tensors["model.norm.weight"]
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(UserError, match="model.norm.weight"):
        load_checkpoint(bad)


def test_our_codecs_reproduce_modelopt_export_from_the_original_weights(modelopt_checkpoint):
    """Re-quantizing the original bf16 weights with the exported global scale gives the exported bytes."""
    for name in ("llama_nvfp4", "moe_nvfp4", "llama_w4a8"):
        path, original = modelopt_checkpoint(name)
        exported = load_file(str(path / "model.safetensors"))
        modules = [n[: -len(".weight_scale_2")] for n in exported if n.endswith(".weight_scale_2")]
        assert modules
        for module in modules:
            if ".experts." in module:
                layer, rest = module.split(".experts.")
                expert, proj = rest.split(".")
                fused = original[f"{layer}.experts.{'down_proj' if proj == 'down_proj' else 'gate_up_proj'}"][
                    int(expert)
                ]
                half = fused.shape[0] // 2
                weight = {"gate_proj": fused[:half], "up_proj": fused[half:], "down_proj": fused}[proj]
            else:
                weight = original[f"{module}.weight"]
            scale = exported[f"{module}.weight_scale"]
            q = nvfp4.quantize_weight(
                weight,
                weight_scale_2=exported[f"{module}.weight_scale_2"],
                block_size=weight.shape[-1] // scale.shape[-1],
            )
            assert torch.equal(q.packed, exported[f"{module}.weight"]), module
            assert torch.equal(q.weight_scale.view(torch.uint8), scale.view(torch.uint8)), module
    path, original = modelopt_checkpoint("llama_fp8")
    exported = load_file(str(path / "model.safetensors"))
    for module in [n[: -len(".weight_scale")] for n in exported if n.endswith(".weight_scale")]:
        q = fp8.quantize_weight(original[f"{module}.weight"])
        assert torch.equal(q.weight_scale, exported[f"{module}.weight_scale"]), module
        assert torch.equal(q.weight.view(torch.uint8), exported[f"{module}.weight"].view(torch.uint8)), module


def test_extra_tensors_stop_the_load_unless_the_model_class_declares_them_optional(modelopt_checkpoint, tmp_path,
                                                                                   caplog, monkeypatch):
    """A stray tensor is a checkpoint that does not match the model: refused, named. Tensors the HF class itself
    declares optional (multi-token-prediction heads it never builds) are skipped with a warning, as from_pretrained does."""
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    from foundation.errors import UserError

    src, _ = modelopt_checkpoint("llama_nvfp4")
    extra = tmp_path / "extra"
    shutil.copytree(src, extra)
    tensors = load_file(str(extra / "model.safetensors"))
    tensors["mtp.layers.0.proj.weight"] = torch.ones(4, 4)
    save_file(tensors, str(extra / "model.safetensors"))
    with pytest.raises(UserError, match="mtp.layers.0.proj.weight"):
        load_checkpoint(extra)
    monkeypatch.setattr(LlamaForCausalLM, "_keys_to_ignore_on_load_unexpected", [r"^mtp\."], raising=False)
    with caplog.at_level("WARNING"):
        model, _ = load_checkpoint(extra)
    assert "mtp.layers.0.proj.weight" in caplog.text
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()