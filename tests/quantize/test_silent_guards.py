"""Stage 1 stops on inputs that used to give a silently wrong checkpoint (issue 14: S1/S2, S3, S4, S8)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from foundation.errors import UserError
from tests.quantize.conftest import CORPUS, quantize_args


def cli_error(argv: list[str]) -> UserError:
    from quantize import cli

    with pytest.raises(UserError) as caught:
        cli.main(argv)
    return caught.value


@pytest.fixture
def no_model_load(monkeypatch):
    """The calibration data is checked before the (expensive) model load."""
    import quantize.stage

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the calibration data was checked")

    monkeypatch.setattr(quantize.stage, "load_model", refuse)


def _mix(tmp_path: Path, entry: str, calibration: str) -> Path:
    path = tmp_path / "mix.yaml"
    path.write_text(f"datasets:\n  - {entry}\ncalibration: {calibration}\n")
    return path


def test_min_token_length_that_drops_every_sample_stops_naming_the_filter(tiny_model_dir, tmp_path, no_model_load):
    mix = _mix(tmp_path, f"{{name: general, path: {CORPUS}, text_column: text}}",
               "{max_samples: 16, max_seq_len: 4096, min_token_length: 4000}")
    error = cli_error(quantize_args(tiny_model_dir, mix, tmp_path / "out"))
    assert error.where == str(mix)
    assert "only 0 of 16 calibration samples" in error.problem and "no activation scales" in error.problem
    assert "general" in error.problem and "shorter than min_token_length=4000" in error.problem
    assert "max_seq_len=4096" in error.problem
    assert "--min_token_length" in error.fix and "--min_calibration_samples" in error.fix
    assert not (tmp_path / "out").exists()


def test_rows_with_null_text_stop_naming_the_source(tiny_model_dir, tmp_path, no_model_load):
    corpus = tmp_path / "nulls.jsonl"
    corpus.write_text("".join(json.dumps({"text": None}) + "\n" for _ in range(20)))
    mix = _mix(tmp_path, f"{{name: empty-rows, path: {corpus}, text_column: text, formatter: raw_text}}",
               "{max_samples: 16, max_seq_len: 64, min_token_length: 4}")
    error = cli_error(quantize_args(tiny_model_dir, mix, tmp_path / "out"))
    assert "only 0 of 16" in error.problem
    assert "empty-rows (nulls.jsonl)" in error.problem and "20 with no text" in error.problem
    assert "text_column" in error.fix


def test_too_few_samples_stop_below_the_threshold_and_pass_when_the_user_insists(tiny_model_dir, tmp_path, monkeypatch):
    import quantize.stage
    from quantize.settings import QuantizeSettings

    rows = [{"text": " ".join(["word"] * 40)} for _ in range(3)] + [{"text": "hi"} for _ in range(30)]
    corpus = tmp_path / "few.jsonl"
    corpus.write_text("".join(json.dumps(row) + "\n" for row in rows))
    mix = _mix(tmp_path, f"{{name: few, path: {corpus}, text_column: text}}",
               "{max_samples: 16, max_seq_len: 64, min_token_length: 16, oversample_ratio: 2}")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    settings = QuantizeSettings(input_model=str(tiny_model_dir), dataset_yaml=mix, output_model=tmp_path / "o")
    assert quantize.stage.min_calibration_samples(settings, 16) == 8  # default: half the target
    with pytest.raises(UserError, match=r"only 3 of 16 .* fewer than the 8 required") as caught:
        quantize.stage.build_calibration(settings, tokenizer, _console())
    assert "--min_calibration_samples 3" in caught.value.fix
    insisted = settings.model_copy(update={"min_calibration_samples": 3})
    assert len(quantize.stage.build_calibration(insisted, tokenizer, _console())) == 3
    with pytest.raises(UserError, match="--min_calibration_samples"):
        quantize.stage.min_calibration_samples(settings.model_copy(update={"min_calibration_samples": 17}), 16)


def _console():
    from tests.quantize.conftest import quiet_console

    return quiet_console()


def _edited_model(source: Path, destination: Path, edit) -> Path:
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(source, destination)
    tensors = load_file(str(destination / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(destination / "model.safetensors"), metadata={"format": "pt"})
    return destination


def test_a_tensor_missing_from_the_source_stops_stage_1_naming_it(tiny_model_dir, mix_yaml, tmp_path):
    broken = _edited_model(tiny_model_dir, tmp_path / "missing-o-proj",
                           lambda tensors: tensors.pop("model.layers.1.self_attn.o_proj.weight"))
    error = cli_error(quantize_args(broken, mix_yaml, tmp_path / "out", "--device", "cpu"))
    assert error.where == "--input_model" and str(broken) in error.problem
    assert "1 tensor(s) the model needs are missing" in error.problem
    assert "model.layers.1.self_attn.o_proj.weight" in error.problem
    assert not (tmp_path / "out").exists()


def test_an_unexpected_tensor_in_the_source_stops_stage_1(tiny_model_dir, mix_yaml, tmp_path):
    import torch

    broken = _edited_model(tiny_model_dir, tmp_path / "extra",
                           lambda tensors: tensors.update({"model.layers.0.stray.weight": torch.zeros(4)}))
    error = cli_error(quantize_args(broken, mix_yaml, tmp_path / "out", "--device", "cpu"))
    assert "match no parameter" in error.problem and "model.layers.0.stray.weight" in error.problem


def test_nan_in_an_embedding_stops_stage_1_before_calibration(tiny_model_dir, mix_yaml, tmp_path, monkeypatch):
    import quantize.stage

    def poison(tensors):
        tensors["model.embed_tokens.weight"][7, 1] = float("nan")
        tensors["model.layers.0.mlp.up_proj.weight"][0, 0] = float("inf")

    broken = _edited_model(tiny_model_dir, tmp_path / "nan", poison)
    monkeypatch.setattr(quantize.stage, "backend_for", lambda name: _NoCalibration())
    error = cli_error(quantize_args(broken, mix_yaml, tmp_path / "out", "--device", "cpu"))
    assert error.where == "--input_model"
    assert "NaN/inf in 2 weight tensor(s): model.embed_tokens.weight, model.layers.0.mlp.up_proj.weight" in error.problem


class _NoCalibration:
    name, loads_on_gpu = "refuses", False

    def calibrate(self, *args, **kwargs):
        raise AssertionError("calibration started on NaN weights")


def test_offloaded_weights_are_checked_too(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from quantize.source_model import require_finite_weights, stored_parameters
    from tests.tiny_models import llama_config

    model = LlamaForCausalLM(llama_config(vocab_size=64)).to(torch.bfloat16)
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight[2, 2] = float("nan")
    model.save_pretrained(tmp_path / "m")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "cpu"}
    offloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", device_map=device_map, dtype=torch.bfloat16,
                                                     offload_folder=str(tmp_path / "off"))
    assert offloaded.model.layers[1].self_attn.v_proj.weight.device.type == "meta"
    assert len(list(stored_parameters(offloaded))) == len(list(offloaded.named_parameters()))
    with pytest.raises(UserError, match=r"model\.layers\.1\.self_attn\.v_proj\.weight"):
        require_finite_weights(offloaded, "m")


def test_layerwise_checkpoints_are_keyed_by_model_content_and_stale_ones_discarded(tiny_model_dir, mix_yaml, tmp_path):
    import io
    import os
    import shutil
    from types import SimpleNamespace

    from rich.console import Console

    from quantize.backends.modelopt import layerwise_checkpoint_dir
    from quantize.settings import QuantizeSettings

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    settings = QuantizeSettings(input_model=str(model), dataset_yaml=mix_yaml, output_model=tmp_path / "out",
                                offload_folder=tmp_path / "offload", layerwise=True)
    calibration = SimpleNamespace(token_ids_sha256="ab" * 32)
    output = io.StringIO()
    console = Console(file=output, width=400)

    first = Path(layerwise_checkpoint_dir(settings, calibration, console))
    (first / "layer_0000").mkdir()  # what an interrupted run leaves for the resume
    assert Path(layerwise_checkpoint_dir(settings, calibration, console)) == first  # same model: resumes
    assert (first / "layer_0000").is_dir() and "model changed" not in output.getvalue()

    weights = model / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # replaced in place
    second = Path(layerwise_checkpoint_dir(settings, calibration, console))
    text = " ".join(output.getvalue().split())
    assert second != first and not first.exists() and not (second / "layer_0000").exists()
    assert "model changed:" in text and "model.safetensors changed (mtime_ns)" in text and "calibrating every layer again" in text
    # another model's checkpoints in the same offload folder are left alone
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other)
    third = Path(layerwise_checkpoint_dir(settings.model_copy(update={"input_model": str(other)}), calibration, console))
    assert third.is_dir() and second.is_dir()
