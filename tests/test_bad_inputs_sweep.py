"""Issue 14's sweep: every traceback, unclear message and silently accepted bad value it found, one case each.

Each case feeds the bad input to the code a user's command runs and asserts a UserError that names the
file / field / flag and says how to fix it (or, for a fault such as a full disk, the plain message).
"""

from __future__ import annotations

import errno
import io
import json
import shutil
import struct
from pathlib import Path

import pytest

from foundation.errors import UserError

REPO = Path(__file__).resolve().parents[1]
TESTBED = REPO / "testbed" / "model"
CORPUS = REPO / "datasets_yaml" / "corpora" / "general_text.jsonl"
LATIN1_LINE = b'{"text": "un caf\xe9 au lait, s\'il vous pla\xeet, with enough words to be a sample"}\n'


@pytest.fixture(autouse=True)
def isolated_datasets_cache(tmp_path_factory, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "hf_datasets_cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def tokenizer():
    from tests.quantize.calibration.tiny_tokenizer import tiny_tokenizer

    return tiny_tokenizer()


def build(mix: Path, tokenizer):
    from quantize.calibration.build import build_calibration_set

    return build_calibration_set(mix, tokenizer, max_samples=4, console=_quiet())


def _quiet():
    from rich.console import Console

    return Console(file=io.StringIO())


def mix_file(tmp_path: Path, entry: str, calibration: str = "") -> Path:
    path = tmp_path / "mix.yaml"
    path.write_text(f"datasets:\n  - {entry}\n" + (f"calibration:\n  {calibration}\n" if calibration else ""))
    return path


# --- stage 1: the calibration mix -------------------------------------------------------------------------------

@pytest.mark.parametrize(("entry", "calibration", "field", "words"), [
    (f"path: {CORPUS}\n    weight: .inf", "", "field 'weight'", "finite number"),                  # T: Fraction('inf')
    (f"path: {CORPUS}\n    weight: true", "", "field 'weight'", "finite number"),                  # accepted as 1.0
    (f"path: {CORPUS}\n    split: validation", "", "field 'split'", "one split, 'train'"),         # read train silently
    (f"path: {CORPUS}", "max_seq_len: 1", "field 'max_seq_len'", ">= 8"),                          # flag and YAML agree
    (f"path: {CORPUS}", "oversample_ratio: .inf", "field 'oversample_ratio'", "finite"),
])
def test_bad_mix_values_are_refused_naming_the_field(tmp_path, entry, calibration, field, words):
    from quantize.calibration.schema import load_mix

    with pytest.raises(UserError) as caught:
        load_mix(mix_file(tmp_path, entry, calibration))
    assert field in caught.value.where and words in caught.value.problem
    assert caught.value.fix


def test_max_seq_len_flag_and_mix_share_one_limit(tmp_path):
    from pydantic import ValidationError

    from quantize.calibration.schema import CalibrationSettings
    from quantize.settings import QuantizeSettings

    for model, values in ((QuantizeSettings, {"input_model": "m"}), (CalibrationSettings, {"min_token_length": 4})):
        with pytest.raises(ValidationError, match="greater than or equal to 8"):
            model.model_validate({**values, "max_seq_len": 7})
        assert model.model_validate({**values, "max_seq_len": 8}).max_seq_len == 8



def test_latin1_corpus_names_the_file_line_and_conversion(tmp_path, tokenizer):
    corpus = tmp_path / "latin1.jsonl"
    corpus.write_bytes(b'{"text": "fine"}\n' + LATIN1_LINE)
    with pytest.raises(UserError) as caught:
        build(mix_file(tmp_path, f"path: {corpus}"), tokenizer)
    error = caught.value
    assert "field 'path'" in error.where and "not UTF-8" in error.problem and "line 2" in error.problem
    assert "iconv" in error.fix


def test_empty_jsonl_says_empty_not_stopiteration(tmp_path, tokenizer):
    corpus = tmp_path / "empty.jsonl"
    corpus.write_text("\n")
    with pytest.raises(UserError) as caught:
        build(mix_file(tmp_path, f"path: {corpus}"), tokenizer)
    assert "is empty" in caught.value.problem and "StopIteration" not in str(caught.value)


def test_mix_yaml_in_latin1_is_an_encoding_problem_not_indentation(tmp_path):
    from quantize.calibration.schema import load_mix

    path = tmp_path / "mix.yaml"
    path.write_bytes(b"datasets:\n  - path: caf\xe9.jsonl\n")
    with pytest.raises(UserError) as caught:
        load_mix(path)
    assert "not UTF-8" in caught.value.problem and "line 2" in caught.value.problem
    assert "indentation" not in str(caught.value)


def test_formatter_whose_column_is_missing_suggests_columns_or_another_formatter(tmp_path, tokenizer):
    with pytest.raises(UserError) as caught:
        build(mix_file(tmp_path, f"path: {CORPUS}\n    formatter: chat_completion"), tokenizer)
    error = caught.value
    assert "field 'formatter'" in error.where and "'messages' not in the dataset" in error.problem
    assert "columns:" in error.fix and "raw_text" in error.fix and "set formatter to existing column" not in error.fix


# --- stage 1: the model, the flags, the output ----------------------------------------------------------------------

def damaged_copy(tmp_path: Path, damage: str) -> Path:
    model = tmp_path / f"model-{damage}"
    shutil.copytree(TESTBED, model)
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "header":
        data[12] = 0xFF
    else:  # a header length of 2^40
        data[:8] = struct.pack("<Q", 2**40)
    weights.write_bytes(bytes(data))
    return model


def quantize_error(argv: list[str], monkeypatch) -> UserError:
    import quantize.stage
    from quantize import cli

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(quantize.stage, "load_model", refuse)
    monkeypatch.setattr(quantize.stage, "load_tokenizer", refuse)
    with pytest.raises(UserError) as caught:
        cli.main(argv)
    return caught.value


@pytest.mark.parametrize(("damage", "words"), [("truncated", "is truncated"), ("header", "not valid safetensors JSON"),
                                               ("huge", "header claims 1,099,511,627,776 bytes")])
def test_damaged_safetensors_fail_both_stages_before_loading(tmp_path, monkeypatch, damage, words):
    from abliterate.loading import load_model

    model = damaged_copy(tmp_path, damage)
    error = quantize_error(["--input_model", str(model), "--output_model", str(tmp_path / "out"), "--device", "cpu"],
                           monkeypatch)
    assert error.where == "--input_model" and words in error.problem and "model.safetensors" in error.problem
    with pytest.raises(UserError) as caught:
        load_model(str(model), dtypes=["float32"], device_map="cpu")
    assert caught.value.where == "--model" and words in caught.value.problem


def test_missing_tokenizer_message_is_whole(tmp_path, monkeypatch):
    model = tmp_path / "no-tokenizer"
    shutil.copytree(TESTBED, model, ignore=shutil.ignore_patterns("tokenizer*", "chat_template*"))
    error = quantize_error(["--input_model", str(model), "--output_model", str(tmp_path / "out")], monkeypatch)
    assert "has no tokenizer" in error.problem and "tokenizer.json" in error.problem and "copy the tokenizer" in error.fix


def test_cut_off_load_errors_keep_their_whole_text():
    from quantize.source_model import _load_error

    error = _load_error("m", ValueError("Couldn't instantiate the backend tokenizer from one of: \n(1) a file, \n(2) x"))
    assert error.problem.endswith("from one of: (1) a file, (2) x")


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_output_that_is_or_lies_under_a_file_is_refused_before_loading(tmp_path, monkeypatch, where):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    output = blocker if where == "file" else blocker / "sub"
    error = quantize_error(["--input_model", str(TESTBED), "--output_model", str(output), "--device", "cpu"], monkeypatch)
    assert "already exists" not in error.problem
    assert ("is an existing file, not a directory" if where == "file" else "is a file, so no directory") in error.problem


def test_read_only_output_parent_is_refused_before_loading(tmp_path, monkeypatch):
    import os

    real_mkdir = os.mkdir

    def read_only(path, *args, **kwargs):
        if Path(path).parent == tmp_path:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", read_only)
    error = quantize_error(["--input_model", str(TESTBED), "--output_model", str(tmp_path / "out"), "--device", "cpu"],
                           monkeypatch)
    assert error.where == str(tmp_path / "out") and "Read-only file system" in error.problem


def test_skip_layers_covering_every_module_is_refused():
    from quantize.skip_layers import check_something_left, resolve_user_skips

    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj",
             "model.layers.0.mlp.down_proj", "lm_head"]
    with pytest.raises(UserError) as caught:
        check_something_left(resolve_user_skips(["*"], names), names)
    assert caught.value.where == "--skip_layers" and "nothing left to quantize" in caught.value.problem
    check_something_left(resolve_user_skips(["*down_proj"], names), names)  # a partial skip is fine


