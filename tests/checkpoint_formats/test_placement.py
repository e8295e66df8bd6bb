"""device_map resolution (GPU placement itself is exercised by bench/w4a4_vs_modelopt.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from checkpoint_formats.placement import DevicePlan, resolve
from foundation.errors import UserError


def test_longest_prefix_wins_and_ints_mean_gpus():
    plan = DevicePlan({"model.layers.1": 1, "model": "cpu", "lm_head": 0})
    assert plan.device_of("model.layers.1.mlp.up_proj.weight") == torch.device("cuda:1")
    assert plan.device_of("model.layers.10.mlp.up_proj.weight") == torch.device("cpu")  # not a prefix of layers.1
    assert plan.device_of("lm_head.weight") == torch.device("cuda:0")
    assert plan.devices == {torch.device("cuda:1"), torch.device("cpu"), torch.device("cuda:0")}


def test_resolve_forms():
    model = nn.Sequential(nn.Linear(2, 2))
    assert resolve(model, None, None).device_map == {"": "cpu"}
    assert resolve(model, "cpu", None).device_of("0.weight") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve(model, "auto", None).device_map == {"": "cpu"}
    with pytest.raises(UserError, match="disk"):
        resolve(model, {"0": "disk"}, None)
    with pytest.raises(UserError, match="unsupported"):
        resolve(model, 3.5, None)
