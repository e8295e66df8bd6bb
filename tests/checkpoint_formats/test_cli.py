"""inspect / verify / convert subcommands."""

from __future__ import annotations

import json

import torch

from checkpoint_formats.cli_inspect import summarize
from checkpoint_formats.cli_verify import compare_logits
from checkpoint_formats.reader import CheckpointReader
from pipelines.cli import main as cli_main


def test_inspect_table_counts_and_sizes(modelopt_checkpoint, capsys):
    path, original = modelopt_checkpoint("llama_nvfp4")
    with CheckpointReader(path) as reader:
        rows = {row.module_type: row for row in summarize(reader)}
    q = rows["layers.*.self_attn.q_proj"]
    assert (q.count, q.format) == (2, "nvfp4")
    # packed 64x32 bytes + 64x4 fp8 scales + two float32 scalars, per layer
    assert q.bytes == 2 * (64 * 32 + 64 * 4 + 4 + 4)
    assert q.bf16_bytes == 2 * original["model.layers.0.self_attn.q_proj.weight"].numel() * 2
    assert rows["lm_head"].format == "bf16" and rows["lm_head"].bytes == rows["lm_head"].bf16_bytes
    capsys.readouterr()  # drop the fixture's ModelOpt output
    assert cli_main(["inspect", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "modelopt_nvfp4" and report["producer"] == "modelopt 0.47.0"
    assert report["total_bytes"] == sum(f.stat().st_size for f in path.glob("*.safetensors")) - _header_bytes(path)
    assert 1.5 < report["bf16_bytes"] / report["total_bytes"] < 4
    assert cli_main(["inspect", str(path)]) == 0
    assert "layers.*.mlp.down_proj" in capsys.readouterr().out


def _header_bytes(path) -> int:
    data = (path / "model.safetensors").read_bytes()
    return 8 + int.from_bytes(data[:8], "little")


def test_verify_reports_finite_and_distance(modelopt_checkpoint, capsys):
    for name in ("llama_nvfp4", "moe_nvfp4"):
        path, _ = modelopt_checkpoint(name)
        capsys.readouterr()
        assert cli_main(["verify", str(path), "--tokens", "3"]) == 0
        out = capsys.readouterr().out
        assert "logits finite: yes" in out and "activations simulated" in out and "KL" in out
    assert cli_main(["verify", str(tmp_missing := path / "nope")]) == 2
    assert str(tmp_missing) in capsys.readouterr().err


def test_compare_logits():
    a = torch.randn(2, 5, 11)
    same = compare_logits(a, a)
    assert same.finite and same.max_abs_diff == 0 and abs(same.mean_kl) < 1e-6 and same.top1_agreement == 1
    b = a.clone()
    b[0, 0, 0] = float("nan")
    assert not compare_logits(b, a).finite


def test_convert_cli(modelopt_checkpoint, tmp_path, capsys):
    path, _ = modelopt_checkpoint("llama_nvfp4")
    assert cli_main(["convert", str(path), str(tmp_path / "ct"), "--to", "compressed-tensors"]) == 0
    assert (tmp_path / "ct" / "config.json").exists() and not (tmp_path / "ct" / "hf_quant_config.json").exists()
    assert cli_main(["convert", str(path), str(tmp_path / "ct"), "--to", "compressed-tensors"]) == 2  # exists
    assert "--overwrite" in capsys.readouterr().err
