"""Our servability check: real ModelOpt exports pass once repaired, and each rule catches its own corruption."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoint_formats.servability import check_servable, require_servable
from foundation.errors import UserError
from checkpoint_formats.exclusions import repair_exclusions, strip_sentinel
from tests.checkpoint_formats.modelopt_checkpoints import corrupted_copy, modelopt_export
from tests.tiny_models import dense_llama, nemotron_h_hybrid

pytest.importorskip("modelopt.torch.quantization")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("servability")
    raw = modelopt_export(nemotron_h_hybrid, root / "nemotron-raw")
    repaired = corrupted_copy(raw, root / "nemotron")
    repair_exclusions(repaired)
    w4a16 = modelopt_export(nemotron_h_hybrid, root / "nemotron-w4a16", "W4A16_NVFP4_CFG")
    repair_exclusions(w4a16)
    llama = modelopt_export(lambda: dense_llama(layers=2), root / "llama")
    return {"raw": raw, "nemotron": repaired, "w4a16": w4a16, "llama": llama}


def _rules(path):
    return {problem.rule for problem in check_servable(path)}


def _edit_tensors(path, edit):
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def _edit_json(path, name, edit):
    document = json.loads((path / name).read_text())
    edit(document)
    (path / name).write_text(json.dumps(document))


def test_repaired_modelopt_exports_are_servable(exports):
    for name in ("nemotron", "w4a16", "llama"):
        assert check_servable(exports[name]) == [], name
        require_servable(exports[name])


def test_modelopt_nemotron_bug_is_caught_then_repaired(exports):
    raw = check_servable(exports["raw"])
    assert {p.rule for p in raw} == {"exclusion", "unquantized-not-excluded"}
    assert any(p.tensor == "lm_head.weight" for p in raw)  # vLLM would load lm_head as NVFP4
    quant = json.loads((exports["nemotron"] / "hf_quant_config.json").read_text())["quantization"]
    assert "lm_head" in quant["exclude_modules"] and "backbone.embeddings" in quant["exclude_modules"]
    assert not any("\x00" in entry for entry in quant["exclude_modules"])
    ignore = json.loads((exports["nemotron"] / "config.json").read_text())["quantization_config"]["ignore"]
    assert sorted(ignore) == sorted(quant["exclude_modules"])


def test_strip_sentinel_keeps_globs_and_clean_names():
    assert strip_sentinel("lm_head.\x00backbone.pt_name_sentinel") == "lm_head"
    assert strip_sentinel("backbone.layers.3.mixer.shared_experts.\x00backbone.pt_name_sentinel*") == \
        "backbone.layers.3.mixer.shared_experts*"
    assert strip_sentinel("model.embed_tokens") == "model.embed_tokens"


def test_unresolvable_exclusion_stops_the_repair(exports, tmp_path):
    bad = corrupted_copy(exports["raw"], tmp_path / "bad")
    _edit_json(bad, "hf_quant_config.json",
               lambda d: d["quantization"]["exclude_modules"].append("nowhere.\x00backbone.pt_name_sentinel"))
    with pytest.raises(UserError) as caught:
        repair_exclusions(bad)
    assert "hf_quant_config.json" in caught.value.where and "nowhere" in caught.value.problem


def test_rule_exclusion(exports, tmp_path):
    bad = corrupted_copy(exports["nemotron"], tmp_path / "bad")
    _edit_json(bad, "config.json", lambda d: d["quantization_config"]["ignore"].append("backbone.no_such_module"))
    assert _rules(bad) == {"exclusion"}
    with pytest.raises(UserError) as caught:
        require_servable(bad)
    assert "backbone.no_such_module" in caught.value.where and "exclusion" in caught.value.problem


def test_rule_unquantized_not_excluded(exports, tmp_path):
    bad = corrupted_copy(exports["llama"], tmp_path / "bad")
    _edit_json(bad, "hf_quant_config.json", lambda d: d["quantization"]["exclude_modules"].remove("lm_head"))
    problems = check_servable(bad)
    assert [(p.tensor, p.rule) for p in problems] == [("lm_head.weight", "unquantized-not-excluded")]


@pytest.mark.parametrize("corruption", ["drop_input_scale", "weight_scale_dtype", "scale_2_shape"])
def test_rule_quantized_linear(exports, tmp_path, corruption):
    bad = corrupted_copy(exports["nemotron"], tmp_path / "bad")
    module = "backbone.layers.0.mixer.out_proj"
    edits = {
        "drop_input_scale": lambda t: t.pop(f"{module}.input_scale"),
        "weight_scale_dtype": lambda t: t.update({f"{module}.weight_scale": t[f"{module}.weight_scale"].float()}),
        "scale_2_shape": lambda t: t.update({f"{module}.weight_scale_2": t[f"{module}.weight_scale_2"].reshape(1)}),
    }
    _edit_tensors(bad, edits[corruption])
    problems = check_servable(bad)
    assert {p.rule for p in problems} == {"quantized-linear"} and all(module in p.tensor for p in problems)


def test_weight_only_needs_no_input_scale(exports):
    names = load_file(exports["w4a16"] / "model.safetensors")
    assert not any(name.endswith("input_scale") for name in names)  # and it passed the rules above


def test_rule_excluded_but_quantized(exports, tmp_path):
    bad = corrupted_copy(exports["nemotron"], tmp_path / "bad")
    _edit_json(bad, "hf_quant_config.json",
               lambda d: d["quantization"]["exclude_modules"].append("backbone.layers.2.mixer.down_proj"))
    assert _rules(bad) == {"excluded-but-quantized"}


def test_rule_fused_group_scales_must_match(exports, tmp_path):
    bad = corrupted_copy(exports["llama"], tmp_path / "bad")
    name = "model.layers.0.self_attn.k_proj.weight_scale_2"
    _edit_tensors(bad, lambda t: t.update({name: t[name] * 2}))
    problems = check_servable(bad)
    assert [p.rule for p in problems] == ["fused-group"] and "weight_scale_2" in problems[0].tensor


def test_rule_fused_group_all_or_nothing(exports, tmp_path):
    bad = corrupted_copy(exports["llama"], tmp_path / "bad")
    module = "model.layers.1.mlp.gate_proj"

    def unquantize(tensors):
        for suffix in ("weight_scale", "weight_scale_2", "input_scale"):
            tensors.pop(f"{module}.{suffix}")
        tensors[f"{module}.weight"] = torch.zeros(128, 64, dtype=torch.bfloat16)

    _edit_tensors(bad, unquantize)
    _edit_json(bad, "hf_quant_config.json", lambda d: d["quantization"]["exclude_modules"].append(module))
    _edit_json(bad, "config.json", lambda d: d["quantization_config"]["ignore"].append(module))
    problems = check_servable(bad)
    assert [p.rule for p in problems] == ["fused-group"] and "some but not all" in problems[0].detail


def test_rule_expert_layout(exports, tmp_path):
    bad = corrupted_copy(exports["nemotron"], tmp_path / "bad")
    old = "backbone.layers.3.mixer.experts.0.up_proj.weight_scale_2"
    _edit_tensors(bad, lambda t: t.update({"backbone.layers.3.mixer.experts.up_proj_scale_2": t.pop(old)}))
    assert "expert-layout" in _rules(bad)


def test_rule_index(exports, tmp_path):
    good = corrupted_copy(exports["nemotron"], tmp_path / "good")
    tensors = load_file(good / "model.safetensors")
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": {name: "model.safetensors" for name in tensors}}
    (good / "model.safetensors.index.json").write_text(json.dumps(index))
    assert check_servable(good) == []
    bad = corrupted_copy(good, tmp_path / "bad")
    index["metadata"]["total_size"] = total + 1
    del index["weight_map"]["backbone.norm_f.weight"]  # a tensor the index does not list
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    problems = check_servable(bad)
    assert {p.rule for p in problems} == {"index"} and {p.tensor for p in problems} == \
        {"backbone.norm_f.weight", "model.safetensors.index.json"}


def test_verify_serving_cli(exports, tmp_path):
    from checkpoint_formats.cli_verify import main

    assert main([str(exports["nemotron"]), "--serving"]) == 0
    with pytest.raises(UserError) as caught:
        main([str(exports["raw"]), "--serving"])
    assert "exclusion" in caught.value.problem


def test_a_tied_lm_head_counts_as_a_module():
    """Tied output embeddings store no lm_head tensor, yet ModelOpt (rightly) lists lm_head as excluded."""
    from checkpoint_formats.servability import checkpoint_modules, entry_matches

    names = ["model.embed_tokens.weight", "model.layers.0.self_attn.o_proj.weight"]
    assert not entry_matches("lm_head", checkpoint_modules(names, {"tie_word_embeddings": False}))
    assert entry_matches("lm_head", checkpoint_modules(names, {"tie_word_embeddings": True}))
    assert entry_matches("lm_head", checkpoint_modules(names, {"text_config": {"tie_word_embeddings": True}}))


def _phimoe_like(directory, router_entry):
    """A checkpoint stored as PhiMoE is (router at block_sparse_moe.gate), exclusions as ModelOpt 0.47 writes them."""
    directory.mkdir()
    tensors = {name: torch.zeros(4, 4, dtype=torch.bfloat16) for name in (
        "lm_head.weight", "model.embed_tokens.weight", "model.layers.0.block_sparse_moe.gate.weight")}
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    entries = ["lm_head", "model.embed_tokens", router_entry]
    (directory / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": "NVFP4",
                                                                            "exclude_modules": entries}}))
    (directory / "config.json").write_text(json.dumps({"model_type": "phimoe", "quantization_config": {
        "quant_method": "modelopt", "quant_algo": "NVFP4", "ignore": entries}}))
    return directory


def test_family_rename_repairs_modelopts_phimoe_router_name(tmp_path):
    directory = _phimoe_like(tmp_path / "phimoe", "model.layers.0.block_sparse_moe.router")
    assert {p.rule for p in check_servable(directory)} >= {"exclusion"}
    repaired = repair_exclusions(directory)
    assert repaired == {"hf_quant_config.json: quantization.exclude_modules": ["model.layers.0.block_sparse_moe.router"],
                        "config.json: quantization_config.ignore": ["model.layers.0.block_sparse_moe.router"]}
    quant = json.loads((directory / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"]
    ignore = json.loads((directory / "config.json").read_text())["quantization_config"]["ignore"]
    assert quant == ignore == ["lm_head", "model.embed_tokens", "model.layers.0.block_sparse_moe.gate"]
    assert repair_exclusions(directory) == {}  # a repaired checkpoint is left as it is
    # the model's own name is spelled the checkpoint's way too; a router under another family's name is not invented
    assert repair_exclusions(_phimoe_like(tmp_path / "model-name", "model.layers.0.mlp.router"))
    with pytest.raises(UserError, match="model.layers.0.block_sparse_moe.switch"):
        repair_exclusions(_phimoe_like(tmp_path / "bad", "model.layers.0.block_sparse_moe.switch"))
