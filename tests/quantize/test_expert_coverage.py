"""Every MoE expert calibrated (--calib_all_experts), and the checks that say when one was not."""

from __future__ import annotations

import io
import json

import pytest
import torch
from rich.console import Console

from foundation.errors import UserError
from quantize.expert_coverage import (
    CoverageRecorder,
    all_experts_call,
    coverage_report,
    enforce_coverage,
    expert_of,
    quantizers_without_statistics,
    route_all_experts,
)
from quantize.recipes import build_quant_config, get_recipe
from tests.quantize.conftest import quantize_args, run_cli
from tests.tiny_models import _build, modulelist_moe, qwen3_moe_config

EXPERTS = 32  # top-1 of 32 experts with 2 samples of <= 8 tokens: pigeonhole leaves experts without a token


def test_expert_of_names_the_expert_in_both_layouts():
    assert expert_of("model.layers.0.mlp.experts.3.down_proj.input_quantizer") == "model.layers.0.mlp.experts.3"
    assert expert_of("model.layers.1.mlp.experts.gate_up_proj_weight_quantizers.7") == "model.layers.1.mlp.experts.7"
    assert expert_of("model.layers.1.mlp.experts.gate_up_proj_input_quantizer") is None  # shared by all experts
    assert expert_of("model.layers.0.mlp.shared_experts.down_proj.input_quantizer") is None
    assert expert_of("model.layers.0.self_attn.q_proj.weight_quantizer") is None


def test_all_experts_call_keeps_the_routers_weights_and_drops_sentinels():
    index = torch.tensor([[2, 0], [1, 3]])  # 3 == num_experts: a dropped slot
    weights = torch.tensor([[0.7, 0.3], [0.6, 0.4]])
    full_index, full_weights = all_experts_call(3, index, weights)
    assert full_index.tolist() == [[0, 1, 2], [0, 1, 2]]
    assert torch.equal(full_weights, torch.tensor([[0.3, 0.0, 0.7], [0.0, 0.6, 0.0]]))


def test_routing_to_every_expert_leaves_the_output_unchanged_and_is_undone():
    model = _build(qwen3_moe_config(num_experts=8, num_experts_per_tok=2))
    experts = model.model.layers[0].mlp.experts
    experts.config._experts_implementation = "eager"  # as ModelOpt forces it while calibrating: one loop step per expert
    calls = []
    experts.act_fn.register_forward_hook(lambda *_: calls.append(1))  # once per expert that runs
    ids = torch.randint(0, 96, (1, 1), generator=torch.Generator().manual_seed(0))  # one token: top-2 runs 2 experts

    def run():
        calls.clear()
        return model(input_ids=ids).logits, len(calls)

    with torch.no_grad():
        reference, experts_run = run()
        with route_all_experts(model) as patched:
            routed, experts_run_patched = run()
        again, experts_run_after = run()
    assert patched == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert (experts_run, experts_run_patched, experts_run_after) == (2, 8, 2)
    torch.testing.assert_close(routed, reference, rtol=0, atol=1e-5)
    assert torch.equal(again, reference) and "forward" not in experts.__dict__


def _calibrate(model, ids, all_experts: bool, format_name: str = "nvfp4"):
    import modelopt.torch.quantization as mtq

    recorder = CoverageRecorder()
    config = build_quant_config(get_recipe(format_name), calib_all_experts=all_experts)
    mtq.quantize(model, config, recorder.wrap(lambda m: m(input_ids=ids), all_experts))
    return coverage_report(model, recorder, all_experts)


