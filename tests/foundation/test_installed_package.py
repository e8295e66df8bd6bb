"""A non-editable install works from any directory with its defaults: the shipped mix, prompt spec and testbed.

The project is installed (no dependencies, no network) into a temporary
folder that is put first on the path of child processes started in another
empty folder, so nothing can be found through the checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(args, cwd, env, timeout=900):
    result = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("install")
    source, site = root / "source", root / "site"
    # A copy, so the build's own folders (build/, *.egg-info) never land in the checkout.
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "outputs", "build", "*.egg-info", "__pycache__", ".whl", ".*cache", ".hypothesis", "tests", "bench"))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--no-build-isolation",
         "--target", str(site), str(source)],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "PIP_NO_CACHE_DIR": "1"},
    )
    assert build.returncode == 0, build.stderr[-3000:]
    workdir = root / "elsewhere"
    workdir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return site, workdir, env


@pytest.mark.slow
def test_installed_copy_ships_its_data_and_is_imported(installed):
    site, workdir, env = installed
    where = _run(["-c", "import quantize, abliterate, foundation.package_data as p; "
                        "print(quantize.__file__); print(p.packaged('datasets_yaml/offline_mix.yaml'))"], workdir, env)
    module_file, mix = where.stdout.split()
    assert module_file.startswith(str(site)) and mix.startswith(str(site)) and Path(mix).is_file()
    assert (site / "testbed" / "model" / "model.safetensors").is_file()
    assert (site / "datasets_yaml" / "prompts" / "harmful_test.jsonl").is_file()
    assert (site / "datasets_yaml" / "lm_eval_tasks" / "testbed_heldout.yaml").is_file()  # evaluate's local task


@pytest.mark.slow
def test_quantize_and_abliterate_run_with_defaults_from_another_directory(installed):
    site, workdir, env = installed
    model = site / "testbed" / "model"
    _run(["-m", "pipelines.cli", "quantize", "--input_model", str(model), "--output_model", "q", "--device", "cpu",
          "--max_samples", "8", "--max_seq_len", "64"], workdir, env)
    assert json.loads((workdir / "q" / "hf_quant_config.json").read_text())["quantization"]["quant_algo"] == "NVFP4"
    manifest = json.loads((workdir / "q" / "quantize_manifest.json").read_text())
    assert manifest["calibration"]["mix_file"].startswith(str(site))
    _run(["-m", "pipelines.cli", "abliterate", "--model", "q", "--device_map", "cpu", "--n_trials", "2",
          "--n_startup_trials", "2", "--out", "a", "--cpu_threads", "1"], workdir, env)
    assert (workdir / "a" / "chosen_trial.json").is_file()
