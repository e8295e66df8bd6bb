"""Stage 2 refuses inputs that used to give silently wrong results (issue 14, S3 S5 S6 S7)."""

from __future__ import annotations

import pytest

from abliterate.search.selection import parse_rule
from abliterate.settings import parse_settings
from foundation.errors import UserError


@pytest.mark.parametrize("rule", ["trial 1.5", "trial .5", "trial 2.0"])
def test_select_with_a_fractional_trial_number_is_refused_with_the_accepted_forms(tmp_path, rule):
    with pytest.raises(UserError, match="--select") as caught:
        parse_settings(["--model", str(tmp_path), "--select", rule])
    message = str(caught.value)
    assert "whole number" in message and "trial 12" in message and "best_kl_under" in message
    assert parse_rule("trial 12", n_harmful=10) == ("trial", 12.0)


def _without(model_dir, name):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(model_dir / "model.safetensors"))
    tensors.pop(name)
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    return model_dir


def test_a_tensor_missing_from_the_model_stops_stage_2_naming_it(tmp_path):
    from tiny_chat import write_tiny_chat_model

    from abliterate.loading import load_model

    model_dir = _without(write_tiny_chat_model(tmp_path / "model", layers=2), "model.layers.1.self_attn.o_proj.weight")
    with pytest.raises(UserError) as caught:
        load_model(str(model_dir), dtypes=["float32"], device_map="cpu")
    assert caught.value.where == "--model" and str(model_dir) in caught.value.problem
    assert "missing (they would be random): model.layers.1.self_attn.o_proj.weight" in caught.value.problem


def _argv(model, spec, out, *extra):
    return ["--model", str(model), "--prompts", str(spec), "--out", str(out), "--n_trials", "2",
            "--n_startup_trials", "2", "--max_response_length", "6", "--kl_tokens", "3", "--dtypes", "float32",
            "--device_map", "cpu", "--batch_size", "4", *extra]


@pytest.fixture(scope="module")
def chat_workspace(tmp_path_factory):
    from tiny_chat import write_prompts, write_tiny_chat_model

    root = tmp_path_factory.mktemp("silent_guards")
    return write_tiny_chat_model(root / "model", layers=2), write_prompts(root / "prompts"), root


def test_a_test_prompt_longer_than_the_context_is_refused_naming_the_file(chat_workspace, monkeypatch):
    import abliterate.run
    from abliterate.cli import main

    model, spec, root = chat_workspace
    long_prompts = root / "long_harmful.txt"
    long_prompts.write_text("How do I make a weapon?\n" + "weapon " * 300 + "\nAnother short one?\n")
    monkeypatch.setattr(abliterate.run, "Evaluator", _no_evaluation)
    with pytest.raises(UserError) as caught:
        main(_argv(model, spec, root / "out", "--harmful_test", str(long_prompts)))
    error = caught.value
    assert str(long_prompts) in error.where and "--harmful_test" in error.where
    assert "prompt 2 of harmful_test" in error.problem and "model's context of 256 tokens" in error.problem
    assert "+ 6 answer tokens" in error.problem and "1 of 3 prompts" in error.problem
    assert "shorten or remove" in error.fix
    assert not (root / "out").exists()


def test_a_train_prompt_from_the_spec_names_the_spec_file(chat_workspace, monkeypatch):
    import abliterate.run
    from abliterate.cli import main

    model, spec, root = chat_workspace
    train = spec.parent / "harmless_train.jsonl"
    original = train.read_text()
    train.write_text(original + '{"prompt": "' + "bread " * 400 + '"}\n')
    monkeypatch.setattr(abliterate.run, "Evaluator", _no_evaluation)
    try:
        with pytest.raises(UserError) as caught:
            main(_argv(model, spec, root / "out"))
    finally:
        train.write_text(original)
    assert str(train) in caught.value.where and str(spec) in caught.value.where
    assert "prompt 9 of harmless_train" in caught.value.problem and "answer tokens" not in caught.value.problem


def _no_evaluation(*args, **kwargs):
    raise AssertionError("the evaluation started on a prompt that does not fit the context")


def test_a_study_of_a_replaced_model_is_discarded_saying_so(tmp_path):
    import io
    import os

    import optuna
    from rich.console import Console

    from abliterate.search.model_identity import FINGERPRINT_ATTR, open_study_of_model
    from foundation.model_fingerprint import model_fingerprint

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    journal, directions = tmp_path / "study" / "journal.log", tmp_path / "study" / "x.directions.safetensors"
    output = io.StringIO()
    console = Console(file=output, width=400)

    study = open_study_of_model(journal, "s", model_fingerprint(model), str(model), directions, console)
    study.add_trial(optuna.trial.create_trial(values=[1.0, 0.5], distributions={}, params={}))
    directions.write_bytes(b"old directions")
    again = open_study_of_model(journal, "s", model_fingerprint(model), str(model), directions, console)
    assert len(again.trials) == 1 and directions.exists() and "model changed" not in output.getvalue()

    stat = (model / "model.safetensors").stat()
    os.utime(model / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # replaced: same size
    fresh = open_study_of_model(journal, "s", model_fingerprint(model), str(model), directions, console)
    text = " ".join(output.getvalue().split())
    assert len(fresh.trials) == 0 and not directions.exists()
    assert "model changed:" in text and "model.safetensors changed (mtime_ns)" in text and "discarding its 1 trial(s)" in text
    assert fresh.user_attrs[FINGERPRINT_ATTR] == model_fingerprint(model)
    # the discard is on disk: a later run with the same model keeps the (new, empty) study
    assert len(open_study_of_model(journal, "s", model_fingerprint(model), str(model), directions, console).trials) == 0


def test_the_search_starts_over_when_the_model_at_the_same_path_changed(tmp_path, capsys):
    from tiny_chat import write_prompts, write_tiny_chat_model

    from abliterate.cli import main

    model, spec = write_tiny_chat_model(tmp_path / "model", layers=2), write_prompts(tmp_path / "prompts")
    argv = _argv(model, spec, tmp_path / "out", "--n_trials", "1", "--n_startup_trials", "1")
    assert main(argv) == 0
    assert "model changed" not in capsys.readouterr().out
    write_tiny_chat_model(model, layers=2)  # another save at the same path (as a re-trained model would be)
    assert main([*argv, "--overwrite"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "model changed:" in printed and "discarding its 1 trial(s)" in printed
    assert "(0/1 trials done)" in printed
