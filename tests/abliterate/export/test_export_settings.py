"""ExportSettings is the one source of the export's flags, help and README table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from abliterate import export_cli
from abliterate.export.settings import ExportSettings, settings_table_markdown
from foundation.errors import UserError
from foundation.settings_cli import flags_of

README = Path(__file__).resolve().parents[3] / "README.md"


def parse(argv: list[str]) -> ExportSettings:
    return export_cli.settings_from_args(export_cli.build_parser().parse_args(argv))


def test_every_field_is_in_help_and_the_readme():
    help_text = export_cli.build_parser().format_help()
    for name, field in ExportSettings.model_fields.items():
        for flag in flags_of(name, field):
            assert re.search(rf"{re.escape(flag)}\b", help_text), f"{flag} missing from --help"
    assert "(default: 0.02)" in help_text
    assert settings_table_markdown() in README.read_text()


def test_flags_map_onto_the_settings():
    settings = parse(["t", "--format", "bf16", "--format", "adapter", "--format", "bf16", "-o", "o", "--no-verify",
                      "--no_progress", "--kl_tolerance", "0.5"])
    assert settings == ExportSettings(trial=Path("t"), formats=("bf16", "adapter"), output=Path("o"), verify=False,
                                      progress=False, kl_tolerance=0.5)
    assert parse(["t"]) == ExportSettings(trial=Path("t"))  # every default from the model


@pytest.mark.parametrize(("argv", "flag"), [(["--format", "int3"], "--format"), (["--refusal_tolerance", "-1"], "--refusal_tolerance"),
                                            (["--kl_tolerance", "x"], "--kl_tolerance")])
def test_a_bad_value_names_its_flag(argv, flag):
    with pytest.raises(UserError) as caught:
        parse(["t", *argv])
    assert caught.value.where == flag
