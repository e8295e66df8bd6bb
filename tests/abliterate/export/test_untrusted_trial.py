"""A trial folder is data: an edited chosen_trial.json must not be able to make the export run remote code."""

from __future__ import annotations

import json

import pytest

from abliterate.artifacts import read_chosen_trial
from abliterate.export.verify import Tolerance, verify_export
from tests.abliterate.export.conftest import llama_config, make_trial


class Loaded(Exception):
    pass


@pytest.mark.parametrize("flag", [False, True])
def test_remote_code_comes_from_the_export_flag_not_the_trial_file(tmp_path, monkeypatch, flag):
    trial_dir = tmp_path / "trial"
    make_trial(llama_config(), trial_dir)
    header_path = trial_dir / "chosen_trial.json"
    header = json.loads(header_path.read_text())
    header["settings"] = {**(header.get("settings") or {}), "model": "evil/repo", "trust_remote_code": not flag}
    header_path.write_text(json.dumps(header))
    seen = {}

    def fake_load_model(model, **kwargs):
        seen.update(kwargs, model=model)
        raise Loaded

    monkeypatch.setattr("abliterate.loading.load_model", fake_load_model)
    with pytest.raises(Loaded):
        verify_export(read_chosen_trial(trial_dir), tmp_path / "export", Tolerance(), device_map="cpu",
                      trust_remote_code=flag)
    assert seen["trust_remote_code"] is flag, "the value recorded in chosen_trial.json must be ignored"


def test_export_cli_has_its_own_flag_default_off(tmp_path):
    from abliterate.export.settings import ExportSettings

    assert ExportSettings(trial=tmp_path).trust_remote_code is False
