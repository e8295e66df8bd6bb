"""Where each tensor goes: ``device_map`` handling as ``from_pretrained`` does it (via accelerate)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from checkpoint_formats.detect import CheckpointFormat
from foundation.errors import UserError
from foundation.load_report import require_complete_load

_AUTO_MAPS = {"auto", "balanced", "balanced_low_0", "sequential"}


@dataclass
class DevicePlan:
    device_map: dict[str, str | int | torch.device]

    def device_of(self, tensor_name: str) -> torch.device:
        """The device of the longest module prefix that contains ``tensor_name``."""
        best, best_len = self.device_map.get("", "cpu"), -1
        for prefix, device in self.device_map.items():
            if (prefix == "" or tensor_name == prefix or tensor_name.startswith(prefix + ".")) and len(
                prefix
            ) > best_len:
                best, best_len = device, len(prefix)
        return torch.device(f"cuda:{best}" if isinstance(best, int) else best)

    @property
    def devices(self) -> set[torch.device]:
        return {self.device_of(prefix) for prefix in self.device_map}


def resolve(model: nn.Module, device_map, max_memory: dict | None) -> DevicePlan:
    if device_map is None:
        return DevicePlan({"": "cpu"})
    if isinstance(device_map, dict):
        if any(str(device) == "disk" for device in device_map.values()):
            raise UserError(
                "device_map",
                "'disk' offload is not supported by this loader",
                "use 'cpu' for the modules that do not fit on a GPU",
            )
        return DevicePlan(dict(device_map))
    if isinstance(device_map, (int, torch.device)) or (isinstance(device_map, str) and device_map not in _AUTO_MAPS):
        return DevicePlan({"": device_map})
    if isinstance(device_map, str):
        if not torch.cuda.is_available():
            return DevicePlan({"": "cpu"})
        from accelerate import infer_auto_device_map
        from accelerate.utils import get_balanced_memory

        no_split = list(getattr(model, "_no_split_modules", None) or [])
        if device_map != "sequential":
            max_memory = get_balanced_memory(
                model, max_memory=max_memory, no_split_module_classes=no_split, low_zero=device_map == "balanced_low_0"
            )
        plan = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
        return resolve(model, plan, None)
    raise UserError(
        "device_map", f"unsupported value {device_map!r}", "use None, a device, 'auto' or a {module: device} dict"
    )


def tie_and_check(model: nn.Module, fmt: CheckpointFormat) -> None:
    """Tie shared weights (lm_head <- embeddings), then insist nothing is left unloaded."""
    model.tie_weights()
    missing = [
        name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.device.type == "meta"
    ]
    if missing:
        raise UserError(
            str(fmt.path),
            f"{len(missing)} model tensor(s) are not in the checkpoint, e.g. {missing[:3]}",
            "the checkpoint is incomplete or config.json describes another model",
        )


def dispatch(model: nn.Module, plan: DevicePlan) -> None:
    """Add accelerate's hooks when the model spans several devices (a no-op on one)."""
    if len(plan.devices) > 1:
        from accelerate import dispatch_model

        dispatch_model(model, device_map=plan.device_map)


def from_pretrained_plain(
    fmt: CheckpointFormat, dtype: torch.dtype, device_map, max_memory, trust_remote_code: bool
) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        model, loading_info = AutoModelForCausalLM.from_pretrained(
            fmt.path, dtype=dtype, device_map=device_map, max_memory=max_memory, trust_remote_code=trust_remote_code,
            output_loading_info=True, use_safetensors=True,
        )
    except (OSError, ValueError, RuntimeError) as error:
        raise UserError(
            str(fmt.path),
            f"cannot be loaded ({error})",
            "check that the checkpoint is complete and matches config.json",
        ) from error
    require_complete_load(loading_info, str(fmt.path), str(fmt.path))
    return model.eval()


def input_device(model: nn.Module) -> torch.device:
    """Where input ids must go: the input embedding's execution device under an accelerate map, else its weight's.

    ``model.device`` is the first parameter's device, which is ``meta`` when accelerate offloaded that module
    (its hook loads the weights onto the execution device only for the forward).
    """
    get_embedding = getattr(model, "get_input_embeddings", None)
    embedding = get_embedding() if callable(get_embedding) else None
    for module in (embedding, model):
        if module is None:
            continue
        execution_device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
        if execution_device is not None:
            return torch.device(f"cuda:{execution_device}" if isinstance(execution_device, int) else execution_device)
        for tensor in module.parameters():
            if tensor.device.type != "meta":
                return tensor.device
    return torch.device("cpu")