@pytest.mark.parametrize(("raised", "flag", "words"), [
    (AssertionError("detected nan values in amax"), "--input_model", "NaN or inf"),
    (RuntimeError("no weight quantizer is enabled"), "--skip_layers", "no weight quantizer"),
])
def test_modelopt_assertions_become_user_errors(monkeypatch, raised, flag, words):
    import sys
    import types

    from quantize import calibrate

    fake = types.ModuleType("modelopt.torch.quantization")

    def quantize(model, config, forward_loop):
        raise raised

    fake.quantize = quantize
    parent, torch_pkg = types.ModuleType("modelopt"), types.ModuleType("modelopt.torch")
    parent.torch, torch_pkg.quantization = torch_pkg, fake
    for name, module in {"modelopt": parent, "modelopt.torch": torch_pkg, "modelopt.torch.quantization": fake}.items():
        monkeypatch.setitem(sys.modules, name, module)
    with pytest.raises(UserError) as caught:
        calibrate.calibrate(object(), {}, lambda model: None)
    assert caught.value.where == flag and words in caught.value.problem
    with pytest.raises(KeyError):  # anything else stays a traceback (a bug to report)
        monkeypatch.setattr(fake, "quantize", lambda *a: (_ for _ in ()).throw(KeyError("x")))
        calibrate.calibrate(object(), {}, lambda model: None)


