"""Placement of a model too big for the GPUs: GPUs first, then CPU, then disk.

accelerate's ``infer_auto_device_map`` does the packing. We then make two
corrections that the offload path needs in practice: the map is expressed in
whole decoder layers plus the small non-layer modules (embeddings, final norm,
head), and those non-layer modules never go to disk (a model whose root or
embedding is disk-offloaded cannot be exported by ModelOpt's streaming
exporter). Budgets of 0 are allowed: ``--max_cpu_memory 0`` sends every decoder
layer that does not fit on a GPU to disk, which is also how the tests force
the disk path on a machine without GPUs.
"""

from __future__ import annotations

import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from foundation.errors import UserError

DISK_BUDGET_BYTES = 1 << 50
GIB = 1 << 30


def parse_memory(value: str | int | None, flag: str) -> int | None:
    """Bytes from '80GiB' / '200GB' / '0'; accelerate's parser does the units."""
    if value is None:
        return None
    if isinstance(value, int) or str(value).strip().isdigit():
        return int(value)
    from accelerate.utils import convert_file_size_to_int

    try:
        return convert_file_size_to_int(str(value).replace(" ", ""))
    except ValueError:
        raise UserError(flag, f"{value!r} is not a memory size", "write e.g. 80GiB, 200GB or 0") from None


@dataclass
class PlacementPlan:
    device_map: dict[str, str | int]
    layer_devices: dict[str, str]
    bytes_per_device: dict[str, int]
    total_weight_bytes: int
    largest_layer_bytes: int
    activation_bytes: int
    max_memory: dict[str | int, int] = field(default_factory=dict)
    # Bytes of each GPU's budget kept free of placed weights (see ``gpu_headroom``).
    reserved_bytes: dict[str, int] = field(default_factory=dict)
    # Bytes of the disk layers that calibration copies into RAM (ModelOpt's writeback of offloaded weights, kept
    # for algorithms that change weights): they count against the CPU budget. 0 when the writeback is skipped.
    cpu_writeback_bytes: int = 0

    @property
    def layers_per_device(self) -> Counter:
        return Counter(self.layer_devices.values())

    @property
    def main_device(self) -> str:
        return "cuda:0" if any(isinstance(key, int) for key in self.max_memory) else "cpu"


