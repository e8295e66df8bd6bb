"""One model over several devices in stage 2: some decoder layers in place, some offloaded by accelerate.

A GPU machine is simulated on the CPU with accelerate's own offload: ``dispatch_model`` sends layers to
"disk" (memory-mapped files in the offload folder, parameters on the meta device) and ``cpu_offload``
gives a layer a CPU state-dict weights map (what device_map="auto" does to the "cpu" modules of a model
larger than its GPUs). Every targeted module must be edited exactly as on the same model held whole.
"""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate import cpu_offload, dispatch_model

from abliterate.architectures import discover
from abliterate.edits.delta import abliteration_delta
from abliterate.edits.kernel import KernelParameters
from abliterate.edits.lora import LoraAbliterator
from abliterate.edits.offloaded import EditedWeightsMap
from abliterate.edits.plan import AbliterationParameters, edit_directions, plan_edits
from abliterate.residuals import capture_last_token_residuals
from foundation.errors import UserError
from tests.tiny_models import dense_llama, family_config, nemotron_h_hybrid, qwen3_moe_config

EVERY_LAYER = AbliterationParameters(
    "per_layer", None,
    {"attn": KernelParameters(1.0, 1.5, 0.6, 3.0), "mlp": KernelParameters(1.2, 1.5, 0.4, 3.0)},
)


def fused_moe() -> torch.nn.Module:
    """Qwen3-MoE with three layers, so that one is on disk."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(qwen3_moe_config(num_hidden_layers=3)).eval()


def transposed_experts() -> torch.nn.Module:
    """gpt-oss (experts stored [experts, in, hidden]) with three layers."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(family_config("gpt_oss", num_hidden_layers=3)).float().eval()


def _split(model: torch.nn.Module, offload_dir) -> torch.nn.Module:
    """Decoder layer 0 in place, 1 offloaded with a CPU weights map, 2.. on disk; everything else in place."""
    layers_path = discover(model).layers_path
    device_map: dict[str, str] = {}

    def walk(prefix: str, module: torch.nn.Module) -> None:
        for name, child in module.named_children():
            full = prefix + name
            if full == layers_path:
                device_map.update({f"{full}.{i}": "cpu" if i < 2 else "disk" for i in range(len(child))})
            elif layers_path.startswith(full + "."):
                walk(full + ".", child)
            else:
                device_map[full] = "cpu"

    walk("", model)
    dispatch_model(model, device_map=device_map, offload_dir=str(offload_dir))
    cpu_offload(model.get_submodule(f"{layers_path}.1"), execution_device="cpu")
    return model


def _ids() -> torch.Tensor:
    return torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))


def _explicit(reference: torch.nn.Module, components, directions, method: str) -> torch.nn.Module:
    """The same edit written into the weights of the whole model (the merge's arithmetic)."""
    vectors = edit_directions(EVERY_LAYER, directions)
    with torch.no_grad():
        for edit in plan_edits(EVERY_LAYER, components):
            weight = getattr(reference.get_submodule(edit.component.module_name), edit.component.parameter_name)
            weight.add_(abliteration_delta(weight, vectors[edit.direction_key], edit.strength, method=method, rank=3,
                                           transposed=edit.component.transposed))
    return reference


@pytest.mark.parametrize("method", ["rank1", "norm_preserving"])
@pytest.mark.parametrize("build", [dense_llama, fused_moe, transposed_experts, nemotron_h_hybrid],
                         ids=["dense", "fused_experts", "transposed_experts", "nemotron_h"])