@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device", "/data/out/model.safetensors"),
    RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'),
])
def test_full_disk_is_said_plainly(capsys, failure):
    from foundation.guarded_cli import run_guarded

    def command(argv):
        raise failure

    assert run_guarded(command, []) == 2
    printed = capsys.readouterr().err
    assert "no space left on the disk" in printed and "Traceback" not in printed and "free space" in printed


def test_other_failures_keep_their_traceback():
    from foundation.guarded_cli import run_guarded

    with pytest.raises(ZeroDivisionError):
        run_guarded(lambda argv: 1 / 0, [])


# --- stage 2 --------------------------------------------------------------------------------------------------------

def settings_error(*flags: str) -> UserError:
    from abliterate.settings import parse_settings

    with pytest.raises(UserError) as caught:
        parse_settings(["--model", "m", *flags])
    return caught.value


@pytest.mark.parametrize(("flags", "where", "words"), [
    (("--device_map", "banana"), "--device_map", "unknown device_map 'banana'"),
    (("--max_memory", '{"cpu": "80XB"}'), "--max_memory", "'80XB' is not a size"),
    (("--max_memory", '{"gpu": "8GiB"}'), "--max_memory", "unknown device 'gpu'"),
    (("--refusal_markers", "[]"), "--refusal_markers", "list is empty"),
    (("--refusal_markers", '["sorry", " "]'), "--refusal_markers", "blank"),
    (("--compliance_patterns", '["(unclosed"]'), "--compliance_patterns", "not a valid regular expression"),
    (("--torchao_group_size", "100"), "--torchao_group_size", "supports group sizes 32, 64, 128, 256"),
])
def test_bad_stage2_flags_are_refused_before_loading(flags, where, words):
    error = settings_error(*flags)
    assert error.where == where and words in error.problem and not error.problem.startswith("Value error")


