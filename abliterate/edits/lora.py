"""Edits applied as PEFT LoRA adapters: the base weights never change.

One adapter ("abliteration") covers every component: ``lora.Linear`` on
2-D projections and PEFT's ``target_parameters`` wrapper on fused 3-D expert
parameters (one low-rank pair per expert). A trial writes the factors of
``edits.delta`` into the adapter (``lora_B @ lora_A`` = delta, scaling 1);
resetting zeroes ``lora_B``, which gives back the base model's logits exactly.
This works the same on bf16 weights and on dequantized NVFP4 weights (the
formats loader with ``dequantize=True``), because PEFT only needs a Linear.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn
from torch.nn.utils import parametrize

from abliterate.architectures import Component
from abliterate.edits.batched_factors import FactorJob, factors_in_lockstep
from abliterate.edits.delta import Method, abliteration_factors
from abliterate.edits.offloaded import (
    OffloadedEditSlot,
    OffloadedTensor,
    find_offloaded,
)
from abliterate.edits.plan import AbliterationParameters, edit_directions, plan_edits
from abliterate.quantization.lora_support import (
    dequantized_weight,
    is_quantized_linear,
    register_quantized_lora_layers,
)
from checkpoint_formats import packed_experts
from foundation.errors import UserError

ADAPTER_NAME = "abliteration"


@dataclass(frozen=True)
class SkippedComponent:
    component: Component
    reason: str  # "NaN/inf weights" or "quantized weight-level component"


@dataclass
class ComponentPlacement:
    """Every component, sorted by how it is edited: in place (PEFT / parametrization), through an offload hook, or not."""

    in_place: list[Component]
    offloaded: dict[str, OffloadedTensor]  # parameter path -> the hook and key that hold its weight
    skipped: list[SkippedComponent]


def _weight_of(model: nn.Module, component: Component) -> torch.Tensor:
    module = model.get_submodule(component.module_name)
    if component.parameter_name in getattr(module, "_packed_expert_params", ()):
        return packed_experts.dequantize_packed(module, component.parameter_name, torch.float32)
    return getattr(module, component.parameter_name)


def _on_meta(module: nn.Module, component: Component) -> bool:
    """Whether the component's stored tensor is on the meta device (offloaded by accelerate, or never loaded)."""
    if component.parameter_name in getattr(module, "_packed_expert_params", ()):
        return getattr(module, f"{component.parameter_name}_packed").device.type == "meta"
    tensor = getattr(module, component.parameter_name, None)
    return isinstance(tensor, torch.Tensor) and tensor.device.type == "meta"


def _listed(paths: list[str]) -> str:
    return ", ".join(paths[:4]) + (f" and {len(paths) - 4} more" if len(paths) > 4 else "")


_FINITE_CHECK_ROWS = 1024


def _finite_weight(model: nn.Module, component: Component, module: nn.Module) -> bool:
    """Whether the weight the layer computes with is finite (a quantized layer's dequantized one).

    Why this way: ``torch.isfinite`` of a whole 14336 x 4096 fp32 weight made 0.41 GB of temporaries (an ``abs``
    copy and two masks) beside the 0.23 GB dequantized copy, the process's GPU memory peak of a stage-2 run on an
    H200 (bench/stage2_trial_profile.py --memory_history, 2026-12-02); a block of rows at a time they are small,
    and the dequantized copy is freed on return.
    """
    weight = dequantized_weight(module) if is_quantized_linear(module) else _weight_of(model, component)
    flat = weight.reshape(-1, weight.shape[-1]) if weight.dim() > 1 else weight.reshape(1, -1)
    return all(bool(torch.isfinite(rows).all()) for rows in flat.split(_FINITE_CHECK_ROWS))