def test_offloaded_layers_are_edited_like_the_whole_model(tmp_path, build, method):
    model = build()
    reference = copy.deepcopy(model)
    _split(model, tmp_path / "offload")
    architecture = discover(model)
    on_meta = [c for c in architecture.components
               if getattr(model.get_submodule(c.module_name), c.parameter_name).device.type == "meta"]
    assert on_meta, "the split offloads some components"
    stored = {c.parameter_path: _stored_copy(model, c) for c in on_meta}
    ids = _ids()
    with torch.no_grad():
        base = model(ids).logits
    torch.testing.assert_close(base, reference(ids).logits, atol=1e-6, rtol=0)

    directions = torch.nn.functional.normalize(torch.randn(architecture.num_layers + 1, 64), dim=-1)
    abliterator = LoraAbliterator(model, architecture.components, method=method, rank=3)
    assert len(abliterator.components) == len(architecture.components) and not abliterator.skipped
    assert {c.parameter_path for c in abliterator.offloaded} == {c.parameter_path for c in on_meta}
    summary = abliterator.placement_summary()
    assert summary["offloaded"] == len(on_meta) and summary["edited"] == len(architecture.components)
    edited_count = abliterator.apply(EVERY_LAYER, directions)
    assert edited_count == len(architecture.components)  # the kernel reaches every layer
    with torch.no_grad():
        edited = model(ids).logits
        explicit = _explicit(reference, architecture.components, directions, method)(ids).logits
    assert (edited - base).abs().max() > 1e-3
    torch.testing.assert_close(edited, explicit, atol=2e-5, rtol=1e-4)
    assert abliterator.unserved_offloaded_edits() == []
    # the stored weights (a CPU state dict that shares memory with nothing else, memory maps on disk) are untouched
    for component in on_meta:
        assert torch.equal(_stored_copy(model, component), stored[component.parameter_path])
        assert getattr(model.get_submodule(component.module_name), component.parameter_name).device.type == "meta"
    abliterator.reset()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)


def _stored_copy(model, component) -> torch.Tensor:
    from abliterate.edits.offloaded import find_offloaded

    return find_offloaded(model, component.module_name, component.parameter_name).stored().clone()


def test_an_edit_no_forward_loaded_is_reported(tmp_path):
    model = _split(dense_llama(), tmp_path / "offload")
    architecture = discover(model)
    abliterator = LoraAbliterator(model, architecture.components, method="rank1")
    abliterator.apply(EVERY_LAYER, torch.nn.functional.normalize(torch.randn(architecture.num_layers + 1, 64), dim=-1))
    assert set(abliterator.unserved_offloaded_edits()) == {c.parameter_path for c in abliterator.offloaded}
    with pytest.raises(RuntimeError, match="never reached a forward pass"):
        abliterator.require_offloaded_edits_served()
    with torch.no_grad():
        model(_ids())
    assert abliterator.require_offloaded_edits_served() == len(abliterator.offloaded)
    abliterator.reset()
    assert abliterator.require_offloaded_edits_served() == 0  # nothing written: nothing to check yet


def test_meta_weights_no_hook_holds_stop_the_run_naming_them():
    """The heretic failure (modules on meta silently left unedited) cannot happen: it is an error."""
    model = dense_llama(layers=3)
    architecture = discover(model)
    model.model.layers[2].self_attn.o_proj.to("meta")
    with pytest.raises(UserError, match=r"1 of 6 components .*model\.layers\.2\.self_attn\.o_proj\.weight.*unedited"):
        LoraAbliterator(model, architecture.components, method="rank1")


def test_the_count_guard_fires_when_a_component_gets_no_edit_slot(monkeypatch):
    from abliterate.edits import lora

    model = dense_llama(layers=2)
    architecture = discover(model)
    real = lora.classify_components

    def drops_one(model, components):
        placement = real(model, components)
        placement.in_place.pop()
        return placement

    monkeypatch.setattr(lora, "classify_components", drops_one)
    with pytest.raises(RuntimeError, match="left unedited"):
        LoraAbliterator(model, architecture.components, method="rank1")


def test_residuals_of_a_split_model_are_gathered_on_the_cpu(tmp_path):
    model = dense_llama()
    reference = copy.deepcopy(model)
    _split(model, tmp_path / "offload")
    layers = discover(model).layers
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    split = capture_last_token_residuals(model, layers, prompts, pad_id=0, batch_size=2)
    whole = capture_last_token_residuals(reference, discover(reference).layers, prompts, pad_id=0, batch_size=2)
    assert split.values.device.type == "cpu" and split.values.shape == (3, len(layers) + 1, 64)
    torch.testing.assert_close(split.values, whole.values, atol=1e-6, rtol=0)


def test_the_weights_map_wrapper_is_removed_with_its_last_slot(tmp_path):
    model = _split(dense_llama(), tmp_path / "offload")
    architecture = discover(model)
    abliterator = LoraAbliterator(model, architecture.components, method="rank1")
    slot = abliterator._layers[abliterator.offloaded[0].parameter_path]
    hook = slot.location.hook
    assert isinstance(hook.weights_map, EditedWeightsMap)
    slot.remove()
    assert not isinstance(hook.weights_map, EditedWeightsMap)


