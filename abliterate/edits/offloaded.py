"""Edits of offloaded weights: accelerate keeps them in its hook's weights map, not in the module.

Under a device_map with CPU or disk offload (``device_map="auto"`` on a model
larger than its GPUs, or a map naming "cpu" / "disk" beside a GPU), accelerate
leaves an offloaded module's parameters on the **meta** device and copies them
from its ``AlignDevicesHook.weights_map`` (a CPU state dict, or memory-mapped
files in the offload folder) onto the execution device for each forward, then
drops them again. A LoRA attached to such a module would be created on the
meta device (PEFT moves adapters to the base weight's device), and a check of
``weight.device`` sees nothing to edit: a published heretic patch left 1,301
of ~3,000 modules unedited that way, silently.

Here the hook's weights map is wrapped instead: the edited parameter is served
as ``(W + left @ right)`` computed on the execution device (fp32, cast back to
W's dtype: the same arithmetic as the streaming merge), every other tensor
unchanged. The stored weights are never written (a CPU state dict or a
memory map may be the only copy); with no edit written the original tensor is
served as it is, so the unedited model is exactly the loaded one.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn


def _align_hooks(module: nn.Module) -> list:
    """accelerate's AlignDevicesHooks on ``module`` (one, or inside a SequentialHook); [] without accelerate hooks."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    hooks = list(getattr(hook, "hooks", None) or [hook])
    return [h for h in hooks if hasattr(h, "weights_map") and hasattr(h, "offload")]


def _holds(weights_map: Mapping, key: str) -> bool:
    """Whether ``weights_map`` has ``key``, without reading the tensor from disk when the loader can say."""
    base = weights_map.base if isinstance(weights_map, EditedWeightsMap) else weights_map
    dataset, full_key = getattr(base, "dataset", None), key
    if dataset is not None and hasattr(base, "prefix"):  # accelerate's PrefixedDataset
        full_key = f"{base.prefix}{key}"
        base = dataset
    keys = getattr(base, "all_keys", None)  # accelerate's OffloadedWeightsLoader
    if keys is not None:
        return full_key in keys
    return full_key in base


@dataclass(frozen=True)
class OffloadedTensor:
    """Where an offloaded parameter lives: the hook that loads it and its key in that hook's weights map."""

    hook: object  # accelerate.hooks.AlignDevicesHook
    key: str

    @property
    def execution_device(self) -> torch.device:
        device = self.hook.execution_device
        return torch.device(f"cuda:{device}" if isinstance(device, int) else device)

    def stored(self) -> torch.Tensor:
        """The stored (unedited) tensor, as the weights map holds it (CPU or a fresh read from disk)."""
        weights_map = self.hook.weights_map
        base = weights_map.base if isinstance(weights_map, EditedWeightsMap) else weights_map
        return base[self.key]


def find_offloaded(model: nn.Module, module_name: str, parameter_name: str) -> OffloadedTensor | None:
    """The offload hook that holds ``module_name.parameter_name``: on the module itself or on an ancestor
    (a hook with ``place_submodules``); None when no hook holds it."""
    parts = module_name.split(".") if module_name else []
    for depth in range(len(parts), -1, -1):
        owner = ".".join(parts[:depth])
        relative = ".".join([*parts[depth:], parameter_name])
        for hook in _align_hooks(model.get_submodule(owner)):
            if hook.offload and hook.weights_map is not None and _holds(hook.weights_map, relative):
                return OffloadedTensor(hook, relative)
    return None


class EditedWeightsMap(Mapping):
    """A hook's weights map that serves edited tensors for the keys it has slots for, the rest unchanged."""

    def __init__(self, base: Mapping) -> None:
        self.base = base
        self.slots: dict[str, OffloadedEditSlot] = {}

    def __getitem__(self, key: str) -> torch.Tensor:
        value = self.base[key]
        slot = self.slots.get(key)
        return value if slot is None else slot.edited(value)

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and _holds(self.base, key)


class OffloadedEditSlot:
    """Low-rank factors of one offloaded component, added to its weight each time the hook loads it."""

    def __init__(self, location: OffloadedTensor, transposed: bool) -> None:
        self.location = location
        self.transposed = transposed
        self.left: torch.Tensor | None = None  # [..., hidden, r] fp32 on the execution device
        self.right: torch.Tensor | None = None  # [..., r, in]
        self.served = 0  # forwards that loaded the edited weight since the last write
        hook = location.hook
        if not isinstance(hook.weights_map, EditedWeightsMap):
            hook.weights_map = EditedWeightsMap(hook.weights_map)
        hook.weights_map.slots[location.key] = self

    @property
    def active(self) -> bool:
        return self.left is not None

    def base_weight(self) -> torch.Tensor:
        """The unedited weight on the execution device (where the factors are computed)."""
        return self.location.stored().to(self.location.execution_device)

    def reset(self) -> None:
        self.left = self.right = None
        self.served = 0

    def write(self, left: torch.Tensor, right: torch.Tensor) -> None:
        device = self.location.execution_device
        self.left = left.to(device, torch.float32)
        self.right = right.to(device, torch.float32)
        self.served = 0

    def edited(self, value: torch.Tensor) -> torch.Tensor:
        if self.left is None:
            return value
        self.served += 1
        # one fp32 copy on the execution device (never the stored tensor), the low-rank product added in place:
        # about 3x the bf16 weight at the peak, not the 8x of materializing the delta beside it
        weight = value.to(device=self.location.execution_device, dtype=torch.float32, copy=True)
        left, right = self.left, self.right
        if self.transposed:  # stored [..., in, hidden]: add (left @ right)^T = right^T @ left^T
            left, right = right.transpose(-2, -1), left.transpose(-2, -1)
        if weight.ndim == 2:
            weight.addmm_(left, right)
        else:
            weight.baddbmm_(left, right)
        return weight.to(value.dtype)

    def remove(self) -> None:
        weights_map = self.location.hook.weights_map
        if isinstance(weights_map, EditedWeightsMap):
            weights_map.slots.pop(self.location.key, None)
            if not weights_map.slots:
                self.location.hook.weights_map = weights_map.base
