"""Architecture discovery on each layout: dense, ModuleList MoE, fused MoE (both layouts), NemotronH hybrid."""

import pytest
import torch
from torch import nn

from abliterate.architectures import ATTN, MLP, discover
from abliterate.architectures.report import print_architecture
from foundation.errors import UserError
from tests.tiny_models import (
    dense_llama,
    fused_moe,
    modulelist_moe,
    nemotron_h_hybrid,
    transposed_fused_moe,
)


def test_dense_llama_has_o_proj_and_down_proj_in_every_layer():
    architecture = discover(dense_llama(layers=4))
    assert architecture.layers_path == "model.layers"
    assert architecture.component_counts() == {"self_attn.o_proj": 4, "mlp.down_proj": 4}
    assert {c.group for c in architecture.components if c.pattern == "self_attn.o_proj"} == {ATTN}
    assert all(c.num_experts is None for c in architecture.components)


def test_modulelist_moe_finds_every_expert_and_the_shared_expert():
    architecture = discover(modulelist_moe())
    counts = architecture.component_counts()
    assert counts == {"self_attn.o_proj": 2, "mlp.experts.*.down_proj": 2, "mlp.shared_expert.down_proj": 2}
    experts = [c for c in architecture.components if c.pattern == "mlp.experts.*.down_proj"]
    assert len(experts) == 2 * 4  # 4 experts in each of 2 layers, each its own Linear
    assert {c.group for c in experts} == {MLP}


@pytest.mark.parametrize("build, transposed", [(fused_moe, False), (transposed_fused_moe, True)])
def test_fused_expert_parameters_are_components_with_their_layout(build, transposed):
    model = build()
    architecture = discover(model)
    fused = [c for c in architecture.components if c.num_experts is not None]
    assert len(fused) == 2  # one 3-D parameter per layer, never skipped
    for component in fused:
        parameter = getattr(model.get_submodule(component.module_name), component.parameter_name)
        assert parameter.ndim == 3 and parameter.shape[0] == component.num_experts == 4
        assert component.transposed is transposed
        assert parameter.shape[2 if transposed else 1] == 64


def test_nemotron_h_hybrid_union_over_layer_kinds():
    architecture = discover(nemotron_h_hybrid())
    by_layer = {}
    for component in architecture.components:
        by_layer.setdefault(component.layer, set()).add(component.pattern)
    assert by_layer == {
        0: {"mixer.out_proj"},  # Mamba
        1: {"mixer.o_proj"},  # attention
        2: {"mixer.down_proj"},  # MLP
        3: {"mixer.experts.down_proj [fused]", "mixer.shared_experts.down_proj"},  # MoE
    }
    mamba = next(c for c in architecture.components if c.pattern == "mixer.out_proj")
    assert mamba.group == ATTN and mamba.weight_level  # fused Mamba kernels read out_proj.weight directly


def test_layer_without_components_is_warned_with_its_children(capsys):
    model = dense_llama(layers=3)

    class Opaque(nn.Module):
        def __init__(self):
            super().__init__()
            self.mystery = nn.Linear(64, 64)

    model.model.layers[1] = Opaque()
    architecture = discover(model)
    assert [index for index, _, _ in architecture.unrecognised_layers] == [1]
    from rich.console import Console

    print_architecture(architecture, Console(width=200, force_terminal=False))
    printed = capsys.readouterr().out
    assert "layer 1 (Opaque)" in printed and "mystery" in printed


def test_model_without_any_abliterable_module_is_a_user_error():
    model = dense_llama(layers=2)
    for index in range(2):
        model.model.layers[index] = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises(UserError, match="no abliterable module"):
        discover(model)


def test_layers_found_under_backbone_for_remote_code_nemotron_layout():
    inner = dense_llama(layers=2)

    class Backbone(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = inner.model.layers

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = inner.config
            self.backbone = Backbone()

    architecture = discover(Wrapper())
    assert architecture.layers_path == "backbone.layers"
    assert architecture.components[0].module_name.startswith("backbone.layers.0.")
    assert torch.is_tensor(architecture.layers[0].self_attn.o_proj.weight)
