"""`quant-abliterate evaluate`: lm-evaluation-harness on the testbed with the shipped local task, offline, and its errors."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from abliterate.capability.cli import main
from abliterate.capability.settings import EvaluateSettings
from abliterate.capability.tasks import select_tasks
from foundation.errors import UserError

REPO = Path(__file__).resolve().parents[2]
TESTBED = REPO / "testbed" / "model"
FAST = ["--limit", "4", "--device_map", "cpu", "--dtypes", "float32", "--batch_size", "4"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf_datasets_cache"))


@pytest.fixture(scope="module")
def testbed_scores(tmp_path_factory):
    """The CLI run from another working directory (the task's relative data_files must still resolve)."""
    out = tmp_path_factory.mktemp("capability") / "testbed"
    here = Path.cwd()
    try:
        import os

        os.chdir(tmp_path_factory.mktemp("elsewhere"))
        assert main([str(TESTBED), "--tasks", "testbed_heldout", *FAST, "--output", str(out)]) == 0
    finally:
        os.chdir(here)
    return json.loads((out / "capability.json").read_text())


def test_testbed_heldout_perplexity_is_measured_on_the_local_documents(testbed_scores):
    scores = testbed_scores["scores"]["testbed_heldout"]
    # the testbed models its synthetic text well, but not perfectly: a real perplexity, not a constant
    assert 1.5 < scores["word_perplexity"] < 50 and 1.0 < scores["byte_perplexity"] < 3.0
    assert math.isclose(scores["bits_per_byte"], math.log2(scores["byte_perplexity"]), rel_tol=1e-6)
    assert testbed_scores["n_samples"]["testbed_heldout"] == {"original": 100, "effective": 4}
    assert testbed_scores["higher_is_better"]["testbed_heldout"]["word_perplexity"] is False
    assert testbed_scores["source_format"] == "plain" and testbed_scores["dtype"] == "float32"
    assert testbed_scores["task_sources"]["testbed_heldout"].endswith("lm_eval_tasks/testbed_heldout.yaml")
    assert testbed_scores["lm_eval_version"] == "0.4.13"
    assert testbed_scores["settings"]["limit"] == 4


def test_more_documents_change_the_score_and_an_existing_output_needs_overwrite(testbed_scores, tmp_path):
    out = tmp_path / "eight"
    assert main([str(TESTBED), "--tasks", "testbed_heldout", *FAST, "--limit", "8", "-o", str(out)]) == 0
    eight = json.loads((out / "capability.json").read_text())["scores"]["testbed_heldout"]["word_perplexity"]
    assert eight != testbed_scores["scores"]["testbed_heldout"]["word_perplexity"]
    with pytest.raises(UserError, match=r"already exists(.|\n)*--overwrite"):
        main([str(TESTBED), "--tasks", "testbed_heldout", *FAST, "-o", str(out)])


def test_a_task_yaml_path_with_data_next_to_it_runs(tmp_path):
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in
                                                 ["The farmer walks to the library.", "My brother visits the school."]))
    task = tmp_path / "mine.yaml"
    task.write_text("task: my_text\ndataset_path: json\ndataset_kwargs:\n  data_files: {test: docs.jsonl}\n"
                    "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
                    "metric_list:\n  - {metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}\n")
    selection = select_tasks([str(task)])
    assert selection.specs[0]["dataset_kwargs"]["data_files"]["test"] == str(tmp_path / "docs.jsonl")
    assert not selection.builtin  # no index of lm-eval's own 14,000 tasks was built
    out = tmp_path / "out"
    assert main([str(TESTBED), "--tasks", str(task), *FAST, "-o", str(out)]) == 0
    result = json.loads((out / "capability.json").read_text())
    assert result["n_samples"]["my_text"]["effective"] == 2 and result["scores"]["my_text"]["word_perplexity"] > 1


def test_lm_eval_missing_says_which_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    with pytest.raises(UserError, match=r"not installed(.|\n)*pip install 'quant-abliterate\[eval\]'"):
        main([str(TESTBED), "--tasks", "testbed_heldout", *FAST])


def test_bad_model_path_and_bad_flags_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="--model.*does not exist"):
        main([str(tmp_path / "no_model"), "--tasks", "testbed_heldout", *FAST])
    with pytest.raises(UserError, match="--limit.*neither a fraction"):
        main([str(TESTBED), "--tasks", "testbed_heldout", "--limit", "2.5"])
    with pytest.raises(UserError, match="--include_path.*is not a folder"):
        main([str(TESTBED), "--tasks", "testbed_heldout", "--include_path", str(tmp_path / "nowhere")])
    with pytest.raises(UserError, match="task file .*missing.yaml does not exist"):
        main([str(TESTBED), "--tasks", str(tmp_path / "missing.yaml")])
    with pytest.raises(SystemExit):  # argparse: --tasks is required
        main([str(TESTBED)])


def test_tasks_are_split_on_commas_and_deduplicated():
    settings = EvaluateSettings(model="m", tasks=["arc_easy,hellaswag", "arc_easy"])
    assert settings.tasks == ("arc_easy", "hellaswag")
    assert EvaluateSettings(model="m", tasks=["t"], limit=0.25).lm_eval_limit() == 0.25
    assert isinstance(EvaluateSettings(model="m", tasks=["t"], limit=10).lm_eval_limit(), int)


@pytest.mark.slow
def test_unknown_task_name_suggests_the_close_one():
    """A name that is not local is looked up in lm-eval's index of its built-in tasks (the slow part)."""
    with pytest.raises(UserError, match=r"unknown lm-eval task .testbed_heldot.(.|\n)*did you mean 'testbed_heldout'"):
        select_tasks(["testbed_heldot"])


def test_readme_holds_the_generated_flags_table():
    from abliterate.capability.settings import settings_table_markdown

    assert settings_table_markdown() in (REPO / "README.md").read_text()
