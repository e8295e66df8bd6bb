"""Every MoE expert calibrated, and a check that it was.

With a few hundred calibration samples a router never picks some experts, so
their activation quantizers see no data. ModelOpt 0.47 hides that in two ways:
for ModuleList experts it copies the largest sibling's input amax into every
expert (``layer_sync_moe_local_experts_amax``), and at export it fills what is
still missing from a sibling or a fixed 0.5 (``set_expert_quantizer_amax``).
The checkpoint then looks complete while some experts' scales were never
measured (llm-compressor and ModelOpt users report such zero or borrowed
expert scales). ``--calib_all_experts`` (default on) sends every calibration
token through every expert:

* MoE blocks ModelOpt wraps (``_QuantSparseSequentialMoe``: a router with
  ``top_k`` and iterable experts) use ModelOpt's own mechanism,
  ``algorithm.moe_calib_experts_ratio = 1.0`` (an extra pass with
  ``top_k = num_experts`` before the real one; it also turns the sibling sync
  off, so each expert keeps its own statistics).
* transformers 5 fused experts (``experts.gate_up_proj`` [E, 2I, H], called as
  ``experts(hidden, top_k_index, top_k_weights)``) are not wrapped by ModelOpt
  at block level, so ``route_all_experts`` patches the experts' forward while
  the calibration loop runs: the call gets *every* expert index with weight 0
  for the experts the router did not pick. Each expert then runs on every
  token, and the block's output is unchanged (a not-picked expert adds
  ``x * 0``; only matmul rounding of a bigger batch differs, ~1e-7 in
  float32), so later layers see realistic activations. Cost: the experts'
  calibration compute grows by num_experts / top_k.

``CoverageRecorder`` records which experts' quantizers were called during the
calibration loop; ``coverage_report`` lists the experts that received no
token and the enabled quantizers left without statistics (amax None or zero).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from checkpoint_formats.health import describe_names
from foundation.errors import UserError

# A quantizer inside one expert: ``...experts.3.down_proj.input_quantizer`` (ModuleList experts) or
# ``...experts.down_proj_weight_quantizers.3`` (ModelOpt's per-expert quantizers of fused experts).
_EXPERT_QUANTIZER = re.compile(r"^(?P<experts>.*\.experts)\.(?:(?P<listed>\d+)\.|[A-Za-z0-9_]+_quantizers\.(?P<fused>\d+)$)")


def expert_of(quantizer_name: str) -> str | None:
    """``model.layers.0.mlp.experts.3`` for a quantizer of expert 3, None outside routed experts."""
    match = _EXPERT_QUANTIZER.match(quantizer_name)
    if match is None:
        return None
    return f"{match['experts']}.{match['listed'] or match['fused']}"


def _num_experts(module: torch.nn.Module) -> int | None:
    for attribute in ("num_experts", "n_routed_experts", "num_local_experts"):
        value = getattr(module, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def is_moe_model(model: torch.nn.Module) -> bool:
    """Any block with an ``experts`` submodule (fused 3-D experts or a ModuleList of expert MLPs)."""
    return any(isinstance(getattr(module, "experts", None), torch.nn.Module) for module in model.modules())


def all_experts_call(num_experts: int, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
    """The (index, weights) of one experts call routed to every expert; the router's weights where it
    picked, 0 elsewhere, so the weighted sum over experts is the original one. Indices equal to
    ``num_experts`` (a sentinel some models use for dropped tokens) contribute nowhere."""
    tokens = top_k_index.shape[0]
    full = torch.zeros(tokens, num_experts + 1, dtype=top_k_weights.dtype, device=top_k_weights.device)
    full.scatter_add_(1, top_k_index.long().clamp(0, num_experts), top_k_weights)
    index = torch.arange(num_experts, device=top_k_index.device, dtype=top_k_index.dtype).expand(tokens, num_experts)
    return index, full[:, :num_experts].contiguous()


def _routes_itself(block: torch.nn.Module) -> bool:
    """ModelOpt's ``moe_calib_experts_ratio`` was set on this block: it widens top_k by itself."""
    return getattr(block, "_moe_calib_experts_ratio", None) is not None


