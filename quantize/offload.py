"""Placement of a model too big for the GPUs: GPUs first, then CPU, then disk.

The map is expressed in whole decoder layers plus the small non-layer modules
(embeddings, final norm, head), and those non-layer modules never go to disk (a
model whose root or embedding is disk-offloaded cannot be exported by
ModelOpt's streaming exporter). A budget caps the device's peak, not only the
weights placed there: the main device keeps room for the calibration
activations and for the one offloaded layer accelerate streams onto it at a
time. (accelerate's ``infer_auto_device_map`` reserves only its largest module,
and moving its disk-placed head back to the GPU used that room: at 70B layer
sizes with a 12 GiB cap the planned weights alone came to 11.9 GiB.) Budgets of 0 are allowed: ``--max_cpu_memory 0`` sends every decoder
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
    # Bytes of the disk layers that calibration copies into RAM (ModelOpt's writeback of offloaded weights, kept
    # for algorithms that change weights): they count against the CPU budget. 0 when the writeback is skipped.
    cpu_writeback_bytes: int = 0

    @property
    def layers_per_device(self) -> Counter:
        return Counter(self.layer_devices.values())

    @property
    def main_device(self) -> str:
        return "cuda:0" if any(isinstance(key, int) for key in self.max_memory) else "cpu"

    def main_device_need(self) -> int:
        """Bytes the main device needs at its peak: what is placed there, the activations, and one streamed layer
        when any decoder layer lives where it cannot run (CPU or disk with a GPU; disk without)."""
        main = self.main_device
        streamed_from = {"disk"} if main == "cpu" else {"cpu", "disk"}
        streamed = self.largest_layer_bytes if any(d in streamed_from for d in self.layer_devices.values()) else 0
        return self.bytes_per_device.get(main, 0) + self.activation_bytes + streamed

    def main_device_shortfall(self) -> int:
        """How far the main device's need exceeds its budget (0: within it). Only the non-layer modules, which
        never go to disk, can push it over: decoder layers are placed within the budget."""
        key = 0 if self.main_device == "cuda:0" else "cpu"
        budget = self.max_memory.get(key)
        return 0 if budget is None else max(self.main_device_need() - budget, 0)


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


def build_max_memory(gpu_budgets: list[int], cpu_budget: int) -> dict[str | int, int]:
    max_memory: dict[str | int, int] = {index: budget for index, budget in enumerate(gpu_budgets)}
    max_memory["cpu"] = cpu_budget
    max_memory["disk"] = DISK_BUDGET_BYTES
    return max_memory


def gpu_budget_flags(max_gpu_memory: str | None, gpu_count: int) -> list[int | None]:
    """One budget per visible GPU from ``--max_gpu_memory``: one size for all, or a comma list with one per GPU."""
    if max_gpu_memory is None:
        return [None] * gpu_count
    sizes = [size.strip() for size in str(max_gpu_memory).split(",")]
    if len(sizes) == 1:
        return [parse_memory(sizes[0], "--max_gpu_memory")] * gpu_count
    if len(sizes) != gpu_count:
        raise UserError("--max_gpu_memory", f"{len(sizes)} budgets for {gpu_count} visible GPU(s)",
                        f"give one size for every GPU, or exactly {gpu_count} comma-separated sizes "
                        "(CUDA_VISIBLE_DEVICES decides which GPUs are visible)")
    return [parse_memory(size, "--max_gpu_memory") for size in sizes]


def default_budgets(max_gpu_memory: str | None, max_cpu_memory: str | None) -> tuple[list[int], int]:
    """A budget for every visible GPU and the CPU: from the flags, else 90% of what is free now."""
    import psutil

    gpu_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    flagged_gpus = gpu_budget_flags(max_gpu_memory, gpu_count)
    gpu_budgets = [flagged if flagged is not None else int(torch.cuda.mem_get_info(index)[0] * 0.9)
                   for index, flagged in enumerate(flagged_gpus)]
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

    Whole decoder layers fill the GPUs in order, then the CPU, then the disk. The main device (the first GPU,
    else the CPU) also holds, within its budget, the non-layer modules (embeddings, final norm, head: never on
    disk), the calibration activations and, when any layer lives off the GPUs, room for the one offloaded layer
    that accelerate streams onto it at a time: so a budget is a cap on the device's peak, not just on the
    weights placed there.

    ``disk_writeback``: calibration will copy the disk layers' weights into RAM (ModelOpt 0.47's
    ``plugins/accelerate._writeback_params_to_weights_map`` keeps disk writebacks in the loader's in-memory
    state_dict); their bytes then count against the CPU budget, and a plan whose CPU weights plus those bytes
    exceed it is refused (more disk would only move bytes from one side of that sum to the other).
    """
    from accelerate import init_empty_weights
    from accelerate.utils import compute_module_sizes
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(model_config, dtype=dtype, trust_remote_code=trust_remote_code)
    layers, others = placement_units(empty)
    sizes = compute_module_sizes(empty, dtype=dtype)
    main = 0 if any(isinstance(key, int) for key in max_memory) else "cpu"
    largest_layer = max(sizes.get(name, 0) for name in layers)
    text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    hidden = getattr(text_config, "hidden_size", 0) or 0
    intermediate = getattr(text_config, "intermediate_size", hidden * 4) or hidden * 4
    vocab = getattr(text_config, "vocab_size", 0) or 0
    element_bytes = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 2
    # Residual stream + the widest MLP intermediate, a few live copies each, and the batch's logits.
    activation_bytes = (4 * (hidden + intermediate) + 2 * vocab) * batch_size * max_seq_len * element_bytes
    non_layer = sum(sizes.get(name, 0) for name in others)
    layer_sizes = [sizes.get(name, 0) for name in layers]

    def fill(streamed: int) -> list[str | int]:
        """Devices of the layers, in order, with `streamed` bytes kept free on the main device."""
        order = [key for key in max_memory if isinstance(key, int)] + (["cpu"] if "cpu" in max_memory else [])
        free = {key: max_memory[key] for key in order}
        free[main] = free.get(main, 0) - non_layer - activation_bytes - streamed
        devices: list[str | int] = []
        position = 0
        for size in layer_sizes:
            while position < len(order) and free[order[position]] < size:
                position += 1  # layers stay in order: once a device is full, the next one's turn
            if position == len(order):
                devices.append("disk")
                continue
            free[order[position]] -= size
            devices.append(order[position])
        return devices

    devices = fill(0)
    streamed_from = {"disk"} if main == "cpu" else {"cpu", "disk"}
    if any(device in streamed_from for device in devices):
        devices = fill(largest_layer)  # an offloaded layer is streamed onto the main device for its forward
    device_map: dict[str, str | int] = {name: main for name in others}
    device_map.update(zip(layers, devices, strict=True))
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
        cpu_writeback_bytes=writeback,
    )


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
        f"estimate: weights {format_bytes(plan.total_weight_bytes)} in total; {plan.main_device}'s budget also "
        f"holds calibration activations (~{format_bytes(plan.activation_bytes)}) and, when layers are offloaded, "
        f"the one streamed onto it ({format_bytes(plan.largest_layer_bytes)}); "
        "disk-resident layers are read again for every calibration batch."
        + (f" CPU: {format_bytes(plan.cpu_writeback_bytes)} counted for the disk layers' weights, which "
           "calibration writes back into RAM (ModelOpt's offload writeback; the algorithm changes weights)."
           if plan.cpu_writeback_bytes else "")
    )
    shortfall = plan.main_device_shortfall()
    if shortfall and plan.main_device != "cpu":  # a CPU budget of 0 is the documented "every layer to disk"
        console.print(
            f"[bold yellow]warning:[/] {plan.main_device} needs ~{format_bytes(plan.main_device_need())} at its peak "
            f"(embeddings, final norm and head, which never go to disk, the activations and one streamed layer): "
            f"{format_bytes(shortfall)} over --max_gpu_memory {format_bytes(plan.max_memory[0])}. Raise "
            f"--max_gpu_memory to at least {format_bytes(plan.main_device_need())}, or lower --batch_size / --max_seq_len."
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
