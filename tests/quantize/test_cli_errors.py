"""Bad inputs fail fast with a UserError naming the flag, and never leave partial output."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from foundation.errors import UserError
from tests.quantize.conftest import REPO, quantize_args, run_cli


def cli_error(argv: list[str], offload: bool = False) -> UserError:
    from quantize import cli

    with pytest.raises(UserError) as caught:
        cli.main(argv, offload=offload)
    return caught.value


@pytest.fixture
def no_model_load(monkeypatch):
    """Any of these errors must come before the (expensive) model load."""
    import quantize.stage

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(quantize.stage, "load_model", refuse)
    monkeypatch.setattr(quantize.stage, "load_tokenizer", refuse)


@pytest.mark.parametrize(
    ("extra", "flag"),
    [
        (["--format", "int3"], "--format"),
        (["--dtype", "float8"], "--dtype"),
        (["--batch_size", "0"], "--batch_size"),
        (["--max_seq_len", "2"], "--max_seq_len"),
        (["--offload_folder", "off", "--max_gpu_memory", "lots"], "--max_gpu_memory"),
        (["--format", "nvfp4_awq", "--device", "cpu"], "--format"),
        (["--backend", "llmcompressor", "--format", "fp8"], "--format"),
        (["--backend", "llmcompressor", "--layerwise"], "--layerwise"),
    ],
)
def test_bad_flag_values(tiny_model_dir, mix_yaml, tmp_path, no_model_load, extra, flag):
    error = cli_error(quantize_args(tiny_model_dir, mix_yaml, tmp_path / "out", *extra))
    assert error.where == flag
    assert not (tmp_path / "out").exists()


def test_bad_paths(tiny_model_dir, mix_yaml, tmp_path, no_model_load):
    assert cli_error(quantize_args(tmp_path / "nope" / "model", mix_yaml, tmp_path / "out")).where == "--input_model"
    assert cli_error(quantize_args(tmp_path, mix_yaml, tmp_path / "out")).where == "--input_model"  # no config.json
    as_file = cli_error(quantize_args(tiny_model_dir / "config.json", mix_yaml, tmp_path / "out"))
    assert as_file.where == "--input_model" and "is a file, not a model directory" in as_file.problem
    assert cli_error(quantize_args(tiny_model_dir, tmp_path / "missing.yaml", tmp_path / "out")).where == "--dataset_yaml"


def test_existing_output_needs_overwrite(tiny_model_dir, mix_yaml, tmp_path, no_model_load):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    error = cli_error(quantize_args(tiny_model_dir, mix_yaml, tmp_path / "out"))
    assert "--overwrite" in str(error)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_unmatched_skip_pattern(tiny_model_dir, mix_yaml, tmp_path):
    error = cli_error(quantize_args(tiny_model_dir, mix_yaml, tmp_path / "out", "--skip_layers", "*no_such_layer*"))
    assert error.where == "--skip_layers" and "no_such_layer" in error.problem
    assert not (tmp_path / "out").exists()


def test_interrupted_export_leaves_no_output(tiny_model_dir, mix_yaml, tmp_path, monkeypatch):
    import modelopt.torch.export as modelopt_export

    real_export = modelopt_export.export_hf_checkpoint

    def export_then_crash(model, export_dir, **kwargs):
        real_export(model, export_dir=export_dir, **kwargs)
        raise KeyboardInterrupt("simulated interruption after the weights were written")

    monkeypatch.setattr(modelopt_export, "export_hf_checkpoint", export_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run_cli(quantize_args(tiny_model_dir, mix_yaml, tmp_path / "out", "--format", "w4a16_nvfp4"))
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_existing_output(tiny_model_dir, mix_yaml, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.txt").write_text("old")
    run_cli(quantize_args(tiny_model_dir, mix_yaml, tmp_path / "out", "--format", "w4a16_nvfp4", "--overwrite",
                          "--max_samples", "6"))
    assert not (tmp_path / "out" / "stale.txt").exists()
    assert (tmp_path / "out" / "hf_quant_config.json").is_file()
    manifest = json.loads((tmp_path / "out" / "quantize_manifest.json").read_text())
    assert manifest["calibration"]["samples"] == 6  # the flag overrides the mix's max_samples (12)


def test_list_configs_names_every_format():
    from quantize.recipes import FORMATS

    printed = run_cli(["--list_configs"])
    for recipe in FORMATS.values():
        assert recipe.name in printed and recipe.modelopt_config in printed


def test_seed_shim_reads_dotenv_and_reports_the_flag(tmp_path):
    """quantize_nvfp4.py takes INPUT_MODEL from ./.env; a bad one is a clean error, not a traceback."""
    (tmp_path / ".env").write_text(f"INPUT_MODEL={tmp_path}/does/not/exist\n")
    result = subprocess.run([sys.executable, str(REPO / "quantize_nvfp4.py")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--input_model" in result.stderr and "does/not/exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_offload_shim_requires_offload_folder(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "quantize_nvfp4_offload.py"), "--input_model", "x"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--offload_folder" in result.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_device_without_gpu(tiny_model_dir, mix_yaml, tmp_path, no_model_load):
    assert cli_error(quantize_args(tiny_model_dir, mix_yaml, tmp_path / "out", "--device", "cuda")).where == "--device"
