"""Max calibration at the cost of a forward pass: no host syncs, no repeated weight reductions.

ModelOpt 0.47's ``max_calibrate`` first calibrates every weight quantizer on
its weight (``weight_only_quantize``), then runs our forward loop with every
quantizer collecting. Per quantized Linear and batch that costs, inside
ModelOpt's ``MaxCalibrator.collect``:

- the weight's amax again (a max and a min over the whole weight, i.e. every
  weight of the model read twice per batch) although the weight has not
  changed, so the running max cannot change either;
- three ``assert``s on device tensors (NaN, negative, inf), each a host sync
  that drains the GPU queue, for the weight and for the input quantizer
  (six per Linear, ~1,300 per batch on a 32-layer Llama);
- five small kernels (max, min, abs, abs, maximum) for an activation's amax.

:func:`fast_max_collection` wraps one pass of the loop (``quantize.calibrate``
enters it when the run's algorithm is ``max``, where weights stay constant):
weight quantizers that already hold their weight's amax stop collecting for
the pass, and the remaining max calibrators collect with one fused reduction
(``max |x|``) and no syncs. The values are the same floats: abs and max are
exact, ``max(a, a) == a``, and NaN/inf propagate through the running max, so
:func:`check_finite` finds them afterwards, once per ``check_every`` batches
and at the end of the pass, with ModelOpt's own messages (so
``calibrate.explain_calibration_failure`` still turns them into a UserError).
Everything is restored when the pass ends, so ModelOpt's
``finish_stats_collection`` sees the state it left.

What is left per Linear is ModelOpt's Python: its quantized-Linear forward,
three ``TensorQuantizer.forward`` calls and a dynamic-attribute lookup of the
weight, ~100 us of host time per Linear and batch, which on a GPU is longer
than the Linear's GEMM at calibration batch sizes. With ``lean_linears`` a
quantized ``nn.Linear`` whose quantizers are in the plain state of a max pass
(:func:`lean_linear_forward` lists the conditions) runs, for the pass, a
forward that does exactly what ModelOpt's does in that state: the input's
amax into its calibrator, then ``F.linear`` on the unquantized weight. Any
other module keeps ModelOpt's forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch


def is_weight_quantizer_name(name: str) -> bool:
    """ModelOpt's own test (``_needs_activation_forward_for_max_calib``), incl. ``weight_quantizer.0`` stages,
    plus fused MoE experts' per-expert ``gate_up_proj_weight_quantizers.3`` (``weight_only_quantize`` feeds each
    the same expert slice its forward does: the plugin's ``iter_weights_for_calibration``)."""
    return any(part.endswith(("weight_quantizer", "weight_quantizers")) for part in name.split("."))


@torch.no_grad()
def abs_max(x: torch.Tensor) -> torch.Tensor:
    """``max |x|`` over all elements in one kernel; the same value ModelOpt's ``reduce_amax(x, axis=None)`` gives.

    ``reduce_amax`` computes ``maximum(|max x|, |min x|)`` (five kernels); the infinity norm is the same
    number (abs and max are exact in every float dtype) and propagates NaN like ``torch.max``.
    """
    return torch.linalg.vector_norm(x, ord=float("inf"))


_ONE_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
_INFINITY = float("inf")


def _sync_free_collect(self, x: torch.Tensor) -> None:
    """``MaxCalibrator.collect`` without its three host-syncing asserts (see :func:`check_finite`).

    Called once per quantizer and batch, so it stays lean: no imports, one reduction kernel + one max.
    """
    if self._axis is None and x.dtype in _ONE_KERNEL_DTYPES:
        local_amax = torch.linalg.vector_norm(x, ord=_INFINITY)  # abs_max(x)
    else:  # per-channel / per-block axes, FP8 inputs: ModelOpt's own reduction
        from modelopt.torch.quantization import utils as quant_utils

        reduce_axis = quant_utils.convert_quantization_axis_to_reduce_axis(x, self._axis)
        local_amax = quant_utils.reduce_amax(x, axis=reduce_axis).detach()
    if x.device.type == "meta" or self._calib_amax is None:
        self._calib_amax = local_amax
        return
    if local_amax.shape != self._calib_amax.shape:
        raise RuntimeError("amax shape changed!")
    self._calib_amax = torch.max(self._calib_amax, local_amax)


