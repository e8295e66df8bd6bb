"""verify fails a checkpoint that looks fine on one prompt but is broken, the loader refuses stray tensors (issue 14 S1, S3, S4)."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoint_formats.detect import detect_format
from checkpoint_formats.health import missing_activation_scales, nonfinite_tensors
from checkpoint_formats.reader import CheckpointReader
from foundation.errors import UserError
from pipelines.cli import main as cli_main


def _edited_copy(source, destination, edit):
    shutil.copytree(source, destination)
    tensors = load_file(str(destination / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(destination / "model.safetensors"), metadata={"format": "pt"})
    return destination


def _verify_error(path) -> UserError:
    from checkpoint_formats.cli_verify import main

    with pytest.raises(UserError) as caught:
        main([str(path), "--tokens", "2"])
    return caught.value


def test_w4a4_checkpoint_without_input_scales_fails_verify(modelopt_checkpoint, tmp_path, capsys):
    path, _ = modelopt_checkpoint("llama_nvfp4")

    def drop_input_scales(tensors):
        for name in [n for n in tensors if n.endswith(".input_scale")]:
            del tensors[name]

    broken = _edited_copy(path, tmp_path / "no-input-scales", drop_input_scales)
    with CheckpointReader(detect_format(broken)) as reader:
        missing = missing_activation_scales(detect_format(broken), reader)
    assert "model.layers.0.self_attn.q_proj.input_scale" in missing and len(missing) == 14  # 7 Linears x 2 layers
    error = _verify_error(broken)
    assert "quantizes activations" in error.problem and "14 of 14 quantized Linears have no input_scale" in error.problem
    assert "input_scale" in error.where and "calibration data" in error.fix
    capsys.readouterr()
    assert cli_main(["verify", str(broken), "--tokens", "2"]) == 2  # through the CLI: exit 2, no traceback
    assert "no input_scale" in " ".join(capsys.readouterr().err.split())


def test_weight_only_checkpoint_needs_no_input_scale(modelopt_checkpoint, capsys):
    path, _ = modelopt_checkpoint("llama_w4a16_tied")
    with CheckpointReader(detect_format(path)) as reader:
        assert not any(name.endswith(".input_scale") for name in reader.names())
        assert missing_activation_scales(detect_format(path), reader) == []
    capsys.readouterr()
    assert cli_main(["verify", str(path), "--tokens", "2"]) == 0
    assert "weights finite: yes" in capsys.readouterr().out


def test_nan_in_an_embedding_row_the_prompt_never_reads_fails_verify(modelopt_checkpoint, tmp_path):
    path, _ = modelopt_checkpoint("llama_nvfp4")

    def poison(tensors):
        tensors["model.embed_tokens.weight"][120, 3] = float("nan")

    broken = _edited_copy(path, tmp_path / "nan-embedding", poison)
    error = _verify_error(broken)
    assert error.where.endswith("model.embed_tokens.weight") and "NaN/inf in 1 tensor(s)" in error.problem


def test_nonfinite_tensors_names_floating_tensors_only():
    nan_fp8 = torch.zeros(4, dtype=torch.float8_e4m3fn)
    nan_fp8.view(torch.uint8)[1] = 0x7F  # the e4m3fn NaN
    named = [("ok", torch.ones(3)), ("codes", torch.full((2,), 255, dtype=torch.uint8)),
             ("inf", torch.tensor([1.0, float("inf")], dtype=torch.bfloat16)), ("scale", nan_fp8)]
    assert nonfinite_tensors(named) == ["inf", "scale"]


def test_inspect_flags_missing_input_scales(modelopt_checkpoint, tmp_path, capsys):
    import json

    path, _ = modelopt_checkpoint("llama_nvfp4")
    capsys.readouterr()
    assert cli_main(["inspect", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["missing_input_scales"] == []
    broken = _edited_copy(path, tmp_path / "no-scales", lambda t: t.pop("model.layers.1.mlp.up_proj.input_scale"))
    assert cli_main(["inspect", str(broken)]) == 0
    assert "1 quantized Linear(s) lack the input_scale" in " ".join(capsys.readouterr().out.split())


def test_quantized_loader_refuses_a_tensor_that_matches_no_parameter(modelopt_checkpoint, tmp_path):
    from checkpoint_formats.loader import load_checkpoint

    path, _ = modelopt_checkpoint("llama_nvfp4")
    broken = _edited_copy(path, tmp_path / "stray", lambda t: t.update({"model.layers.0.mlp.stray.weight": torch.ones(4)}))
    with pytest.raises(UserError, match=r"match no parameter .*model\.layers\.0\.mlp\.stray\.weight"):
        load_checkpoint(broken, dequantize=True)


def test_quantized_loader_refuses_a_missing_tensor(modelopt_checkpoint, tmp_path):
    from checkpoint_formats.loader import load_checkpoint

    path, _ = modelopt_checkpoint("llama_nvfp4")
    broken = _edited_copy(path, tmp_path / "hole", lambda t: t.pop("model.layers.1.post_attention_layernorm.weight"))
    with pytest.raises(UserError, match=r"not in the checkpoint.*post_attention_layernorm"):
        load_checkpoint(broken, dequantize=True)
