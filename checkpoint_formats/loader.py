"""Load a quantized (or plain) checkpoint into a transformers model: the loader transformers lacks.

transformers cannot load ModelOpt NVFP4 at all and mishandles parts of
compressed-tensors NVFP4 (per-expert global scales; README, "Quantized checkpoint
formats and our loader"). We build
the model from its config on the meta device and fill it tensor by tensor from
the safetensors files, straight onto the device each module is placed on:

- ``dequantize=True``: every quantized Linear becomes a plain Linear in
  ``dtype`` (what PEFT LoRA attaches to);
- ``dequantize=False``: it becomes an ``NVFP4Linear`` / ``FP8Linear`` keeping
  the packed weight and its scales, dequantized in the forward pass.

Fused MoE experts (3-D ``gate_up_proj`` / ``down_proj`` parameters in
transformers 5) are assembled from the per-expert tensors ModelOpt exports
(``experts.{e}.gate_proj`` ...), each dequantized with its own global scale;
with ``dequantize=False`` they stay packed (``packed_experts``) and are
dequantized one layer at a time inside its forward. Unquantized checkpoints go
through ``from_pretrained``, which knows every model family's renamings.
"""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

from checkpoint_formats import experts as fused_experts
from checkpoint_formats import packed_experts, placement
from checkpoint_formats.detect import CheckpointFormat, FormatKind, detect_format
from checkpoint_formats.layout import NO_PARAMETER_SUFFIXES as _IGNORED_SUFFIXES
from checkpoint_formats.modules import FP8Linear, NVFP4Linear
from checkpoint_formats.naming import check_family_supported, naming_for
from checkpoint_formats.quantized_tensors import (
    QuantizedSource,
    find_quantized,
    read_dequantized,
    read_fp8,
    read_input_scale,
    read_nvfp4,
    read_pre_quant_scale,
)
from checkpoint_formats.reader import CheckpointReader
from foundation.errors import UserError
from foundation.load_report import require_complete_load

logger = logging.getLogger(__name__)


def _check_dtype(dtype: torch.dtype) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.itemsize < 2:
        raise UserError(
            "dtype",
            f"{dtype} is not a compute dtype",
            "use torch.bfloat16, torch.float16 or torch.float32; FP8/NVFP4 weights are kept packed with dequantize=False",
        )


def _activation_mode(kind: FormatKind) -> str | None:
    if kind in {FormatKind.MODELOPT_NVFP4, FormatKind.CT_NVFP4}:
        return "nvfp4"
    if kind in {FormatKind.MODELOPT_W4A8, FormatKind.MODELOPT_FP8, FormatKind.CT_FP8}:
        return "fp8"
    return None


def _empty_model(fmt: CheckpointFormat, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(fmt.path, trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # we handle it; transformers must not try
    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    except ValueError as error:
        raise UserError(
            str(fmt.path / "config.json"),
            f"no causal-LM class for this config ({error})",
            "pass trust_remote_code=True if the model ships its own code",
        ) from error
    return model


def _quantized_module(
    linear: nn.Linear,
    reader: CheckpointReader,
    source: QuantizedSource,
    dtype: torch.dtype,
    activation_mode: str | None,
    simulate: bool,
) -> nn.Module:
    """The packed replacement for one Linear, still on meta (sizes are right for placement)."""
    bias = linear.bias is not None
    _, scale_shape = reader.metadata(source.names()[1])
    common = dict(dtype=dtype, activation_mode=activation_mode, simulate_activations=simulate)
    if source.scheme == "nvfp4":
        block = linear.in_features // scale_shape[-1] if scale_shape and scale_shape[-1] else 16
        return NVFP4Linear(linear.in_features, linear.out_features, bias, block_size=block, **common)
    return FP8Linear(linear.in_features, linear.out_features, bias, scale_shape=scale_shape, **common)


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor, device: torch.device | str) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    value = value.to(device)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=value.is_floating_point() and value.itemsize >= 2)
    else:
        module._buffers[attr] = value


def _fill_quantized_linear(model, reader, module_name, source, packed_module, dtype, devices, consumed) -> None:
    device = devices.device_of(f"{module_name}.weight")
    if source.scheme == "nvfp4":
        quantized = read_nvfp4(reader, source, (packed_module.out_features, packed_module.in_features))
        tensors = {
            "weight": quantized.packed,
            "weight_scale": quantized.weight_scale,
            "weight_scale_2": quantized.weight_scale_2.reshape(()),
        }
    else:
        quantized = read_fp8(reader, source, (packed_module.out_features, packed_module.in_features))
        tensors = {"weight": quantized.weight, "weight_scale": quantized.weight_scale}
    input_scale = read_input_scale(reader, source)
    if input_scale is not None:
        tensors["input_scale"] = input_scale
    pre_quant_scale = read_pre_quant_scale(reader, source)
    if pre_quant_scale is not None:
        tensors["pre_quant_scale"] = pre_quant_scale
    for attr, tensor in tensors.items():
        _set_tensor(model, f"{module_name}.{attr}", tensor, device)
    consumed.update(name for name in source.names() if name in reader)