def fused_experts_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, int]]:
    """Experts modules called with (hidden, top_k_index, top_k_weights) that ModelOpt does not route."""
    found = []
    for name, block in model.named_modules():
        experts = getattr(block, "experts", None)
        if not isinstance(experts, torch.nn.Module) or _routes_itself(block):
            continue
        count = _num_experts(experts) or _num_experts(getattr(block, "gate", block))
        if count is not None:
            found.append((f"{name}.experts" if name else "experts", experts, count))
    return found


@contextlib.contextmanager
def route_all_experts(model: torch.nn.Module, skipped_layers: set[str] | None = None) -> Iterator[list[str]]:
    """While active, fused experts compute every expert on every token (see the module docstring).

    Yields the names of the experts modules patched. A call that does not look like
    ``(hidden [T, H], top_k_index [T, k] int, top_k_weights [T, k] float)`` is passed through unchanged
    and its module named in ``skipped_layers``, so the coverage report can say why it stayed partial.
    """
    patched: list[tuple[str, torch.nn.Module, object | None]] = []
    skipped = skipped_layers if skipped_layers is not None else set()
    for name, experts, count in fused_experts_modules(model):
        original = experts.forward
        own = experts.__dict__.get("forward")  # an instance-level forward (rare) is put back as it was

        def forward(hidden_states, *args, _original=original, _count=count, _name=name, **kwargs):
            if len(args) >= 2 and _looks_routed(hidden_states, args[0], args[1]):
                index, weights = all_experts_call(_count, args[0], args[1])
                return _original(hidden_states, index, weights, *args[2:], **kwargs)
            skipped.add(_name)
            return _original(hidden_states, *args, **kwargs)

        experts.forward = forward
        patched.append((name, experts, own))
    try:
        yield [name for name, _, _ in patched]
    finally:
        for _, experts, own in patched:
            if own is None:
                del experts.forward  # the class's forward shows through again
            else:
                experts.forward = own


def _looks_routed(hidden: object, index: object, weights: object) -> bool:
    return (isinstance(hidden, torch.Tensor) and isinstance(index, torch.Tensor) and isinstance(weights, torch.Tensor)
            and index.dim() == 2 and not index.dtype.is_floating_point and weights.shape == index.shape
            and weights.dtype.is_floating_point and hidden.shape[0] == index.shape[0])


class CoverageRecorder:
    """Which experts' quantizers ran on at least one token during the calibration loop.

    Evidence per expert: its own input quantizers (ModuleList experts) ran on a non-empty input; for
    fused experts, whose input quantizers ModelOpt shares across experts, its per-expert weight
    quantizer ran (ModelOpt calls it only inside that expert's ``F.linear``).
    """

    def __init__(self) -> None:
        self.inputs_seen: set[str] = set()
        self.weights_seen: set[str] = set()
        self.unrouted_layers: set[str] = set()

    @contextlib.contextmanager
    def recording(self, model: torch.nn.Module, all_experts: bool) -> Iterator[None]:
        from modelopt.torch.quantization.nn import TensorQuantizer

        handles = []
        for name, module in model.named_modules():
            expert = expert_of(name)
            if expert is not None and isinstance(module, TensorQuantizer) and module.is_enabled:
                seen = self.inputs_seen if "input_quantizer" in name else self.weights_seen
                handles.append(module.register_forward_hook(self._hook(expert, seen)))
        routing = route_all_experts(model, self.unrouted_layers) if all_experts else contextlib.nullcontext()
        try:
            with routing:
                yield
        finally:
            for handle in handles:
                handle.remove()

    @staticmethod
    def _hook(expert: str, seen: set[str]) -> Callable:
        def hook(module, inputs, output) -> None:
            if inputs and isinstance(inputs[0], torch.Tensor) and inputs[0].numel():
                seen.add(expert)
        return hook

    def wrap(self, forward_loop: Callable[[torch.nn.Module], None], all_experts: bool) -> Callable[[torch.nn.Module], None]:
        """The forward loop for ``mtq.quantize``, recording (and routing to every expert) on each call."""
        def loop(model: torch.nn.Module) -> None:
            with self.recording(model, all_experts):
                forward_loop(model)
        return loop


def _expects_amax(quantizer) -> bool:
    """An enabled quantizer whose amax comes from calibration (not dynamic, MX, or a constant)."""
    if not quantizer.is_enabled or getattr(quantizer, "_dynamic", False) or getattr(quantizer, "is_mx_format", False):
        return False
    if getattr(quantizer, "_use_constant_amax", False) or getattr(quantizer, "_constant_amax", None) is not None:
        return False
    return getattr(quantizer, "_calibrator", None) is not None