@pytest.mark.parametrize("all_experts", [False, True])
def test_fused_qwen3_moe_experts_without_tokens_only_without_the_flag(all_experts):
    model = _build(qwen3_moe_config(num_experts=EXPERTS, num_experts_per_tok=1))
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    report = _calibrate(model, ids, all_experts)
    assert report.experts == 2 * EXPERTS
    if all_experts:
        assert report.experts_without_tokens == []
    else:  # 16 tokens per layer reach at most 16 of 32 experts
        assert len(report.experts_without_tokens) >= 2 * (EXPERTS - 16)
        assert "model.layers.0.mlp.experts." in report.experts_without_tokens[0]
    assert report.quantizers_without_statistics == []


@pytest.mark.parametrize("all_experts", [False, True])
def test_modulelist_experts_use_modelopts_ratio(all_experts):
    model = modulelist_moe()
    for layer in model.model.layers:
        layer.mlp.gate.top_k = 1
    ids = torch.randint(0, 96, (1, 2), generator=torch.Generator().manual_seed(0))  # 2 tokens, 4 experts
    report = _calibrate(model, ids, all_experts)
    assert report.experts == 8
    assert (report.experts_without_tokens == []) is all_experts
    if not all_experts:
        assert len(report.experts_without_tokens) >= 4
    # ModelOpt's own mechanism gives each expert its own input amax (the sibling sync is off)
    amaxes = {float(model.model.layers[0].mlp.experts[e].down_proj.input_quantizer.amax) for e in range(4)}
    assert (len(amaxes) == 4) is all_experts


def test_experts_called_on_no_tokens_still_count_as_uncalibrated():
    """Some MoE code runs every expert, also on an empty token set: the weight quantizer then runs,
    the input quantizer sees nothing, and the expert has no statistics of its own."""
    from tests.tiny_models import ModuleListExperts

    class EveryExpertCalled(ModuleListExperts):
        def forward(self, hidden_states, top_k_index, top_k_weights):
            output = torch.zeros_like(hidden_states)
            for expert_index, expert in enumerate(self):
                token_index, slot = torch.where(top_k_index == expert_index)
                contribution = expert(hidden_states[token_index]) * top_k_weights[token_index, slot, None]
                output.index_add_(0, token_index, contribution.to(output.dtype))
            return output

    model = modulelist_moe()
    for layer in model.model.layers:
        layer.mlp.gate.top_k = 1
        layer.mlp.experts.__class__ = EveryExpertCalled
    report = _calibrate(model, torch.randint(0, 96, (1, 2), generator=torch.Generator().manual_seed(0)), False)
    assert len(report.experts_without_tokens) >= 4


def test_weight_only_experts_need_no_tokens():
    model = _build(qwen3_moe_config(num_experts=EXPERTS, num_experts_per_tok=1))
    report = _calibrate(model, torch.randint(0, 96, (1, 4), generator=torch.Generator().manual_seed(0)), False,
                        format_name="w4a16_nvfp4")
    assert report.experts == 2 * EXPERTS and report.experts_without_tokens == []  # scales come from the weights


def test_quantizer_without_statistics_is_refused_unless_allowed():
    model = _build(qwen3_moe_config(num_experts=4, num_experts_per_tok=2))
    report = _calibrate(model, torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(0)), True)
    assert report.quantizers_without_statistics == []
    model.model.layers[1].mlp.experts.down_proj_input_quantizer.amax = torch.tensor(0.0)
    report.quantizers_without_statistics = quantizers_without_statistics(model)
    assert report.quantizers_without_statistics == ["model.layers.1.mlp.experts.down_proj_input_quantizer"]
    console = Console(file=io.StringIO(), width=300)
    with pytest.raises(UserError) as caught:
        enforce_coverage(report, allow_uncalibrated=False, console=console)
    assert "model.layers.1.mlp.experts.down_proj_input_quantizer" in caught.value.problem
    assert "--allow_uncalibrated" in caught.value.fix
    enforce_coverage(report, allow_uncalibrated=True, console=console)
    assert "without calibration statistics" in console.file.getvalue()