@dataclass
class FastMaxCollection:
    """What one pass changed, so it can be checked and undone."""

    paused_weight_quantizers: list = field(default_factory=list)
    sync_free: dict = field(default_factory=dict)  # quantizer name -> its MaxCalibrator
    lean_linears: list = field(default_factory=list)  # modules running lean_linear/attention_forward

    @torch.no_grad()
    def check_finite(self) -> None:
        """ModelOpt's NaN / negative / inf checks over every sync-free calibrator: one host sync per device."""
        by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
        for name, calibrator in self.sync_free.items():
            amax = calibrator._calib_amax
            if amax is not None and amax.device.type != "meta":
                by_device.setdefault(amax.device, []).append((name, amax))
        for entries in by_device.values():
            values = torch.cat([amax.reshape(-1) for _, amax in entries])  # one kernel (cat promotes dtypes)
            if not (values.isnan() | values.isinf() | (values < 0)).any().item():  # the one sync
                continue
            for name, amax in entries:
                nan, negative, inf = amax.isnan().any(), (amax < 0).any(), amax.isinf().any()
                # ModelOpt's wording (calib/max.py), plus the quantizer's name.
                if nan:
                    raise AssertionError(f"detected nan values in amax of {name}")
                if negative:
                    raise AssertionError(f"detected negative values after abs in {name}, could be torch or cuda bug")
                if inf:
                    raise AssertionError(f"detected inf values in amax of {name}")


@contextlib.contextmanager
def fast_max_collection(model: torch.nn.Module, lean_linears: bool = True) -> Iterator[FastMaxCollection]:
    """Inside: weight quantizers with an amax stop collecting; max calibrators collect without syncs.

    Only ModelOpt's plain ``MaxCalibrator`` (not its subclasses, not ``track_amax``, no bias
    calibrator) is touched; everything else collects as ModelOpt wrote it. The caller checks
    :meth:`FastMaxCollection.check_finite` (``quantize.calibrate`` does, per ``check_every`` batches).
    """
    from modelopt.torch.quantization.calib import MaxCalibrator
    from modelopt.torch.quantization.nn import TensorQuantizer
    from modelopt.torch.quantization.nn.modules.quant_module import QuantModule

    state = FastMaxCollection()
    try:  # everything changed is recorded as it is changed, so a failure half-way is undone too
        for name, module in model.named_modules():
            if not isinstance(module, TensorQuantizer) or module._disabled or not module._if_calib or module._dynamic:
                continue
            calibrator = getattr(module, "_calibrator", None)
            if type(calibrator) is not MaxCalibrator or calibrator._track_amax or module.bias_calibrator is not None:
                continue
            if is_weight_quantizer_name(name) and calibrator._calib_amax is not None:
                module._if_calib = False  # its amax is the weight's, collected once by ModelOpt's weight_only_quantize
                state.paused_weight_quantizers.append(module)
            else:
                calibrator.collect = _sync_free_collect.__get__(calibrator)
                state.sync_free[name] = calibrator
        if lean_linears:
            paused = {id(module) for module in state.paused_weight_quantizers}
            sync_free = {id(calibrator) for calibrator in state.sync_free.values()}
            for module in model.modules():
                if not isinstance(module, QuantModule):
                    continue
                forward = lean_linear_forward(module, paused, sync_free) or lean_attention_forward(module)
                if forward is not None:
                    module.forward = forward
                    state.lean_linears.append(module)
        yield state
    finally:
        for module in state.lean_linears:
            del module.forward
        for module in state.paused_weight_quantizers:
            module._if_calib = True
        for calibrator in state.sync_free.values():
            del calibrator.collect


def _has_hooks(module: torch.nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or getattr(module, "_forward_hooks_with_kwargs", None))


def _block_sizes_settled(quantizer) -> bool:
    """ModelOpt turns per-channel ``block_sizes`` into an ``axis`` on a quantizer's first call; lean forwards skip that."""
    blocks = quantizer.block_sizes
    return blocks is None or not all(value is None for key, value in blocks.items() if isinstance(key, int))


