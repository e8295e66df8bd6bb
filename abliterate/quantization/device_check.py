"""Refuse, before loading, a quantization that cannot run where the model will live.

Without this check the failure comes from deep inside torchao or
bitsandbytes, after minutes of loading, as an assertion about compute
capabilities or a missing kernel library. The rules are a pure function of
facts (``DeviceFacts``) so the GPU rules are tested on a CPU; ``device_facts``
gathers the facts at the edge. What runs where was measured with torchao 0.18
on CPU (the table in README, "Quantizing on load (--quantization)").
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from abliterate.quantization.options import (
    BNB_4BIT,
    NVFP4,
    TORCHAO_AUTOQUANT,
    TORCHAO_FLOAT8_DYNAMIC,
    TORCHAO_FLOAT8_WEIGHT_ONLY,
    TORCHAO_INT4_WEIGHT_ONLY,
    TORCHAO_INT8_DYNAMIC,
    TORCHAO_INT8_WEIGHT_ONLY,
    QuantizationRequest,
)
from foundation.errors import UserError

FLOAT8_MIN_CAPABILITY = (8, 9)  # Ada / Hopper: torchao's float8 dynamic kernels assert it
CPU_ALTERNATIVES = f"{TORCHAO_INT8_WEIGHT_ONLY}, {TORCHAO_INT8_DYNAMIC}, {TORCHAO_FLOAT8_WEIGHT_ONLY}, {TORCHAO_INT4_WEIGHT_ONLY} or {NVFP4}"


@dataclass(frozen=True)
class DeviceFacts:
    device_type: str  # where the quantized Linears will run: "cpu" or "cuda"
    cuda_capability: tuple[int, int] | None  # of the first GPU used, None without CUDA
    bitsandbytes_installed: bool
    torchao_has_autoquant: bool

    def describe(self) -> str:
        if self.device_type == "cuda" and self.cuda_capability is not None:
            return f"CUDA GPU (compute capability {self.cuda_capability[0]}.{self.cuda_capability[1]})"
        return "CPU" if self.device_type == "cpu" else self.device_type


def target_device_type(device_map) -> str:
    """'cuda' when ``device_map`` puts anything on a GPU, else 'cpu' (what from_pretrained would do)."""
    if device_map is None:
        return "cpu"
    values = device_map.values() if isinstance(device_map, dict) else [device_map]
    for value in values:
        text = str(value)
        if isinstance(value, int) or text.startswith("cuda") or text.isdigit():
            return "cuda"
        if text in {"auto", "balanced", "balanced_low_0", "sequential"} and torch.cuda.is_available():
            return "cuda"
    return "cpu"


def device_facts(device_map) -> DeviceFacts:
    device_type = target_device_type(device_map)
    capability = torch.cuda.get_device_capability(0) if device_type == "cuda" and torch.cuda.is_available() else None
    autoquant = False
    if importlib.util.find_spec("torchao") is not None:
        import torchao.quantization

        autoquant = hasattr(torchao.quantization, "autoquant")
    return DeviceFacts(device_type, capability, importlib.util.find_spec("bitsandbytes") is not None, autoquant)


def _problem(option: str, facts: DeviceFacts) -> tuple[str, str] | None:
    """(why it cannot run, what to choose instead) or None when it can."""
    on_cpu = facts.device_type != "cuda"
    if option == TORCHAO_AUTOQUANT and not facts.torchao_has_autoquant:
        return ("torchao 0.18 (the pinned version) no longer ships autoquant",
                f"choose an explicit config: {TORCHAO_INT8_DYNAMIC} or {TORCHAO_FLOAT8_DYNAMIC} (compute capability >= 8.9) "
                f"for speed, {TORCHAO_INT4_WEIGHT_ONLY} for memory")
    if option == TORCHAO_AUTOQUANT and on_cpu:
        return "autoquant benchmarks CUDA kernels and needs a GPU", f"on CPU choose {CPU_ALTERNATIVES}"
    if option == BNB_4BIT and not facts.bitsandbytes_installed:
        # bitsandbytes 0.50.2 runs NF4 on CPU too (measured), so only its absence is a problem
        return ("bitsandbytes is not installed (it is in the 'gpu' extra)",
                "pip install 'quant-abliterate[gpu]' (or pip install bitsandbytes==0.50.2), "
                f"or choose {TORCHAO_INT4_WEIGHT_ONLY} or {NVFP4} for 4-bit weights")
    if option == TORCHAO_FLOAT8_DYNAMIC:
        if on_cpu:
            return ("torchao's float8 dynamic-activation kernels need a CUDA GPU with compute capability >= 8.9",
                    f"on CPU choose {TORCHAO_FLOAT8_WEIGHT_ONLY} (same weights, activations unquantized) or {TORCHAO_INT8_DYNAMIC}")
        if facts.cuda_capability is not None and facts.cuda_capability < FLOAT8_MIN_CAPABILITY:
            return ("torchao's float8 dynamic-activation kernels need compute capability >= 8.9 (Ada, Hopper or newer)",
                    f"choose {TORCHAO_INT8_DYNAMIC} or {TORCHAO_FLOAT8_WEIGHT_ONLY}")
    return None


def check_runs_here(request: QuantizationRequest, facts: DeviceFacts) -> None:
    """Raise a UserError naming the option, the device and an alternative if any option used cannot run."""
    for option in sorted(request.options_used()):
        problem = _problem(option, facts)
        if problem is not None:
            reason, fix = problem
            where = "--quantization" if option == request.option else "--quantization_overrides"
            raise UserError(where, f"'{option}' cannot run on this {facts.describe()}: {reason}", fix)
