"""The split-K workspace: clean on hand-out, grown without freeing what a captured graph may address."""

from __future__ import annotations

import pytest
import torch

from checkpoint_formats import split_k_workspace


@pytest.fixture(autouse=True)
def fresh_workspaces(monkeypatch):
    monkeypatch.setattr(split_k_workspace, "_current", {})
    monkeypatch.setattr(split_k_workspace, "_retired", [])


def test_one_workspace_serves_every_launch_that_fits() -> None:
    cpu = torch.device("cpu")
    first = split_k_workspace.workspace_for(cpu, 1000, 10)
    assert first.sums.dtype == torch.float32 and first.arrivals.dtype == torch.int32
    assert first.sums.numel() >= 1000 and not first.sums.any() and not first.arrivals.any()
    assert split_k_workspace.workspace_for(cpu, 500, 3) is first


def test_growing_keeps_the_outgrown_workspace_alive() -> None:
    cpu = torch.device("cpu")
    small = split_k_workspace.workspace_for(cpu, 10, 1)
    big = split_k_workspace.workspace_for(cpu, small.sums.numel() + 1, 1)
    assert big is not small and big.sums.numel() > small.sums.numel() and not big.sums.any()
    assert split_k_workspace._retired == [small]
    more_tiles = split_k_workspace.workspace_for(cpu, 10, big.arrivals.numel() + 1)
    assert more_tiles.arrivals.numel() > big.arrivals.numel()


def test_launches_over_the_cap_get_none() -> None:
    assert split_k_workspace.workspace_for(torch.device("cpu"), split_k_workspace.MAX_VALUES + 1, 1) is None