def quantizers_without_statistics(model: torch.nn.Module) -> list[str]:
    """Enabled quantizers that should hold a calibrated amax and hold none, or only zeros."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    missing = []
    for name, module in model.named_modules():
        if not isinstance(module, TensorQuantizer) or not _expects_amax(module):
            continue
        amax = getattr(module, "_amax", None)
        if amax is None or (isinstance(amax, torch.Tensor) and not amax.is_meta and not bool((amax != 0).any())):
            missing.append(name)
    return missing


def expert_names(model: torch.nn.Module) -> tuple[list[str], set[str], bool]:
    """Every routed expert that holds an enabled quantizer (in model order), those with input quantizers
    of their own, and whether the experts' activations are quantized at all (shared quantizers count)."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    names: dict[str, None] = {}
    own_inputs: set[str] = set()
    activations = False
    for name, module in model.named_modules():
        if not isinstance(module, TensorQuantizer) or not module.is_enabled:
            continue
        expert = expert_of(name)
        is_input = "input_quantizer" in name
        activations = activations or (is_input and ".experts." in name)
        if expert is not None:
            names.setdefault(expert)
            if is_input:
                own_inputs.add(expert)
    return list(names), own_inputs, activations


@dataclass
class CoverageReport:
    calib_all_experts: bool
    experts: int = 0
    experts_without_tokens: list[str] = field(default_factory=list)
    quantizers_without_statistics: list[str] = field(default_factory=list)
    unrouted_layers: list[str] = field(default_factory=list)

    def as_manifest(self) -> dict:
        return {"calib_all_experts": self.calib_all_experts, "experts": self.experts,
                "experts_without_tokens": self.experts_without_tokens,
                "quantizers_without_statistics": self.quantizers_without_statistics,
                "unrouted_layers": self.unrouted_layers}


def coverage_report(model: torch.nn.Module, recorder: CoverageRecorder, calib_all_experts: bool) -> CoverageReport:
    """Weight-only formats report no expert as without tokens: their scales come from the weights alone."""
    experts, own_inputs, activations = expert_names(model)

    def seen(expert: str) -> bool:
        return expert in (recorder.inputs_seen if expert in own_inputs else recorder.weights_seen)

    return CoverageReport(
        calib_all_experts=calib_all_experts, experts=len(experts),
        experts_without_tokens=[name for name in experts if activations and not seen(name)],
        quantizers_without_statistics=quantizers_without_statistics(model),
        unrouted_layers=sorted(recorder.unrouted_layers),
    )


def enforce_coverage(report: CoverageReport, allow_uncalibrated: bool, console) -> None:
    """Refuse quantizers without statistics (unless allowed); warn about experts that saw no token."""
    if report.experts_without_tokens:
        how = ("their input scales are a sibling's or ModelOpt's fallback, not their own" if not report.calib_all_experts
               else "these layers could not be routed to every expert")
        console.print(f"[bold yellow]warning:[/] {len(report.experts_without_tokens)} of {report.experts} experts received "
                      f"no calibration token ({describe_names(report.experts_without_tokens)}): {how}. "
                      + ("Drop --no_calib_all_experts, or raise --max_samples." if not report.calib_all_experts
                         else f"Unrouted: {describe_names(report.unrouted_layers) or '-'}; raise --max_samples."))
    if report.quantizers_without_statistics and not allow_uncalibrated:
        raise UserError(
            "calibration",
            f"{len(report.quantizers_without_statistics)} enabled quantizer(s) have no calibration statistics "
            f"(amax missing or zero): {describe_names(report.quantizers_without_statistics)}; the export would "
            "write zero or made-up scales for them",
            "keep --calib_all_experts on (the default) and/or raise --max_samples; keep those layers in full precision "
            "with --skip_layers; or pass --allow_uncalibrated to export anyway (ModelOpt then fills them from a sibling "
            "or a fixed default)",
        )
    if report.quantizers_without_statistics:
        console.print(f"[bold yellow]warning:[/] exporting {len(report.quantizers_without_statistics)} quantizer(s) "
                      f"without calibration statistics (--allow_uncalibrated): "
                      f"{describe_names(report.quantizers_without_statistics)}")
