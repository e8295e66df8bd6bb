"""The abliterate command with --quantization: the search runs on the quantized model, the record says so."""

import pytest

from abliterate.artifacts import read_chosen_trial
from abliterate.cli import main
from foundation.errors import UserError
from tests.abliterate.tiny_chat import write_prompts, write_tiny_chat_model

pytest.importorskip("torchao.quantization")


def test_command_searches_a_model_quantized_on_load_and_records_it(tmp_path, capsys):
    model_dir, spec = write_tiny_chat_model(tmp_path / "model", layers=2), write_prompts(tmp_path / "prompts")
    common = ["--model", str(model_dir), "--prompts", str(spec), "--n_trials", "2", "--n_startup_trials", "2",
              "--max_response_length", "4", "--kl_tokens", "2", "--dtypes", "bfloat16", "--device_map", "cpu",
              "--batch_size", "4", "--method", "rank1", "--no-plot"]
    out = tmp_path / "out"
    assert main([*common, "--out", str(out), "--quantization", "torchao_int8_weight_only"]) == 0
    printed = capsys.readouterr().out
    assert "quantized on load: torchao_int8_weight_only" in printed
    chosen = read_chosen_trial(out)
    assert chosen.header.source_format == "plain, quantized on load: torchao_int8_weight_only"
    assert chosen.header.settings["quantization"] == "torchao_int8_weight_only"
    assert chosen.edits and all(name.endswith(".weight") for name in chosen.edits)  # full-precision names for the merge

    # A GPU-only choice stops before loading, naming the option and a fix.
    with pytest.raises(UserError, match="torchao_float8_dynamic") as raised:
        main([*common, "--out", str(tmp_path / "out2"), "--quantization", "torchao_float8_dynamic"])
    assert raised.value.fix and "torchao_float8_weight_only" in raised.value.fix
    assert not (tmp_path / "out2").exists()
