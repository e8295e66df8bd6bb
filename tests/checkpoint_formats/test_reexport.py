"""Stage 2's re-export path: dequantize -> (edit) -> re-quantize with our codec -> write."""

from __future__ import annotations

import shutil

import torch

from checkpoint_formats import nvfp4
from checkpoint_formats.experts import split_fused
from checkpoint_formats.loader import load_checkpoint
from checkpoint_formats.quantized_tensors import modelopt_nvfp4_tensors
from checkpoint_formats.reader import CheckpointReader
from checkpoint_formats.writer import StreamingCheckpointWriter


def test_split_fused_inverts_the_loader_layout():
    fused = torch.arange(2 * 6 * 4, dtype=torch.float32).reshape(2, 6, 4)
    parts = dict(split_fused("m.experts", "gate_up_proj", fused))
    assert list(parts) == [
        "m.experts.0.gate_proj",
        "m.experts.0.up_proj",
        "m.experts.1.gate_proj",
        "m.experts.1.up_proj",
    ]
    assert torch.equal(parts["m.experts.1.up_proj"], fused[1, 3:])
    assert torch.equal(dict(split_fused("m.experts", "down_proj", fused))["m.experts.0.down_proj"], fused[0])


def test_untouched_weights_requantize_to_the_same_checkpoint(modelopt_checkpoint, tmp_path):
    """Dequantize -> re-quantize reproduces ModelOpt's export (only -0 codes become +0): the codec is bit-exact."""
    path, _ = modelopt_checkpoint("moe_nvfp4")
    model, _ = load_checkpoint(path, dequantize=True)
    params = dict(model.named_parameters())
    weights = {}
    for name, tensor in params.items():
        prefix, _, param = name.rpartition(".")
        if tensor.dim() == 3:
            weights.update(split_fused(prefix, param, tensor))
        elif param == "weight":
            weights[prefix] = tensor
    writer = StreamingCheckpointWriter(tmp_path / "out", max_shard_bytes=30_000)
    with CheckpointReader(path) as original:
        modules = [n[: -len(".weight_scale_2")] for n in original.names() if n.endswith(".weight_scale_2")]
        for module in modules:
            q = nvfp4.quantize_weight(
                weights[module], weight_scale_2=original.get(f"{module}.weight_scale_2"), name=module
            )
            for name, tensor in modelopt_nvfp4_tensors(module, q, original.get(f"{module}.input_scale")).items():
                writer.add(name, tensor)
        writer.close()
        shutil.copy(path / "config.json", tmp_path / "out" / "config.json")
        with CheckpointReader(tmp_path / "out") as written:
            assert sorted(written.names()) == sorted(n for n in original.names() if n.rpartition(".")[0] in modules)
            for module in modules:
                for suffix in ("weight_scale", "weight_scale_2", "input_scale"):
                    a, b = written.get(f"{module}.{suffix}"), original.get(f"{module}.{suffix}")
                    assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), module
                codes = nvfp4.unpack_nibbles(original.get(f"{module}.weight"))
                codes[codes == 8] = 0  # -0 dequantizes to +0
                assert torch.equal(nvfp4.unpack_nibbles(written.get(f"{module}.weight")), codes), module
