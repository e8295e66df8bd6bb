"""QuantizeSettings is the one source of stage 1's flags, help, README table and limits."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from foundation.errors import UserError
from foundation.settings_cli import flags_of
from quantize.calibration.schema import CalibrationSettings, load_mix
from quantize.settings import (
    QuantizeSettings,
    build_parser,
    settings_from_args,
    settings_table_markdown,
)

README = Path(__file__).resolve().parents[2] / "README.md"


def parse(argv: list[str]) -> QuantizeSettings:
    return settings_from_args(build_parser().parse_args(argv))


def test_every_field_is_a_flag_in_help():
    help_text = build_parser().format_help()
    for name, field in QuantizeSettings.model_fields.items():
        for flag in flags_of(name, field):
            assert re.search(rf"{re.escape(flag)}\b", help_text), f"{flag} missing from --help"
    assert "(default: 4)" in help_text  # batch_size's default, read from the model


def test_readme_table_is_the_generated_one():
    assert settings_table_markdown() in README.read_text()


def test_defaults_come_from_the_model(tiny_model_dir):
    settings = parse(["--model", str(tiny_model_dir)])
    defaults = QuantizeSettings(input_model=str(tiny_model_dir))
    assert settings == defaults
    assert settings.output_model == Path("tiny-llama-NVFP4") and settings.batch_size == 4


def test_flag_values_are_converted_and_aliases_kept(tiny_model_dir):
    settings = parse(["--model", str(tiny_model_dir), "--output", "o", "--dtype", "bf16", "--max_samples", "7",
                      "--skip_layers", "a,b", "c", "--trust_remote_code"])
    assert (settings.output_model, settings.dtype, settings.max_samples) == (Path("o"), "bfloat16", 7)
    assert settings.skip_layers == ("a", "b", "c") and settings.trust_remote_code


def test_input_model_from_the_environment(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("INPUT_MODEL", str(tiny_model_dir))
    monkeypatch.setenv("OUTPUT_MODEL", "from-env")
    assert parse([]).output_model == Path("from-env")
    assert parse(["--output_model", "flag"]).output_model == Path("flag")  # a flag wins


@pytest.mark.parametrize(("flag", "value"), [("--min_token_length", "0"), ("--max_seq_len", "4"), ("--seed", "-1"),
                                             ("--max_samples", "0"), ("--oversample_ratio", "0.5"),
                                             ("--kv_cache", "int8"), ("--batch_size", "many")])
def test_a_bad_flag_value_names_its_flag(tiny_model_dir, flag, value):
    with pytest.raises(UserError) as caught:
        parse(["--model", str(tiny_model_dir), flag, value])
    assert caught.value.where == flag


@pytest.mark.parametrize(("key", "value"), [("min_token_length", 0), ("max_seq_len", 4), ("seed", -1)])
def test_mix_files_and_flags_share_their_limits(tmp_path, tiny_model_dir, key, value):
    """One definition: a value refused as a flag is refused in a mix file's calibration: block too."""
    (tmp_path / "a.jsonl").write_text('{"text": "hello"}\n')
    mix = tmp_path / "mix.yaml"
    others = "" if key == "min_token_length" else "\n  min_token_length: 1"
    mix.write_text(f"datasets:\n  - path: a.jsonl\ncalibration:\n  {key}: {value}{others}\n")
    with pytest.raises(UserError, match=key):
        load_mix(mix)
    with pytest.raises(UserError) as caught:
        parse(["--model", str(tiny_model_dir), f"--{key}", str(value)])
    assert caught.value.where == f"--{key}"
    limits = {name: field.metadata for name, field in CalibrationSettings.model_fields.items()}
    assert limits[key], "the calibration limit is written in the schema"


@pytest.mark.skipif(__import__("shutil").which("make") is None, reason="needs make")
@pytest.mark.parametrize(("make_vars", "expected"), [([], "model-NVFP4"), (["FORMAT=w4a8", "MODEL=testbed/model/"], "model-W4A8"),
                                                    (["OUT=elsewhere/q"], "elsewhere/q")])
def test_make_quantize_writes_where_the_cli_would(make_vars, expected, monkeypatch):
    """`make quantize` passes no --output unless OUT is set, so its default is the CLI's own."""
    import shlex
    import subprocess

    monkeypatch.chdir(README.parent)
    for variable in ("INPUT_MODEL", "OUTPUT_MODEL"):
        monkeypatch.delenv(variable, raising=False)
    dry_run = subprocess.run(["make", "-n", "quantize", "STAMP=", *make_vars], capture_output=True, text=True, check=True)
    line = next(line for line in dry_run.stdout.splitlines() if "pipelines.cli quantize" in line)
    argv = shlex.split(line.split("pipelines.cli quantize", 1)[1])
    assert parse(argv).output_model == Path(expected)
