"""Fixtures shared by several test folders."""

from __future__ import annotations

import os

# Tests are CPU-only: where Triton is installed its kernels can only run interpreted. Set before any test module
# imports checkpoint_formats.nvfp4_matmul (its kernels read the variable when defined).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


@pytest.fixture
def one_cpu_thread():
    """Tiny models run ~1000x faster on one thread when the shared CI CPU is busy (OpenMP oversubscription).

    Folders of tiny-model tests turn it on for every test with an autouse fixture that requests it.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