def _passes_through(quantizer, paused: set[int]) -> bool:
    """A quantizer whose forward returns its input untouched in this pass: disabled, or a weight quantizer we paused."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    if type(quantizer) is not TensorQuantizer or _has_hooks(quantizer) or quantizer.pre_quant_scale is not None:
        return False
    if quantizer.rotate_is_enabled or quantizer.rotate_back_is_enabled:
        return False
    if quantizer._disabled:
        return True
    return (id(quantizer) in paused and not quantizer._if_calib and not quantizer._if_quant
            and not quantizer.is_static_block_quant and _block_sizes_settled(quantizer))


def lean_linear_forward(module: torch.nn.Module, paused: set[int], sync_free: set[int]):
    """The pass's forward for a ModelOpt quantized ``nn.Linear``, or None where ModelOpt's must run.

    ModelOpt's forward in a max pass, for a Linear whose input quantizer collects with our sync-free
    max calibrator (no pre-quant scale, rotation, static blocks or hooks; not quantizing) and whose
    weight and output quantizers pass their input through (disabled, or a weight quantizer we paused),
    computes ``collect(x); F.linear(x, weight, bias)`` and nothing else; so does this one. A module
    whose ``forward`` is patched (accelerate's offload hooks) or whose class overrides ModelOpt's or
    torch's ``forward`` (SVDQuant, real-quant, plugins) is left alone, and so is every input that is not
    a plain tensor (DTensor, a quantized tensor).
    """
    import torch.nn.functional as F
    from modelopt.torch.quantization.nn import TensorQuantizer
    from modelopt.torch.quantization.nn.modules.quant_module import (
        QuantInputBase,
        QuantLinearConvBase,
    )

    if not isinstance(module, QuantLinearConvBase) or not isinstance(module, torch.nn.Linear):
        return None
    forwards = {cls for cls in type(module).__mro__ if "forward" in cls.__dict__}
    if "forward" in module.__dict__ or not forwards <= {QuantLinearConvBase, QuantInputBase, torch.nn.Linear,
                                                         torch.nn.Module}:
        return None
    if hasattr(module, "_forward_pre_dm") or set(module._get_dm_attribute_manager().da_keys()) != {"weight"}:
        return None
    input_quantizer = module.input_quantizer
    if (type(input_quantizer) is not TensorQuantizer or input_quantizer._disabled or input_quantizer._if_quant
            or id(input_quantizer._calibrator) not in sync_free or input_quantizer.pre_quant_scale is not None
            or input_quantizer.rotate_is_enabled or input_quantizer.is_static_block_quant
            or not _block_sizes_settled(input_quantizer) or _has_hooks(input_quantizer)):
        return None
    if not (_passes_through(module.weight_quantizer, paused) and _passes_through(module.output_quantizer, set())):
        return None
    if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
        return None
    collect, parameters, modelopt_forward = input_quantizer._calibrator.collect, module._parameters, module.forward

    def forward(x, *args, **kwargs):
        if args or kwargs or type(x) is not torch.Tensor:
            return modelopt_forward(x, *args, **kwargs)
        if x.numel():
            collect(x)
        return F.linear(x, parameters["weight"], parameters["bias"])

    return forward


BMM_QUANTIZERS = ("q_bmm_quantizer", "k_bmm_quantizer", "v_bmm_quantizer", "p_bmm_quantizer")


def lean_attention_forward(module: torch.nn.Module):
    """The pass's forward for ModelOpt's KV-cache attention wrapper whose bmm quantizers are all disabled, or None.

    ``_QuantAttention.forward`` patches transformers' attention interface on every call so that its
    q/k/v/p bmm quantizers see the attention inputs; with all four disabled (every format without
    ``--kv_cache``) the patched interface calls the original one with the same arguments, so the
    original class's forward gives the same outputs without the patching.
    """
    from modelopt.torch.quantization.plugins.huggingface import _QuantAttention

    if not isinstance(module, _QuantAttention) or "forward" in module.__dict__ or _has_hooks(module):
        return None
    original = _QuantAttention.get_attn_type(module)
    forwards = {cls for cls in type(module).__mro__ if "forward" in cls.__dict__}
    if not forwards <= {_QuantAttention, original, torch.nn.Module} or "forward" not in original.__dict__:
        return None
    quantizers = [getattr(module, name, None) for name in BMM_QUANTIZERS]
    if not all(quantizer is not None and quantizer._disabled and _passes_through(quantizer, set())
               for quantizer in quantizers):
        return None
    return original.forward.__get__(module)
