"""End to end on a tiny random chat model: the command runs, resumes, and its output reproduces the edit."""

import json

import pytest
import torch
from tiny_chat import write_prompts, write_tiny_chat_model
from transformers import AutoModelForCausalLM

from abliterate.architectures import discover
from abliterate.artifacts import read_chosen_trial
from abliterate.cli import main
from abliterate.edits.lora import LoraAbliterator
from abliterate.settings import parse_settings


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("abliterate_cli")
    return write_tiny_chat_model(root / "model"), write_prompts(root / "prompts"), root


def _argv(model, spec, out, trials, *extra):
    return ["--model", str(model), "--prompts", str(spec), "--out", str(out), "--n_trials", str(trials),
            "--n_startup_trials", "2", "--max_response_length", "6", "--kl_tokens", "3", "--dtypes", "float32",
            "--device_map", "cpu", "--batch_size", "4", *extra]


def _merged_logits(model_dir, chosen):
    """Test inputs and the logits of the model with the chosen edit merged as the export merges it (edit_tensor)."""
    from abliterate.export.apply_edit import edit_tensor
    from abliterate.export.plan import TensorEdit

    ids = torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    merged = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, weight in merged.named_parameters():
            if name in chosen.edits:
                weight.copy_(edit_tensor(weight, TensorEdit(name, chosen.edits[name]), chosen))
        return ids, merged(ids).logits


def test_command_writes_a_chosen_trial_that_reproduces_the_search_edit(workspace, capsys):
    model_dir, spec, root = workspace
    out = root / "out"
    assert main(_argv(model_dir, spec, out, 3, "--method", "norm_preserving")) == 0
    printed = capsys.readouterr().out
    assert "refused none of the 4 harmful test prompts" in printed  # a random model: zero base refusals
    assert {p.name for p in out.iterdir()} == {"chosen_trial.json", "directions.safetensors", "pareto.png", "pareto_front.json"}

    chosen = read_chosen_trial(out)
    assert chosen.header.trial_number in range(3) and chosen.method == "norm_preserving" and chosen.rank == 3
    # False refusals: counted for the unedited model and the trial, shown in every trial line and the table
    for metrics in (chosen.header.metrics, chosen.header.base_metrics):
        assert isinstance(metrics["false_refusals"], int) and metrics["n_harmless"] == 4
    words = " ".join(printed.split())  # rich wraps long lines at the captured console's width
    assert f"unedited model: refusals 0/4 compliance 0/4 fragments 4 false refusals " \
           f"{chosen.header.base_metrics['false_refusals']}/4" in words
    trials = words.split("editing ", 1)[1].split("Pareto front", 1)[0]
    assert trials.count("false refusals ") == 3  # one per trial line
    assert "false" in words.split("Pareto front", 1)[1]  # the table's column (its header may wrap)
    front = json.loads((out / "pareto_front.json").read_text())
    assert all("false_refusals" in record for record in front)
    assert chosen.edits, "the chosen trial edits something"

    # What the merge does (the export's edit_tensor) equals what the search evaluated (LoRA).
    ids, merged_logits = _merged_logits(model_dir, chosen)
    searched = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    abliterator = LoraAbliterator(searched, discover(searched).components, method="norm_preserving", rank=3, seed=chosen.svd_seed)
    abliterator.apply(chosen.parameters, chosen.directions["refusal_directions"])
    with torch.no_grad():
        torch.testing.assert_close(searched(ids).logits, merged_logits, atol=1e-5, rtol=1e-4)


def test_subspace_directions_run_end_to_end_and_the_merge_reproduces_the_search_edit(workspace, capsys):
    """--directions subspace: rank-k bases saved, a rank-k adapter, its own study; the merge equals the search's edit."""
    model_dir, spec, root = workspace
    out = root / "out_subspace"
    assert main(_argv(model_dir, spec, out, 2, "--method", "rank1", "--directions", "subspace",
                      "--direction_rank", "2")) == 0
    capsys.readouterr()
    chosen = read_chosen_trial(out)
    bases = chosen.directions["refusal_directions"]
    assert bases.ndim == 3 and bases.shape[1] == 2 and chosen.rank == 2
    assert chosen.edits
    ids, merged_logits = _merged_logits(model_dir, chosen)
    searched = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    abliterator = LoraAbliterator(searched, discover(searched).components, method="rank1", direction_rank=2)
    abliterator.apply(chosen.parameters, bases)
    with torch.no_grad():
        torch.testing.assert_close(searched(ids).logits, merged_logits, atol=1e-5, rtol=1e-4)
        # a rank-1 slice of the same bases through the same path differs: the second direction is really used
        abliterator.apply(chosen.parameters, bases[:, :1])
        assert (searched(ids).logits - merged_logits).abs().max() > 1e-6


def test_rerun_continues_the_study_and_select_is_non_interactive(workspace, capsys):
    model_dir, spec, root = workspace
    out = root / "out2"
    assert main(_argv(model_dir, spec, out, 2, "--method", "rank1")) == 0
    capsys.readouterr()
    from foundation.errors import UserError

    with pytest.raises(UserError, match="already exists"):
        main(_argv(model_dir, spec, out, 3, "--method", "rank1"))
    assert main(_argv(model_dir, spec, out, 3, "--method", "rank1", "--overwrite", "--select", "trial 2")) == 0
    printed = capsys.readouterr().out
    assert "reusing" in printed and "(2/3 trials done)" in printed and "trial   2" in printed
    assert "trial   0" not in printed  # finished trials are not run again
    assert json.loads((out / "chosen_trial.json").read_text())["trial_number"] == 2


def test_settings_precedence_cli_over_env_over_config_toml(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.toml").write_text('[abliterate]\nmodel = "from-toml"\nn_trials = 11\nkl_target = 0.5\nseed = 3\n')
    monkeypatch.setenv("QA_N_TRIALS", "22")
    monkeypatch.setenv("QA_KL_TARGET", "0.25")
    settings = parse_settings(["--n_trials", "33"])
    assert (settings.model, settings.n_trials, settings.kl_target, settings.seed) == ("from-toml", 33, 0.25, 3)


def test_readme_settings_table_is_the_settings_model():
    """The README's stage-2 table is generated (python -m abliterate.settings); a new or changed field must show there."""
    from pathlib import Path

    from abliterate.settings import settings_table_markdown

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert "--load_as" in settings_table_markdown()
    assert settings_table_markdown().strip() in readme


def test_values_from_the_environment_are_recorded_in_the_chosen_trial(workspace, monkeypatch, tmp_path):
    model_dir, spec, root = workspace
    monkeypatch.chdir(tmp_path)  # no config.toml here
    monkeypatch.setenv("QA_SEED", "7")
    out = root / "out_env"
    assert main(_argv(model_dir, spec, out, 2)) == 0
    header = read_chosen_trial(out).header
    assert header.settings["seed"] == 7
    assert header.settings_sources == {"seed": "environment QA_SEED"}