def classify_components(model: nn.Module, components: list[Component]) -> ComponentPlacement:
    """Sort every component into in place / offloaded / skipped (NaN weights, quantized weight-level).

    A weight on the meta device is never skipped: it is edited through the accelerate hook that holds it,
    or the run stops here naming it (no hook holds it: it was never loaded; or it is a quantized offloaded
    module, whose packed storage the hook's weights map cannot serve edited).
    """
    in_place, offloaded, skipped = [], {}, []
    unheld, unsupported = [], []
    for component in components:
        module = model.get_submodule(component.module_name)
        if _on_meta(module, component):
            location = find_offloaded(model, component.module_name, component.parameter_name)
            if location is None:
                unheld.append(component.parameter_path)
            elif is_quantized_linear(module) or component.parameter_name in getattr(module, "_packed_expert_params", ()):
                unsupported.append(component.parameter_path)
            elif not bool(torch.isfinite(location.stored()).all()):
                skipped.append(SkippedComponent(component, "NaN/inf weights"))
            else:
                offloaded[component.parameter_path] = location
            continue
        if is_quantized_linear(module) and component.weight_level:
            skipped.append(SkippedComponent(component, "quantized weight-level component (load with --load_as "
                                                       "dequantized, or keep it unquantized with --quantization_overrides)"))
        elif not _finite_weight(model, component, module):
            skipped.append(SkippedComponent(component, "NaN/inf weights"))
        else:
            in_place.append(component)
    if unheld:
        raise UserError("--device_map", f"{len(unheld)} of {len(components)} components to edit have their weights on the "
                        f"meta device and no accelerate offload hook holds them ({_listed(unheld)}): they would be left "
                        "unedited", "load the model completely (a device_map or --max_memory that places every module; "
                        "check that the checkpoint holds these tensors)")
    if unsupported:
        raise UserError("--device_map", f"{len(unsupported)} quantized components are offloaded to the CPU/disk by the "
                        f"device_map ({_listed(unsupported)}); their packed weights cannot be edited through the offload "
                        "hook", "give the GPUs room for them (--max_memory), or load them dequantized (--load_as "
                        "dequantized, or without --quantization)")
    return ComponentPlacement(in_place, offloaded, skipped)


def require_adapters_materialized(model: nn.Module) -> None:
    """No LoRA factor may sit on the meta device (PEFT puts adapters on the base weight's device): it would edit nothing."""
    on_meta = [name for name, tensor in model.named_parameters() if "lora_" in name and tensor.device.type == "meta"]
    if on_meta:
        raise UserError("--device_map", f"{len(on_meta)} LoRA factors were created on the meta device "
                        f"({_listed(on_meta)}): those components would be left unedited",
                        "load without offloading these modules (--max_memory with room for them), and report the model")


def _inject_linears(config: LoraConfig, model: nn.Module, module_names: list[str]) -> None:
    """Wrap the Linears at exactly these module paths in LoRA, whatever other modules share their leaf names.

    PEFT's injection into a transformers model first converts the config for
    transformers v5's fused MoE layout (``convert_peft_config_for_transformers``):
    for DeepSeek-V3, Qwen3-Next and the like it turns every ``*.down_proj`` module
    target into the experts' ``down_proj`` parameter, so the dense layers' and
    shared experts' ``down_proj`` Linears would get no LoRA. The Linears are
    therefore injected through a holder that is no transformers model (no
    conversion), under names that match nothing else, and put back in place.
    """
    module_names = list(dict.fromkeys(module_names))
    holder = nn.ModuleDict({f"component{i}": model.get_submodule(name) for i, name in enumerate(module_names)})
    # PEFT reads the placement from the model it injects into; packed NVFP4 Linears hold buffers, no parameter
    holder.hf_device_map = getattr(model, "hf_device_map", None) or {"": next(model.parameters()).device}
    config.target_modules = set(holder)
    inject_adapter_in_model(config, holder, adapter_name=ADAPTER_NAME)
    for key, name in zip(holder, module_names, strict=True):
        model.set_submodule(name, holder[key])


class LowRankWeightDelta(nn.Module):
    """Weight parametrization ``W -> W + left @ right`` for projections a LoRA forward cannot reach."""

    def __init__(self, weight: torch.Tensor, rank: int) -> None:
        super().__init__()
        self.register_buffer("left", torch.zeros(weight.shape[0], rank, device=weight.device, dtype=torch.float32))
        self.register_buffer("right", torch.zeros(rank, weight.shape[1], device=weight.device, dtype=torch.float32))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return (weight.float() + self.left @ self.right).to(weight.dtype)


class _WeightLevelSlot:
    """The same interface as a PEFT LoRA layer (base weight, A, B) for a parametrized weight."""

    def __init__(self, module: nn.Module, rank: int) -> None:
        self.delta = LowRankWeightDelta(module.weight, rank)
        parametrize.register_parametrization(module, "weight", self.delta)
        self.module = module

    def base_weight(self) -> torch.Tensor:
        return self.module.parametrizations.weight.original

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.delta.right, self.delta.left