def load_checkpoint(
    path,
    *,
    dequantize: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    device_map=None,
    max_memory: dict | None = None,
    simulate_activations: bool = False,
    trust_remote_code: bool = False,
) -> tuple[nn.Module, CheckpointFormat]:
    """Load ``path`` into a transformers causal LM; returns ``(model, format)``.

    ``device_map``: None (all on CPU), a device ("cuda:0"), "auto"/"balanced"/
    "sequential" or an explicit ``{module_prefix: device}`` as in
    ``from_pretrained``. ``simulate_activations`` rounds each quantized
    Linear's input as the deployed kernel would (needs ``dequantize=False``;
    ``modules.set_activation_simulation`` switches it later).
    """
    _check_dtype(dtype)
    fmt = detect_format(path)
    if simulate_activations and (dequantize or not fmt.activations_quantized):
        raise UserError(
            "simulate_activations",
            "needs a checkpoint with quantized activations loaded with dequantize=False"
            + (f" ({fmt.kind.value} has none)" if not fmt.activations_quantized else ""),
            "drop simulate_activations, or load with dequantize=False",
        )
    if not fmt.kind.is_quantized:
        return placement.from_pretrained_plain(fmt, dtype, device_map, max_memory, trust_remote_code), fmt

    check_family_supported(fmt.config, str(fmt.path / "config.json"))
    model = _empty_model(fmt, dtype, trust_remote_code)
    # The model's spelling of every stored name: NemotronH's backbone.* as model.*, Mixtral's block_sparse_moe as mlp.
    with CheckpointReader(fmt) as disk:
        naming = naming_for(disk.names(), [name for name, _ in model.named_parameters()], fmt.config)
    reader = CheckpointReader(fmt, naming)
    activation_mode = _activation_mode(fmt.kind)

    sources: dict[str, QuantizedSource] = {}
    for module_name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            source = find_quantized(reader, module_name)
            if source is not None:
                sources[module_name] = source
                if not dequantize:
                    model.set_submodule(
                        module_name,
                        _quantized_module(module, reader, source, dtype, activation_mode, simulate_activations),
                    )

    packed_params: list[str] = []
    if not dequantize:
        for name, tensor in list(model.named_parameters()):
            if fused_experts.is_fused_expert_param(name, tensor) and name not in reader:
                parts = packed_experts.packable_parts(reader, name)
                if parts is not None:
                    packed_experts.replace_with_meta_buffers(model, reader, name, parts)
                    model.get_submodule(name.rpartition(".")[0])._packed_dtype = dtype
                    packed_params.append(name)

    devices = placement.resolve(model, device_map, max_memory)
    consumed: set[str] = set()
    for name in packed_params:
        module_name, _, param = name.rpartition(".")
        module = model.get_submodule(module_name)
        for suffix, value in packed_experts.read_packed(reader, name, consumed).items():
            expected = tuple(getattr(module, f"{param}_{suffix}").shape)
            if tuple(value.shape) != expected:
                raise UserError(
                    f"{fmt.path}: {module_name}.*",
                    f"per-expert {param} tensors stack to {tuple(value.shape)} ({suffix}), the model expects {expected}",
                    "the checkpoint does not match its config.json (num_experts or sizes)",
                )
            _set_tensor(model, f"{module_name}.{param}_{suffix}", value, devices.device_of(name))
    for module_name, source in sources.items():
        if dequantize:
            linear = model.get_submodule(module_name)
            device = devices.device_of(f"{module_name}.weight")
            weight = read_dequantized(reader, source, dtype, tuple(linear.weight.shape), device)
            _set_tensor(model, f"{module_name}.weight", weight, device)
            consumed.update(name for name in source.names() if name in reader)
        else:
            _fill_quantized_linear(
                model, reader, module_name, source, model.get_submodule(module_name), dtype, devices, consumed
            )

    meta_tensors = [(n, t) for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    for name, tensor in meta_tensors:
        if name in reader and name not in consumed:
            value = reader.get(name)
            if tuple(value.shape) != tuple(tensor.shape):
                raise UserError(
                    f"{fmt.path}: {name}",
                    f"has shape {tuple(value.shape)}, the model built from config.json expects {tuple(tensor.shape)}",
                    "the checkpoint does not match its config.json",
                )
            _set_tensor(model, name, value.to(dtype) if value.is_floating_point() else value, devices.device_of(name))
            consumed.add(name)
        elif fused_experts.is_fused_expert_param(name, tensor):
            value = fused_experts.assemble(reader, name, tuple(tensor.shape), dtype, consumed, devices.device_of(name))
            if value is not None:
                _set_tensor(model, name, value, devices.device_of(name))

    for name, buffer in list(model.named_buffers()):
        # Buffers were built for real (include_buffers=False), so the meta pass above skips them; a stored one
        # (NemotronH's router e_score_correction_bias) must still be read, in the buffer's own dtype (fp32 there).
        if name in reader and name not in consumed and buffer.device.type != "meta":
            _set_tensor(model, name, reader.get(name).to(buffer.dtype), devices.device_of(name))
            consumed.add(name)
    placement.tie_and_check(model, fmt)
    for name, buffer in list(model.named_buffers()):  # non-persistent ones (rotary inv_freq) were built on the CPU
        if buffer.device != devices.device_of(name):
            _set_tensor(model, name, buffer, devices.device_of(name))
    leftovers = [n for n in reader.names() if n not in consumed and not n.endswith(_IGNORED_SUFFIXES)]
    optional = [re.compile(pattern) for pattern in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()]
    ignored = [n for n in leftovers if any(pattern.search(n) for pattern in optional)]
    if ignored:  # e.g. multi-token-prediction heads the HF class declares it does not build (from_pretrained skips them too)
        logger.warning("%d checkpoint tensor(s) the model class declares optional were skipped, e.g. %s",
                       len(ignored), ignored[:3])
    unexpected = [n for n in leftovers if n not in ignored]
    if unexpected:  # as transformers' loading report would call them: a stage must not go on without them
        reader.close()
        require_complete_load({"unexpected_keys": unexpected}, str(fmt.path), str(fmt.path))
    reader.close()
    model.eval()
    placement.dispatch(model, devices)
    return model, fmt