def format_bytes(size: int) -> str:
    for unit, scale in (("TiB", 1 << 40), ("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size} B"


def device_name(device: str | int) -> str:
    return f"cuda:{device}" if isinstance(device, int) else str(device)


def placement_units(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """(decoder layer names, other top-most modules) covering every parameter once."""
    layer_classes = set(getattr(model, "_no_split_modules", None) or [])
    layers: list[str] = []
    others: list[str] = []

    def contains_layer(module: torch.nn.Module) -> bool:
        return any(type(sub).__name__ in layer_classes for sub in module.modules())

    def walk(prefix: str, module: torch.nn.Module) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if type(child).__name__ in layer_classes:
                layers.append(full)
            elif contains_layer(child):
                walk(f"{full}.", child)
            else:
                others.append(full)

    walk("", model)
    if not layers:
        raise UserError("--offload_folder", f"cannot find the decoder layers of {type(model).__name__} (no _no_split_modules)",
                        "this architecture is not supported by the offload path; try --backend llmcompressor")
    return layers, others


def lookup_device(device_map: dict[str, str | int], module_name: str) -> str | int:
    """Device of the longest device-map key that is ``module_name`` or one of its parents."""
    best_key, best = None, None
    for key, device in device_map.items():
        if key == "" or module_name == key or module_name.startswith(key + "."):
            if best_key is None or len(key) > len(best_key):
                best_key, best = key, device
    if best_key is None:
        raise KeyError(module_name)
    return best


def build_max_memory(gpu_budgets: list[int], cpu_budget: int) -> dict[str | int, int]:
    max_memory: dict[str | int, int] = {index: budget for index, budget in enumerate(gpu_budgets)}
    max_memory["cpu"] = cpu_budget
    max_memory["disk"] = DISK_BUDGET_BYTES
    return max_memory


def default_budgets(max_gpu_memory: str | None, max_cpu_memory: str | None) -> tuple[list[int], int]:
    """Budgets from the flags, else 90% of what is free now."""
    import psutil

    gpu_budgets = []
    for index in range(torch.cuda.device_count()):
        flagged = parse_memory(max_gpu_memory, "--max_gpu_memory")
        gpu_budgets.append(flagged if flagged is not None else int(torch.cuda.mem_get_info(index)[0] * 0.9))
    flagged_cpu = parse_memory(max_cpu_memory, "--max_cpu_memory")
    cpu_budget = flagged_cpu if flagged_cpu is not None else int(psutil.virtual_memory().available * 0.9)
    return gpu_budgets, cpu_budget


def plan_placement(
    model_config,
    dtype: torch.dtype,
    max_memory: dict[str | int, int],
    *,
    batch_size: int,
    max_seq_len: int,
    trust_remote_code: bool = False,
    disk_writeback: bool = False,
) -> PlacementPlan:
    """Plan where every decoder layer goes, without loading any weight.

    ``disk_writeback``: calibration will copy the disk layers' weights into RAM (ModelOpt 0.47's
    ``plugins/accelerate._writeback_params_to_weights_map`` keeps disk writebacks in the loader's in-memory
    state_dict); their bytes are then reserved from the CPU budget, and a plan whose CPU weights plus those
    bytes exceed it is refused (more disk would only move bytes from one side of that sum to the other)."""
    from accelerate import infer_auto_device_map, init_empty_weights
    from accelerate.utils import compute_module_sizes
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(model_config, dtype=dtype, trust_remote_code=trust_remote_code)
    layers, others = placement_units(empty)
    sizes = compute_module_sizes(empty, dtype=dtype)
    largest_layer = max(sizes.get(name, 0) for name in layers)
    hidden = getattr(model_config, "hidden_size", 0) or 0
    intermediate = getattr(model_config, "intermediate_size", hidden * 4) or hidden * 4
    element_bytes = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 2
    # Residual stream + the widest MLP intermediate, a few live copies each.
    activation_bytes = 4 * batch_size * max_seq_len * (hidden + intermediate) * element_bytes
    main = 0 if any(isinstance(key, int) for key in max_memory) else "cpu"
    reserved = {key: gpu_headroom(largest_layer, activation_bytes, streams_layers=key == main)
                for key in max_memory if isinstance(key, int)}
    packing_memory = {key: max(budget - reserved.get(key, 0), 0) for key, budget in max_memory.items()}
    packed = infer_auto_device_map(
        empty, max_memory=packing_memory, no_split_module_classes=list(empty._no_split_modules or []), dtype=dtype
    )
    device_map: dict[str, str | int] = {}
    for name in others:
        device = lookup_device(packed, name)
        device_map[name] = main if device == "disk" else device
    for name in layers:
        device_map[name] = lookup_device(packed, name)
    bytes_per_device: Counter = Counter()
    for name, device in device_map.items():
        bytes_per_device[device_name(device)] += sizes.get(name, 0)
    writeback = bytes_per_device.get("disk", 0) if disk_writeback else 0
    cpu_budget = max_memory.get("cpu")
    if writeback and cpu_budget is not None and bytes_per_device.get("cpu", 0) + writeback > cpu_budget:
        raise UserError(
            "--max_cpu_memory",
            f"this calibration algorithm changes weights, and ModelOpt 0.47 writes the changed weights of disk-offloaded "
            f"layers back into RAM, not to disk: {format_bytes(writeback)} of disk layers + "
            f"{format_bytes(bytes_per_device.get('cpu', 0))} placed on the CPU exceed --max_cpu_memory "
            f"({format_bytes(cpu_budget)})",
            f"use --algorithm max (it only reads weights: nothing is written back), or raise --max_cpu_memory to "
            f"at least {format_bytes(bytes_per_device.get('cpu', 0) + writeback)} (then no layer goes to disk)",
        )
    return PlacementPlan(
        device_map=device_map,
        layer_devices={name: device_name(device_map[name]) for name in layers},
        bytes_per_device=dict(bytes_per_device),
        total_weight_bytes=sizes.get("", 0),
        largest_layer_bytes=largest_layer,
        activation_bytes=activation_bytes,
        max_memory=dict(max_memory),
        reserved_bytes={device_name(key): value for key, value in reserved.items()},
        cpu_writeback_bytes=writeback,
    )


def gpu_headroom(largest_layer_bytes: int, activation_bytes: int, *, streams_layers: bool) -> int:
    """What a GPU needs beyond the weights placed on it, so that ``--max_gpu_memory`` caps the real peak.

    Measured on an H200 (bench/offload_70b_shaped.py, Llama-3.1-70B layer sizes, 2026-12-02): with the whole
    budget filled by placed weights the peak ran 3.2 GB over them: the GPU that executes CPU- and disk-resident
    layers holds one streamed layer (1.7 GB) plus, while a layer is calibrated and exported, temporaries of
    about one more layer (absolute copies, fake-quantized weights) and the activations. Other GPUs run only
    their own layers: the temporaries and the activations.
    """
    return (2 if streams_layers else 1) * largest_layer_bytes + activation_bytes


def print_placement(console, plan: PlacementPlan) -> None:
    from rich.table import Table

    table = Table(title="planned placement (offload)")
    table.add_column("device", style="bold")
    table.add_column("decoder layers", justify="right")
    table.add_column("weights", justify="right")
    table.add_column("budget", justify="right")
    layer_counts = plan.layers_per_device
    budgeted = {device_name(key) for key in plan.max_memory if key != "disk"}
    devices = sorted(set(plan.bytes_per_device) | set(layer_counts) | budgeted, key=_device_order)
    for device in devices:
        budget_key = int(device.split(":")[1]) if device.startswith("cuda:") else device
        budget = plan.max_memory.get(budget_key)
        budget_text = "-" if budget is None or budget >= DISK_BUDGET_BYTES else format_bytes(budget)
        table.add_row(device, str(layer_counts.get(device, 0)), format_bytes(plan.bytes_per_device.get(device, 0)), budget_text)
    console.print(table)
    console.print(
        f"estimate: weights {format_bytes(plan.total_weight_bytes)} in total; on {plan.main_device} "
        f"at least one decoder layer ({format_bytes(plan.largest_layer_bytes)}) + calibration activations "
        f"(~{format_bytes(plan.activation_bytes)}) beyond the modules placed there"
        + (f" (kept free of weights: {', '.join(f'{d} {format_bytes(b)}' for d, b in plan.reserved_bytes.items())})"
           if plan.reserved_bytes else "")
        + "; disk-resident layers are read again for every calibration batch."
        + (f" CPU: {format_bytes(plan.cpu_writeback_bytes)} reserved for the disk layers' weights, which "
           "calibration writes back into RAM (ModelOpt's offload writeback; the algorithm changes weights)."
           if plan.cpu_writeback_bytes else "")
    )


def _device_order(device: str) -> tuple[int, str]:
    return (0 if device.startswith("cuda") else 1 if device == "cpu" else 2, device)


WORK_SUBDIR = "quant_abliterate_offload"


def offload_work_dir(offload_folder: str | Path) -> Path:
    """Our own subfolder of --offload_folder: the only thing --clean_offload ever deletes.

    Users point --offload_folder at big scratch disks that may hold other
    things; cleaning a folder we did not create would be a disaster.
    """
    return Path(offload_folder) / WORK_SUBDIR


def clean_offload_folder(offload_folder: str | Path) -> None:
    """Delete the offloaded weights and layerwise checkpoints of earlier runs."""
    work_dir = offload_work_dir(offload_folder)
    if work_dir.is_dir() and not work_dir.is_symlink():
        shutil.rmtree(work_dir)