class _PackedExpertSlot:
    """PEFT's factor layout for fused experts (see ``ParamWrapper``), added to packed experts when they materialize.

    Packed experts (``checkpoint_formats.packed_experts``) have no parameter
    for PEFT to wrap: their bf16 weights exist only inside their own forward.
    A pre-hook registered after the materializing one adds ``B_e @ A_e`` to
    each expert in place (one batched matmul, no second copy of the weights);
    with B zeroed it adds exactly nothing, so the unedited model is unchanged.
    """

    def __init__(self, module: nn.Module, param: str, rank: int) -> None:
        experts, rows, columns = packed_experts.logical_shape(module, param)
        self.module, self.param, self.experts = module, param, experts
        # PEFT's convention: [experts, in, out] when the module says is_transposed, else [experts, out, in].
        self.transposed = bool(getattr(module, "is_transposed", False))
        in_features, out_features = (rows, columns) if self.transposed else (columns, rows)
        device = getattr(module, f"{param}_packed").device
        self.lora_a = torch.zeros(experts * rank, in_features, device=device)
        self.lora_b = torch.zeros(out_features, rank * experts, device=device)
        self.rank = rank
        module.register_forward_pre_hook(self._add_delta)

    def base_weight(self) -> torch.Tensor:
        return packed_experts.dequantize_packed(self.module, self.param, torch.float32)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_a, self.lora_b

    def _add_delta(self, module: nn.Module, args) -> None:
        weight = getattr(module, self.param)
        a = self.lora_a.view(self.experts, self.rank, -1).to(weight.dtype)  # [E, r, in]
        b = self.lora_b.view(self.lora_b.shape[0], self.rank, self.experts).permute(2, 0, 1).to(weight.dtype)  # [E, out, r]
        if self.transposed:  # weight [E, in, out] += (B_e A_e)^T
            torch.baddbmm(weight, a.transpose(1, 2), b.transpose(1, 2), out=weight)
        else:
            torch.baddbmm(weight, b, a, out=weight)


