"""--algorithm and the MLP / experts-only presets: configs ModelOpt accepts, refusals before the model load,
and what runs on a CPU (every algorithm with FP8; max with NVFP4) run for real."""

from __future__ import annotations

import json

import pytest

from foundation.errors import UserError
from quantize.recipes import (
    ALGORITHMS,
    FORMATS,
    build_quant_config,
    check_device_supports,
    get_recipe,
    offered_algorithms,
)
from tests.quantize.conftest import quantize_args, run_cli
from tests.quantize.test_cli_errors import cli_error, no_model_load  # noqa: F401 - the fixture is used by name


def test_every_algorithm_and_preset_names_a_real_modelopt_config():
    import modelopt.torch.quantization as mtq

    for algorithm in ALGORITHMS.values():
        if algorithm.source is not None:
            value = getattr(mtq, algorithm.source)["algorithm"]
            assert (value if isinstance(value, str) else value["method"]) == algorithm.name
    for name in ("nvfp4_mlp_only", "nvfp4_omlp_only", "nvfp4_experts_only"):
        assert isinstance(getattr(mtq, FORMATS[name].modelopt_config), dict)
    assert "svdquant" not in offered_algorithms() and "gptq" in offered_algorithms()


@pytest.mark.parametrize(("format_name", "algorithm"), [
    (format_name, algorithm) for algorithm in offered_algorithms() for format_name in FORMATS
    if (ALGORITHMS[algorithm].formats is None or format_name in ALGORITHMS[algorithm].formats) and format_name != "nvfp4_awq"
])
def test_algorithm_configs_validate_in_modelopt(format_name, algorithm):
    import typing

    from modelopt.torch.quantization import config as modelopt_config

    config = build_quant_config(get_recipe(format_name), algorithm=algorithm, calib_all_experts=True)
    modelopt_config.QuantizeConfig(**config)
    (config_class,) = [cls for cls in vars(modelopt_config).values() if isinstance(cls, type)
                       and issubclass(cls, modelopt_config.QuantizeAlgorithmConfig)
                       and typing.get_args(cls.model_fields["method"].annotation) == (algorithm,)]
    validated = config_class(**config["algorithm"])  # ModelOpt's own check of every field we set
    assert validated.method == algorithm and validated.moe_calib_experts_ratio == 1.0
    weight_types = {entry["cfg"]["block_sizes"]["type"] for entry in config["quant_cfg"]
                    if "weight_quantizer" in entry["quantizer_name"] and isinstance(entry.get("cfg"), dict)
                    and isinstance(entry["cfg"].get("block_sizes"), dict)}
    if ALGORITHMS[algorithm].static_fp4_weights and FORMATS[format_name].fp4_weights:
        assert weight_types == {"static"}  # as ModelOpt's NVFP4_W4A4_WEIGHT_MSE_FP8_SWEEP_CFG: the FP8 scale sweep
    elif FORMATS[format_name].fp4_weights:
        assert weight_types == {"dynamic"}


def test_mse_on_nvfp4_matches_modelopts_own_preset():
    import modelopt.torch.quantization as mtq

    config = build_quant_config(get_recipe("nvfp4"), algorithm="mse")
    assert config == mtq.NVFP4_W4A4_WEIGHT_MSE_FP8_SWEEP_CFG


def test_gpu_only_pairs_are_refused_without_cuda():
    for algorithm in ("mse", "awq_full", "gptq", "local_hessian"):
        with pytest.raises(UserError) as caught:
            check_device_supports(get_recipe("nvfp4"), cuda_available=False, algorithm=algorithm)
        assert caught.value.where == "--algorithm" and "CUDA" in caught.value.problem and "fp8" in caught.value.fix
        check_device_supports(get_recipe("nvfp4"), cuda_available=True, algorithm=algorithm)
    check_device_supports(get_recipe("fp8"), cuda_available=False, algorithm="gptq")
    check_device_supports(get_recipe("nvfp4_mlp_only"), cuda_available=False, algorithm="max")


@pytest.mark.parametrize(("extra", "flag", "words"), [
    (["--algorithm", "mse", "--device", "cpu"], "--algorithm", "needs a CUDA GPU"),
    (["--algorithm", "fastest"], "--algorithm", "unknown algorithm"),
    (["--algorithm", "svdquant"], "--algorithm", "NVFP4_SVD"),
    (["--algorithm", "awq_full", "--format", "fp8"], "--algorithm", "NVFP4 W4A4 formats"),
    (["--algorithm", "mse", "--format", "nvfp4_awq"], "--algorithm", "awq_lite already"),
    (["--algorithm", "gptq", "--format", "fp8", "--layerwise"], "--layerwise", "max"),
    (["--algorithm", "mse", "--backend", "llmcompressor"], "--algorithm", "ModelOpt algorithm"),
    (["--format", "nvfp4_experts_only", "--device", "cpu"], "--format", "has none"),
])
@pytest.mark.usefixtures("no_model_load")
def test_refusals_come_before_the_model_load(tiny_model_dir, mix_yaml, tmp_path, extra, flag, words):
    error = cli_error(quantize_args(tiny_model_dir, mix_yaml, tmp_path / "out", *extra))
    assert error.where == flag and words in error.problem, error
    assert not (tmp_path / "out").exists()


def test_list_configs_shows_the_algorithms():
    printed = run_cli(["--list_configs"])
    for name in ALGORITHMS:
        assert name in printed
    assert "nvfp4_experts_only" in printed and "not offered" in printed


@pytest.mark.parametrize("algorithm", ["mse", "gptq"])
def test_fp8_with_another_algorithm_runs_on_cpu(tiny_model_dir, mix_yaml, work_dir, algorithm):
    output = work_dir / f"fp8-{algorithm}"
    run_cli(quantize_args(tiny_model_dir, mix_yaml, output, "--format", "fp8", "--algorithm", algorithm,
                          "--device", "cpu", "--max_samples", "4"))
    manifest = json.loads((output / "quantize_manifest.json").read_text())
    assert manifest["quantization"]["algorithm"] == algorithm
    assert json.loads((output / "hf_quant_config.json").read_text())["quantization"]["quant_algo"] == "FP8"


def test_mlp_only_keeps_attention_in_bf16(tiny_model_dir, mix_yaml, work_dir):
    import torch

    from tests.quantize.conftest import load_tensors

    output = work_dir / "mlp-only"
    run_cli(quantize_args(tiny_model_dir, mix_yaml, output, "--format", "nvfp4_mlp_only", "--device", "cpu",
                          "--max_samples", "4"))
    tensors = load_tensors(output)
    assert tensors["model.layers.0.mlp.down_proj.weight"].dtype == torch.uint8
    assert tensors["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert "model.layers.0.self_attn.q_proj.weight_scale" not in tensors
    manifest = json.loads((output / "quantize_manifest.json").read_text())
    assert manifest["quantization"]["algorithm"] == "max"
    assert manifest["quantization"]["calibration_coverage"]["experts"] == 0