@pytest.fixture(scope="module")
def tiny_moe_dir(tiny_model_dir, tmp_path_factory):
    """Qwen3-MoE, 32 experts top-1, with the tiny Llama's tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = qwen3_moe_config(vocab_size=len(tokenizer), num_experts=EXPERTS, num_experts_per_tok=1,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    model = _build(config).to(torch.bfloat16)
    directory = tmp_path_factory.mktemp("moe") / "tiny-moe"
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _inspect(path) -> dict:
    import contextlib

    from checkpoint_formats.cli_inspect import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([str(path), "--json"]) == 0
    return json.loads(out.getvalue())


@pytest.mark.parametrize("flag", [(), ("--no_calib_all_experts",)])
def test_quantize_cli_on_a_tiny_moe_records_coverage(tiny_moe_dir, mix_yaml, work_dir, flag):
    output = work_dir / f"moe{'-partial' if flag else ''}"
    printed = run_cli(quantize_args(tiny_moe_dir, mix_yaml, output, "--max_samples", "2", "--max_seq_len", "8",
                                    "--min_token_length", "4", "--min_calibration_samples", "1", *flag))
    coverage = json.loads((output / "quantize_manifest.json").read_text())["quantization"]["calibration_coverage"]
    assert coverage["calib_all_experts"] is not bool(flag) and coverage["experts"] == 2 * EXPERTS
    assert coverage["quantizers_without_statistics"] == []
    if flag:
        assert len(coverage["experts_without_tokens"]) >= 2 * (EXPERTS - 16)
        assert "received no calibration token" in printed and coverage["experts_without_tokens"][0] in printed
    else:
        assert coverage["experts_without_tokens"] == [] and "no calibration token" not in printed
    sanity = _inspect(output)["expert_scales"]
    assert sanity == {"experts": 2 * EXPERTS, "zero_or_default_input_scale": 0, "zero_or_default_weight_scale_2": 0,
                      "examples": {"input_scale": [], "weight_scale_2": []}}


def test_inspect_counts_experts_with_zero_or_default_scales(tiny_moe_dir, mix_yaml, work_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    source = work_dir / "moe"
    if not source.is_dir():
        run_cli(quantize_args(tiny_moe_dir, mix_yaml, source, "--max_samples", "2", "--max_seq_len", "8",
                              "--min_token_length", "4", "--min_calibration_samples", "1"))
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    (shard,) = broken.glob("*.safetensors")
    tensors = load_file(shard)
    tensors["model.layers.0.mlp.experts.5.down_proj.input_scale"] = torch.tensor(0.5 / (6 * 448), dtype=torch.float32)
    tensors["model.layers.1.mlp.experts.2.up_proj.input_scale"] = torch.tensor(0.0, dtype=torch.float32)
    tensors["model.layers.1.mlp.experts.9.gate_proj.weight_scale_2"] = torch.tensor(0.0, dtype=torch.float32)
    save_file(tensors, shard, metadata={"format": "pt"})
    sanity = _inspect(broken)["expert_scales"]
    assert sanity["zero_or_default_input_scale"] == 2 and sanity["zero_or_default_weight_scale_2"] == 1
    assert sanity["examples"]["input_scale"] == ["model.layers.0.mlp.experts.5", "model.layers.1.mlp.experts.2"]
    assert sanity["examples"]["weight_scale_2"] == ["model.layers.1.mlp.experts.9"]


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss", "nemotron_h"])
def test_routing_to_every_expert_across_moe_families(family):
    from tests.tiny_models import family_config, nemotron_h_hybrid, transposed_fused_moe

    builders = {"gpt_oss": transposed_fused_moe, "nemotron_h": nemotron_h_hybrid}
    model = builders[family]() if family in builders else _build(family_config(family))
    ids = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(0))
    unrouted: set[str] = set()
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        with route_all_experts(model, unrouted) as patched:
            routed = model(input_ids=ids).logits
    assert patched and not unrouted
    torch.testing.assert_close(routed, reference, rtol=0, atol=1e-5)