class LoraAbliterator:
    """Owns the adapter on ``model`` (modified in place) and writes one trial's edit into it."""

    def __init__(self, model: nn.Module, components: list[Component], *, method: Method = "rank1", rank: int = 3, seed: int = 0,
                 direction_rank: int = 1):
        self.model = model
        self.method = method
        # a rank-k subspace edit (--directions subspace) is a rank-k delta: the adapter holds at least k
        self.rank = max(1 if method == "rank1" else rank, direction_rank)
        self.seed = seed
        placement = classify_components(model, components)
        kept = {c.parameter_path for c in placement.in_place} | set(placement.offloaded)
        self.components = [c for c in components if c.parameter_path in kept]  # in the discovery order
        self.skipped = placement.skipped
        self.offloaded = [c for c in self.components if c.parameter_path in placement.offloaded]
        in_place = placement.in_place
        linear = [c.module_name for c in in_place if c.num_experts is None and not c.weight_level]
        fused = [c.parameter_path for c in in_place if c.num_experts is not None and not c.weight_level]
        if fused:
            inject_adapter_in_model(self._config(target_parameters=fused), model, adapter_name=ADAPTER_NAME)
        if linear:
            _inject_linears(self._config(target_modules=linear), model, linear)
        require_adapters_materialized(model)
        self._layers = {c.parameter_path: self._slot(model, c) for c in in_place}
        self._layers.update({c.parameter_path: OffloadedEditSlot(placement.offloaded[c.parameter_path], c.transposed)
                             for c in self.offloaded})
        # The guard against a silently skipped module: every component is edited or listed as skipped.
        if len(self._layers) + len(self.skipped) != len(components):
            raise RuntimeError(f"{len(components)} components, {len(self._layers)} edit slots and {len(self.skipped)} "
                               "skipped: a component would be left unedited without a word")
        self.reset()

    def placement_summary(self) -> dict:
        """For the run header: how many components are edited where (in place per device, or offloaded)."""
        devices: dict[str, int] = {}
        for component in self.components:
            layer = self._layers[component.parameter_path]
            if isinstance(layer, OffloadedEditSlot):
                key = f"offloaded (runs on {layer.location.execution_device})"
            else:
                key = str(self._factor_tensors(component)[1].device)
            devices[key] = devices.get(key, 0) + 1
        return {"edited": len(self.components), "skipped": len(self.skipped), "offloaded": len(self.offloaded),
                "components_by_device": dict(sorted(devices.items())),
                "offloaded_components": [c.parameter_path for c in self.offloaded]}

    def require_offloaded_edits_served(self) -> int:
        """After a forward pass with an edit written: an offloaded edit no forward loaded means the hook was bypassed.

        Returns how many offloaded edits were checked (0: this trial wrote none, check again after the next)."""
        unserved = self.unserved_offloaded_edits()
        if unserved:
            raise RuntimeError(f"{len(unserved)} offloaded component edit(s) never reached a forward pass "
                               f"({_listed(unserved)}): accelerate's hook no longer reads the weights map they were "
                               "written to; the trial's metrics would describe a partly unedited model")
        return sum(1 for c in self.offloaded if self._layers[c.parameter_path].active)

    def unserved_offloaded_edits(self) -> list[str]:
        """Offloaded components with an edit written that no forward loaded since (experts may not be routed to)."""
        return [c.parameter_path for c in self.offloaded
                if (slot := self._layers[c.parameter_path]).active and not slot.served and "experts" not in c.pattern]

    def _config(self, **targets) -> LoraConfig:
        config = LoraConfig(
            r=self.rank,
            lora_alpha=self.rank,  # scaling alpha / r = 1: the factors are the delta itself
            lora_dropout=0.0,
            bias="none",
            **targets,
        )
        return register_quantized_lora_layers(config)  # our NVFP4Linear (--quantization nvfp4); PEFT knows torchao, bnb

    def _slot(self, model: nn.Module, component: Component):
        module = model.get_submodule(component.module_name)
        if component.weight_level and component.num_experts is not None:
            return _PackedExpertSlot(module, component.parameter_name, self.rank)
        if component.weight_level:
            return _WeightLevelSlot(module, self.rank)
        return module

    def _base_weight(self, component: Component) -> torch.Tensor:
        layer = self._layers[component.parameter_path]
        if isinstance(layer, OffloadedEditSlot) or component.weight_level:
            return layer.base_weight()
        if component.num_experts is not None:
            return layer.get_param()
        return dequantized_weight(layer.get_base_layer())

    def _factor_tensors(self, component: Component) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) storage: A [r(*experts), in], B [hidden, r(*experts)]."""
        layer = self._layers[component.parameter_path]
        if component.weight_level:
            return layer.factors()
        return layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight

    @torch.no_grad()
    def reset(self) -> None:
        for component in self.components:
            layer = self._layers[component.parameter_path]
            if isinstance(layer, OffloadedEditSlot):
                layer.reset()
            else:
                self._factor_tensors(component)[1].zero_()

    @torch.no_grad()
    def apply(self, parameters: AbliterationParameters, directions: torch.Tensor) -> int:
        """Replace the adapter's content with this trial's edit; returns the number of components edited."""
        self.reset()
        vectors = edit_directions(parameters, directions)
        edits = plan_edits(parameters, self.components)
        on_gpu, elsewhere = [], []
        for edit in edits:
            (on_gpu if self._in_place_on_gpu(edit.component) else elsewhere).append(edit)
        if on_gpu:  # the large components' small factorizations in one host round trip per step (batched_factors)
            jobs = [FactorJob(functools.partial(self._fp32_base_weight, edit.component), vectors[edit.direction_key],
                              edit.strength, edit.component.transposed) for edit in on_gpu]
            factors_in_lockstep(jobs, lambda index, left, right: self._write(on_gpu[index].component, left, right),
                                method=self.method, rank=self.rank, seed=self.seed)
        for edit in elsewhere:
            component = edit.component
            # fp32 here (the factors' own first step) so a bf16 dequantized copy does not stand beside it, and
            # each weight freed before the next one is dequantized: the edit was a trial's GPU memory peak
            weight = self._fp32_base_weight(component)
            left, right = abliteration_factors(
                weight, vectors[edit.direction_key].to(weight.device), edit.strength,
                method=self.method, rank=self.rank, transposed=component.transposed, seed=self.seed,
            )
            del weight
            self._write(component, left, right)
            del left, right
        return len(edits)

    def _in_place_on_gpu(self, component: Component) -> bool:
        """A component whose weight is resident on a GPU: it can be taken again at each factorization step."""
        return (not isinstance(self._layers[component.parameter_path], OffloadedEditSlot)
                and self._factor_tensors(component)[1].device.type == "cuda")

    def _fp32_base_weight(self, component: Component) -> torch.Tensor:
        return self._base_weight(component).float()

    def _write(self, component: Component, left: torch.Tensor, right: torch.Tensor) -> None:
        layer = self._layers[component.parameter_path]
        if isinstance(layer, OffloadedEditSlot):
            layer.write(left, right)
            return
        lora_a, lora_b = self._factor_tensors(component)
        rank = left.shape[-1]
        if rank < self.rank:  # a tiny matrix can have fewer singular values than the adapter's rank
            lora_a.zero_()
            lora_b.zero_()
        if component.num_experts is None:
            lora_a[:rank].copy_(right)
            lora_b[:, :rank].copy_(left)
            return
        # PEFT keeps expert e's factors as rows e*r..e*r+r of lora_A and as
        # lora_B.reshape(out, r, experts)[:, :, e]; see ParamWrapper.get_delta_weight.
        experts = component.num_experts
        a_view = lora_a.view(experts, self.rank, -1)
        b_view = lora_b.view(lora_b.shape[0], self.rank, experts)
        a_view[:, :rank].copy_(right)
        b_view[:, :rank].copy_(left.permute(1, 2, 0))