def test_good_stage2_flags_still_pass():
    from abliterate.settings import parse_settings

    settings = parse_settings(["--model", "m", "--device_map", "cuda:1", "--max_memory", '{"0": "70GiB", "cpu": "200GB"}',
                               "--torchao_group_size", "64", "--compliance_patterns", '["^Sure"]'])
    assert settings.device_map == "cuda:1" and settings.torchao_group_size == 64


def test_device_map_cuda_without_a_gpu(monkeypatch):
    import torch

    from abliterate.loading import load_model

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError) as caught:
        load_model(str(TESTBED), dtypes=["float32"], device_map="cuda")
    assert caught.value.where == "--device_map" and "no CUDA GPU" in caught.value.problem


def test_unknown_model_type_is_not_blamed_on_the_dtypes(tmp_path):
    from abliterate.loading import load_model

    model = tmp_path / "unknown"
    shutil.copytree(TESTBED, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "llamazz"}))
    with pytest.raises(UserError) as caught:
        load_model(str(model), dtypes=["float32", "bfloat16"], device_map="cpu")
    assert "model_type 'llamazz'" in caught.value.problem and "--dtypes" not in caught.value.fix


def test_nan_weight_in_stage2_names_the_tensor(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from abliterate.loading import load_model

    model = tmp_path / "nan"
    shutil.copytree(TESTBED, model)
    tensors = load_file(model / "model.safetensors")
    name = "model.layers.2.self_attn.o_proj.weight"
    tensors[name][0, 0] = float("nan")
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    torch.manual_seed(0)
    with pytest.raises(UserError) as caught:
        load_model(str(model), dtypes=["float32"], device_map="cpu")
    assert name in caught.value.problem and "--dtypes" not in caught.value.fix


def test_torchao_group_size_that_does_not_divide_the_model():
    from transformers import AutoConfig

    from abliterate.loading import check_group_size_fits
    from abliterate.quantization.options import QuantizationRequest

    config = AutoConfig.from_pretrained(TESTBED)  # hidden 128, MLP 384
    with pytest.raises(UserError) as caught:
        check_group_size_fits(config, QuantizationRequest("torchao_int4_weight_only", 256))
    assert caught.value.where == "--torchao_group_size" and "--torchao_group_size 128" in caught.value.fix
    check_group_size_fits(config, QuantizationRequest("torchao_int4_weight_only", 128))


def spec_with(tmp_path: Path, **overrides) -> Path:
    prompts = tmp_path / "p.jsonl"
    if not prompts.exists():
        prompts.write_text('{"prompt": "hello"}\n')
    body = {name: str(prompts) for name in ("harmful_train", "harmless_train", "harmful_test", "harmless_test")}
    body.update(overrides)
    path = tmp_path / "spec.yaml"
    path.write_text(json.dumps(body))  # JSON is YAML
    return path


@pytest.mark.parametrize(("overrides", "field", "words"), [
    ({"refusal_markers": []}, "refusal_markers", "list is empty"),
    ({"compliance_patterns": ["Sure[", "ok"]}, "compliance_patterns", "not a valid regular expression"),
])
def test_bad_prompt_spec_values(tmp_path, overrides, field, words):
    from abliterate.evaluation.prompt_sets import load_prompt_spec

    with pytest.raises(UserError) as caught:
        load_prompt_spec(spec_with(tmp_path, **overrides))
    assert field in caught.value.where and words in caught.value.problem


@pytest.mark.parametrize(("content", "words"), [
    (b'{"prompt": "fine"}\n' + LATIN1_LINE.replace(b'"text"', b'"prompt"'), "not UTF-8"),
    (b'{"prompt": "fine"}\n{"prompt": "  "}\n', "is empty"),
])
def test_bad_prompt_files(tmp_path, content, words):
    from abliterate.evaluation.prompt_sets import load_prompt_spec

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    with pytest.raises(UserError) as caught:
        load_prompt_spec(spec_with(tmp_path, harmful_test=str(bad)))
    assert "bad.jsonl" in str(caught.value) and words in caught.value.problem


def test_recalibrate_scratch_lives_in_the_export_temporary(tmp_path, monkeypatch):
    """A --recalibrate run killed mid-way left <tmp>.merged-bf16 beside the output: the re-run hit FileExistsError."""
    from abliterate.export import recalibrate

    staging = tmp_path / ".tmp-out"
    staging.mkdir()
    leftover = tmp_path / ".tmp-out.merged-bf16"  # what a killed older run left
    leftover.mkdir()
    (leftover / "model.safetensors").write_text("stale")
    seen = {}

    def fake_export(merger, directory, show_progress=True):
        seen["merged"] = directory
        raise KeyboardInterrupt  # killed while writing the bf16 copy

    monkeypatch.setattr(recalibrate, "export_full_precision", fake_export)
    with pytest.raises(KeyboardInterrupt):
        recalibrate.recalibrated_export(object(), tmp_path, staging, dataset_yaml=None)
    assert not leftover.exists() and seen["merged"].parent == staging and not seen["merged"].exists()


def test_two_searches_of_one_study_the_loser_gets_a_message(tmp_path):
    import optuna

    from abliterate.search.objectives import TrialMetrics
    from abliterate.search.space import suggest_parameters
    from abliterate.search.study import open_study, run_trials

    journal = tmp_path / "journal.log"
    study = open_study(journal, "s")
    other = open_study(journal, "s")  # the second process, on the same journal
    metrics = TrialMetrics(refusals=1, n_harmful=2, compliance=1, kl=0.1, kl_first_token=0.0, seconds=0.0)

    def evaluate(parameters):
        for running in other.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            other.tell(running.number, [0.0, 0.0])  # the other process finishes the same trial first
        return metrics

    with pytest.raises(UserError) as caught:
        run_trials(study, suggest=lambda trial: suggest_parameters(trial, 6, ["attn", "mlp"]), evaluate=evaluate,
                   base=metrics, n_trials=2, n_startup_trials=1, seed=0, kl_target=0.01)
    assert "another process is running the same search" in caught.value.problem and "re-run" in caught.value.fix


# --- pipelines ------------------------------------------------------------------------------------------------------

def pipeline_file(tmp_path: Path, stages: str) -> Path:
    path = tmp_path / "pipe.yaml"
    path.write_text(f"name: t\nmodel: {TESTBED}\noutput_dir: {tmp_path / 'out'}\nstages:\n{stages}")
    return path


def test_unknown_stage_entry_key_lists_the_stage_entry_keys(tmp_path):
    from pipelines.spec import load_pipeline

    with pytest.raises(UserError) as caught:
        load_pipeline(pipeline_file(tmp_path, "  - name: quantize\n    setings: {format: nvfp4}\n"))
    assert "stages.0.setings" in caught.value.where and "name, settings" in caught.value.fix
    assert "top-level" not in caught.value.fix


def test_yaml_tag_in_set_says_safe_load_blocked_it(tmp_path):
    from pipelines.runner import apply_overrides
    from pipelines.spec import load_pipeline

    spec = load_pipeline(pipeline_file(tmp_path, "  - abliterate: {device_map: cpu}\n"))
    with pytest.raises(UserError) as caught:
        apply_overrides(spec, ["abliterate.n_trials=!!python/object/apply:os.system [echo]"])
    assert caught.value.where.startswith("--set") and "safe_load" in caught.value.problem


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_pipeline_output_dir_that_is_or_lies_under_a_file(tmp_path, where):
    from pipelines.runner import prepare_output_dir

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(UserError) as caught:
        prepare_output_dir(blocker if where == "file" else blocker / "sub", overwrite=False)
    assert "file" in caught.value.problem and blocker.read_text() == "x"