def test_the_command_on_a_model_partly_on_disk_gives_the_metrics_of_the_whole_model(tmp_path, capsys):
    """device_map auto with a CPU cap: accelerate sends layers to disk (read from the safetensors, or from
    --offload_folder where it must convert them); the search edits them all and measures what it measures whole."""
    import json

    from tiny_chat import write_prompts, write_tiny_chat_model

    from abliterate.artifacts import read_chosen_trial
    from abliterate.cli import main

    model_dir, spec = write_tiny_chat_model(tmp_path / "model"), write_prompts(tmp_path / "prompts")
    size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))

    def run(out, *placement):
        argv = ["--model", str(model_dir), "--prompts", str(spec), "--out", str(out), "--n_trials", "2",
                "--n_startup_trials", "2", "--max_response_length", "4", "--kl_tokens", "3", "--dtypes", "float32",
                "--batch_size", "4", "--no-plot", *placement]
        assert main(argv) == 0
        return read_chosen_trial(out), json.loads((out / "pareto_front.json").read_text())

    whole, whole_front = run(tmp_path / "whole", "--device_map", "cpu")
    capsys.readouterr()
    split, split_front = run(tmp_path / "split", "--device_map", "auto", "--max_memory", json.dumps({"cpu": str(size // 2)}),
                             "--offload_folder", str(tmp_path / "offload"))
    printed = " ".join(capsys.readouterr().out.split())
    placement = split.header.placement
    assert placement["offloaded"] > 0 and placement["edited"] == whole.header.placement["edited"]
    assert "offloaded by the device_map" in printed and not split.header.skipped
    assert any(".layers.3." in name for name in placement["offloaded_components"])  # the last layer went to disk
    assert split.header.trial_number == whole.header.trial_number
    assert len(split_front) == len(whole_front)
    for ours, theirs in [(split.header.metrics, whole.header.metrics), (split.header.base_metrics, whole.header.base_metrics)]:
        assert ours.keys() == theirs.keys()
        for key, value in theirs.items():
            if "second" in key:
                continue
            if isinstance(value, float):
                assert ours[key] == pytest.approx(value, rel=1e-3, abs=1e-6), key
            else:
                assert ours[key] == value, key


def test_inputs_go_to_the_execution_device_when_the_embedding_itself_is_offloaded(tmp_path):
    """model.device is the first parameter's device: meta when accelerate offloaded the embedding."""
    from abliterate.evaluation.generation import generate_greedy, model_device

    model = dense_llama(layers=2)
    reference = copy.deepcopy(model)
    dispatch_model(model, device_map={"model.embed_tokens": "disk", "model.layers": "cpu", "model.norm": "cpu",
                                      "model.rotary_emb": "cpu", "lm_head": "disk"}, offload_dir=str(tmp_path))
    assert model.device.type == "meta"
    assert model_device(model) == torch.device("cpu")

    class Tokens:  # just what generate_greedy reads
        pad_token_id, eos_token_id = 0, 1

        def decode(self, tokens, skip_special_tokens=True):
            return " ".join(map(str, tokens))

    reference.generation_config.eos_token_id = model.generation_config.eos_token_id = 1
    answers = generate_greedy(model, Tokens(), [[5, 6, 7], [8, 9]], max_new_tokens=3, batch_size=2, decoding="generate")
    expected = generate_greedy(reference, Tokens(), [[5, 6, 7], [8, 9]], max_new_tokens=3, batch_size=2, decoding="generate")
    assert [a.token_ids for a in answers] == [e.token_ids for e in expected]


def test_an_offloaded_quantized_component_is_refused_naming_it_and_the_fix(tmp_path, monkeypatch):
    from abliterate.edits import lora

    model = _split(dense_llama(), tmp_path / "offload")
    architecture = discover(model)
    packed = model.get_submodule("model.layers.3.mlp.down_proj")
    monkeypatch.setattr(lora, "is_quantized_linear", lambda module: module is packed)
    with pytest.raises(UserError, match=r"(?s)1 quantized components are offloaded.*layers\.3\.mlp\.down_proj.*--max_memory"):
        LoraAbliterator(model, architecture.components, method="rank1")


def test_max_memory_keys_and_plain_byte_counts_are_what_accelerate_reads():
    """accelerate reads GPU 0 only as the int 0, and a size without a unit only as an int (a "374868" string failed)."""
    from abliterate.loading import max_memory_for_accelerate

    assert max_memory_for_accelerate({"0": "70GiB", "1": "374868", "cpu": " 1024 "}) == {0: "70GiB", 1: 374868, "cpu": 1024}
    assert max_memory_for_accelerate(None) is None and max_memory_for_accelerate({}) is None
