"""ModelOpt NVFP4 <-> compressed-tensors NVFP4 conversion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from checkpoint_formats.convert import convert_checkpoint
from checkpoint_formats.detect import FormatKind, detect_format
from checkpoint_formats.loader import load_checkpoint
from foundation.errors import UserError

IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))


def _tensors(path):
    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def _ulps_apart(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a.float().reshape(-1).view(torch.int32) - b.float().reshape(-1).view(torch.int32)).abs().max())


@pytest.mark.parametrize("name", ["llama_nvfp4", "llama_w4a16_tied", "moe_nvfp4"])
def test_round_trip_modelopt_ct_modelopt(modelopt_checkpoint, tmp_path, name):
    src, _ = modelopt_checkpoint(name)
    ct_dir = convert_checkpoint(src, tmp_path / "ct", to="compressed-tensors")
    back = convert_checkpoint(ct_dir, tmp_path / "back", to="modelopt")
    ct_fmt, back_fmt, src_fmt = detect_format(ct_dir), detect_format(back), detect_format(src)
    assert ct_fmt.kind == FormatKind.CT_NVFP4
    assert back_fmt.kind == src_fmt.kind and back_fmt.exclude_modules == src_fmt.exclude_modules
    assert ct_fmt.activations_quantized == src_fmt.activations_quantized
    original, restored = _tensors(src), _tensors(back)
    assert original.keys() == restored.keys()
    for key, tensor in original.items():
        assert restored[key].dtype == tensor.dtype and restored[key].shape == tensor.shape, key
        if key.endswith(("weight_scale_2", "input_scale")):
            # a float32 reciprocal of a reciprocal is within one ulp (exact for ~86% of values)
            assert _ulps_apart(restored[key], tensor) <= 1, key
        else:
            assert torch.equal(restored[key].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), key
    # and back again: CT -> ModelOpt -> CT
    again = _tensors(convert_checkpoint(back, tmp_path / "ct2", to="compressed-tensors"))
    first = _tensors(ct_dir)
    assert all(
        _ulps_apart(again[k], v) <= 1
        if v.dtype == torch.float32
        else torch.equal(again[k].view(torch.uint8), v.view(torch.uint8))
        for k, v in first.items()
    )


def test_matches_compressed_tensors_own_converter(modelopt_checkpoint, tmp_path):
    from compressed_tensors.entrypoints.convert.converters.modelopt_nvfp4 import (
        ModelOptNvfp4Converter,
    )

    src, _ = modelopt_checkpoint("llama_nvfp4")
    fmt = detect_format(src)
    theirs = ModelOptNvfp4Converter(ignore=fmt.exclude_modules, targets=["Linear"]).process(_tensors(src))
    ours = _tensors(convert_checkpoint(src, tmp_path / "ct", to="compressed-tensors"))
    assert ours.keys() == theirs.keys()
    for key, tensor in theirs.items():
        assert torch.equal(
            ours[key].reshape(tensor.shape).view(torch.uint8)
            if tensor.dtype != torch.float32
            else ours[key].reshape(tensor.shape),
            tensor.view(torch.uint8) if tensor.dtype != torch.float32 else tensor,
        ), key
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    expected = ModelOptNvfp4Converter(ignore=fmt.exclude_modules, targets=["Linear"]).update_config(None).model_dump()
    group, expected_group = config["config_groups"]["config_group_0"], expected["config_groups"]["config_group_0"]
    assert group["weights"] == json.loads(json.dumps(expected_group["weights"], default=str))
    assert config["format"] == expected["format"] and config["ignore"] == expected["ignore"]


@torch.no_grad()
def test_converted_checkpoint_loads_to_the_same_logits(modelopt_checkpoint, tmp_path):
    src, _ = modelopt_checkpoint("moe_nvfp4")
    ct_dir = convert_checkpoint(src, tmp_path / "ct", to="compressed-tensors")
    ours_mo, _ = load_checkpoint(src, dequantize=True)
    ours_ct, fmt = load_checkpoint(ct_dir, dequantize=True)
    assert fmt.kind == FormatKind.CT_NVFP4
    a, b = ours_mo(IDS).logits.float(), ours_ct(IDS).logits.float()
    assert (a - b).abs().max() <= 1e-2 * a.abs().max()  # only 1-ulp scale changes differ


def test_refuses_other_formats_and_existing_output(modelopt_checkpoint, tmp_path):
    with pytest.raises(UserError, match="modelopt_fp8"):
        convert_checkpoint(modelopt_checkpoint("llama_fp8")[0], tmp_path / "x", to="compressed-tensors")
    with pytest.raises(UserError, match="modelopt_w4a8"):
        convert_checkpoint(modelopt_checkpoint("llama_w4a8")[0], tmp_path / "y", to="compressed-tensors")
    src, _ = modelopt_checkpoint("llama_nvfp4")
    (tmp_path / "exists").mkdir()
    with pytest.raises(UserError, match="already exists"):
        convert_checkpoint(src, tmp_path / "exists", to="compressed-tensors")
    with pytest.raises(UserError, match="unknown target"):
        convert_checkpoint(src, tmp_path / "z", to="gguf")
    files = sorted(path.name for path in Path(src).iterdir())
    for dst in (src, Path(src).parent):  # --overwrite must never delete the source
        with pytest.raises(UserError, match="the input SRC"):
            convert_checkpoint(src, dst, to="compressed-tensors", overwrite=True)
    assert sorted(path.name for path in Path(src).iterdir()) == files


@torch.no_grad()
def test_transformers_compressed_tensors_loads_our_conversion_identically(modelopt_checkpoint, tmp_path):
    """An independent reader of the CT format (transformers + compressed-tensors) sees the same weights.
    Weight-only on purpose: for W4A4 it would also fake-quantize activations in its forward."""
    from transformers import AutoModelForCausalLM

    src, _ = modelopt_checkpoint("llama_w4a16_tied")
    ct_dir = convert_checkpoint(src, tmp_path / "ct", to="compressed-tensors")
    theirs = AutoModelForCausalLM.from_pretrained(ct_dir, dtype=torch.bfloat16).eval()
    ours, _ = load_checkpoint(ct_dir)
    assert torch.equal(theirs(IDS).logits, ours(IDS).logits)
