"""Stage 1: --overwrite never deletes the input (S9); pickle-only weights are refused (security 5)."""

from __future__ import annotations

import shutil

import pytest
import torch

from foundation.errors import UserError
from tests.quantize.conftest import quantize_args
from tests.quantize.test_cli_errors import cli_error, no_model_load  # noqa: F401 - fixture


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    copy = tmp_path / "models" / "M"
    shutil.copytree(tiny_model_dir, copy)
    return copy


@pytest.mark.parametrize("where", ["same", "parent", "inside"])
def test_overwrite_never_replaces_the_source_model(model_copy, mix_yaml, no_model_load, where):  # noqa: F811
    files = {path.name: path.read_bytes() for path in model_copy.iterdir()}
    output = {"same": model_copy, "parent": model_copy.parent, "inside": model_copy / "nvfp4"}[where]
    error = cli_error(quantize_args(model_copy, mix_yaml, output, "--overwrite"))
    assert error.where == f"--output_model {output}"
    assert "the input --input_model" in error.problem and str(model_copy) in error.problem
    assert "--overwrite" in error.problem
    assert {path.name: path.read_bytes() for path in model_copy.iterdir()} == files


def test_overwrite_never_deletes_the_calibration_mix(tiny_model_dir, tmp_path, mix_yaml, no_model_load):  # noqa: F811
    mix = tmp_path / "data" / "mix.yaml"
    mix.parent.mkdir()
    shutil.copy(mix_yaml, mix)
    error = cli_error(quantize_args(tiny_model_dir, mix, mix.parent, "--overwrite"))
    assert "contains the input --dataset_yaml" in error.problem and mix.is_file()


def test_a_model_with_only_pickle_weights_is_refused_before_loading(model_copy, mix_yaml, tmp_path, no_model_load):  # noqa: F811
    from safetensors.torch import load_file

    for weights in model_copy.glob("*.safetensors"):
        torch.save(load_file(str(weights)), model_copy / "pytorch_model.bin")
        weights.unlink()
    error = cli_error(quantize_args(model_copy, mix_yaml, tmp_path / "out"))
    assert error.where == f"--input_model {model_copy}"
    assert "only pickle weights (pytorch_model.bin)" in error.problem and "safetensors" in error.fix
    assert not (tmp_path / "out").exists()


def test_from_pretrained_is_told_to_use_safetensors(model_copy, monkeypatch):
    """A Hub id cannot be checked on disk first: transformers itself must never fall back to torch.load."""
    import transformers

    from quantize.source_model import load_model

    seen = {}

    def record(*args, **kwargs):
        seen.update(kwargs)
        raise OSError("stop here")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", record)
    with pytest.raises(UserError):
        load_model(str(model_copy), dtype="bfloat16", revision=None, trust_remote_code=False)
    assert seen["use_safetensors"] is True
