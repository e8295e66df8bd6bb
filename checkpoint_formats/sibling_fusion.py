"""One matmul for the sibling projections that read the same input (q/k/v, gate/up) of a packed NVFP4 model.

Why: in a stage-2 trial on a GPU the decode steps are matmuls at M = 100 tokens, where each launch is bound by
latency more than by bytes. Llama-style attention reads one input three times (q, k, v: 4096, 1024 and 1024
outputs on an 8B model, the last two small enough to leave most of an H200's SMs idle), the MLP twice (gate,
up). vLLM and TensorRT-LLM fuse these at load; transformers does not. Here the members' packed codes and scales
are moved into one buffer per group (each member keeps a view of its rows: no second copy of any weight), and
the first member called on an input computes the whole group's output; the others return their columns of it.

Under ``torch.inference_mode`` torch keeps no version counter, so an in-place change of the input between two
members' calls would go unseen there; transformers' modeling code hands every member the same unchanged input.

Applied by ``abliterate.loading`` to a packed load when asked for (``--sibling_fusion``; the run's header says
how many groups). Off by default: on the 8B-shaped bench it saved under 1% of a trial and raised the reserved
GPU memory by 206 MB (the fused buffers and products leave blocks the allocator cannot reuse; three profiled
trials ended at 6,692,012,032 B reserved fused, 6,486,491,136 unfused; bench/stage2_trial_profile.py, H200,
2026-12-03 17:55). Concatenating through the host (members freed first) cut 42 MB right after the load and
ended 188 MB higher (19:12): the placement that follows is not ours to steer. Its first GPU
run (H200, 2026-12-03 15:02 UTC) failed at the first forward, which runs under inference mode (the version
counter; fixed and tested on the CPU since); the next one fused nothing, because every ModelOpt NVFP4
checkpoint is W4A4 and members whose inputs *could* be rounded were left apart (now: only members whose rounding
is on). ``bench/sibling_fusion_bench.py`` measured the fused launches themselves: q/k/v 48.3 -> 40.0 us at
M = 100 (32.7 -> 16.8 at M = 16), gate/up unchanged at M = 100 (92.9 -> 93.0 us).

A group is fused only where its product is the members' products side by side: every member an ``NVFP4Linear``
on the same CUDA device with the matmul kernel available, 16-blocks, the same input size and the same
``weight_scale_2`` (ModelOpt shares it across q/k/v and gate/up), no AWQ pre-scale, no input rounding (a W4A4
checkpoint's members are fused while its simulation is off, as stage 2 loads it; a member whose simulation is
switched on later multiplies its own rounded input, and the group dissolves at the first mismatch), no
accelerate hook (offloaded weights move), all or none with a bias. Each output column still comes from its own
row of codes; only the launch shape (split K included) follows the group's width, so the fp32 sums may be added
in another order: differences at bf16 rounding (at most 2.6e-3 of the largest output in the bench).
"""

from __future__ import annotations

import torch
from torch import nn

from checkpoint_formats import nvfp4_matmul
from checkpoint_formats.modules import NVFP4Linear

SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class SharedProduct:
    """The fused weights of one sibling group and its product for the last input it was called on."""

    def __init__(self, members: list[NVFP4Linear]) -> None:
        self.members = members
        self.weight = torch.cat([m.weight for m in members])
        # through uint8: no float8 kernel needed for the concatenation
        self.weight_scale = torch.cat([m.weight_scale.view(torch.uint8) for m in members]).view(members[0].weight_scale.dtype)
        self.weight_scale_2 = members[0].weight_scale_2
        has_bias = members[0].bias is not None
        self.bias = torch.cat([m.bias.detach() for m in members]) if has_bias else None
        bounds = torch.tensor([0] + [m.out_features for m in members]).cumsum(0).tolist()
        self.columns = [slice(start, end) for start, end in zip(bounds, bounds[1:])]
        self._input: torch.Tensor | None = None
        self._version = -1
        self._output: torch.Tensor | None = None
        self._unserved: set[int] = set()
        for index, (member, rows) in enumerate(zip(members, self.columns)):  # members' buffers: views of the fused ones
            member.weight = self.weight[rows]
            member.weight_scale = self.weight_scale[rows]
            member.shared_product, member.shared_index = self, index

    def columns_of(self, member: NVFP4Linear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        """``member``'s output on ``x``: the whole group's product, computed once per input (the same tensor,
        unchanged since) and let go as soon as every member has its columns, so that no [tokens, width] product
        outlives its layer (a long prefill's gate/up product is hundreds of MB per layer).

        Where the members turn out not to share their inputs (a new input arrives before every member had the
        last product: cross-attention, say) or the model was moved off the fused buffers' device, the group is
        dissolved and each member multiplies on its own again (its rows stay views of the fused buffers)."""
        index = member.shared_index
        version = -1 if x.is_inference() else x._version  # inference tensors keep no version counter
        if x is not self._input or version != self._version or index not in self._unserved:
            if self._unserved or member.weight.device != self.weight.device:
                self.dissolve()
                return member._kernel_linear(x, bias)
            bias = None if self.bias is None else self.bias.to(x.dtype)
            self._output = nvfp4_matmul.nvfp4_linear(x, self.weight, self.weight_scale, self.weight_scale_2, bias)
            self._input, self._version, self._unserved = x, version, set(range(len(self.columns)))
        columns = self._output[..., self.columns[index]]
        self._unserved.discard(index)
        if not self._unserved:
            self._input = self._output = None
        return columns

    def dissolve(self) -> None:
        for member in self.members:
            member.shared_product = None
        self._input = self._output = None
        self._unserved = set()


def fusable(members: list[nn.Module]) -> bool:
    """Whether the group's fused product is its members' own side by side (see the module docstring)."""
    if not all(type(m) is NVFP4Linear for m in members):
        return False
    first = members[0]
    device = first.weight.device
    return (nvfp4_matmul.available(device)  # a CUDA device of sm_80+ with Triton
            and all(m.weight.device == device and m.kernel_block_size_ok and m.in_features == first.in_features
                    and m.pre_quant_scale is None and not m.simulate_activations and not hasattr(m, "_hf_hook")
                    and (m.bias is None) == (first.bias is None) and m.weight_scale_2.dtype == first.weight_scale_2.dtype
                    and m.shared_product is None for m in members)
            and all(torch.equal(m.weight_scale_2, first.weight_scale_2) for m in members))  # fmt: skip


def fuse_siblings(model: nn.Module) -> int:
    """Fuse every sibling group of ``model`` that ``fusable`` allows; returns how many groups were fused."""
    fused = 0
    for module in model.modules():
        if hasattr(module, "_hf_hook"):
            continue
        for names in SIBLINGS:
            members = [getattr(module, name, None) for name in names]
            if all(m is not None for m in members) and fusable(members):
                SharedProduct(members)
                fused += 1
    return fused
