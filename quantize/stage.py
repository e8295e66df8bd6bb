"""Stage 1 end to end: check, load, calibrate, export, record.

The order matters for the user's time: everything that can be wrong with the
flags is checked before the model is loaded (minutes to hours for a 405B
model), and the output directory only appears, complete, at the very end.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from rich.console import Console

from checkpoint_formats.naming import check_family_supported
from checkpoint_formats.servability import require_servable
from foundation.atomic_output import atomic_output_dir, check_writable_output
from foundation.dtypes import TORCH_DTYPES
from foundation.errors import UserError
from foundation.output_lock import output_lock
from foundation.package_data import resolve_data_path
from foundation.tokenizer_files import copy_tokenizer_files
from quantize import manifest as run_manifest
from quantize import offload as offload_planning
from quantize import skip_layers
from quantize.backends import backend_for
from quantize.recipes import check_device_supports, check_format_fits_model, get_recipe
from quantize.settings import QuantizeSettings, check_paths
from quantize.source_model import (
    load_config,
    load_model,
    load_tokenizer,
    require_finite_weights,
    resolve_device,
)


def build_calibration(settings: QuantizeSettings, tokenizer, console: Console):
    from quantize.calibration import build_calibration_set, load_mix

    mix = load_mix(str(resolve_data_path(settings.dataset_yaml)))
    calibration_set = build_calibration_set(
        mix, tokenizer, max_samples=settings.max_samples, max_seq_len=settings.max_seq_len,
        seed=settings.seed, oversample_ratio=settings.oversample_ratio, min_token_length=settings.min_token_length,
        console=console, min_samples=min_calibration_samples(settings, settings.max_samples or mix.calibration.max_samples),
    )
    calibration_set.print_summary(console)
    return calibration_set


def min_calibration_samples(settings: QuantizeSettings, max_samples: int) -> int:
    """Fewer surviving samples than this stop the run: ``--min_calibration_samples``, else half the target."""
    if settings.min_calibration_samples is None:
        return max(1, math.ceil(max_samples / 2))
    if settings.min_calibration_samples > max_samples:
        raise UserError("--min_calibration_samples", f"{settings.min_calibration_samples} is more than the "
                        f"{max_samples} samples the run draws (max_samples)", "lower it, or raise --max_samples")
    return settings.min_calibration_samples


def preflight(settings: QuantizeSettings) -> None:
    """Every check that needs no model: fails in seconds, not after the load."""
    check_paths(settings)
    recipe = get_recipe(settings.format)
    device = resolve_device(settings.device)
    check_device_supports(recipe, cuda_available=device.startswith("cuda") or (settings.offload and torch.cuda.is_available()),
                          algorithm=settings.algorithm)
    check_writable_output(Path(settings.output_model), settings.overwrite)


def run_quantize(settings: QuantizeSettings, console: Console | None = None, calibration_set=None) -> Path:
    """Quantize ``settings.input_model`` into ``settings.output_model``; returns the output path.

    The output is locked from the first check to the rename: a second run on the same output is refused
    at once, not after its calibration."""
    preflight(settings)
    with output_lock(Path(settings.output_model)):
        return _quantize(settings, console or Console(), calibration_set)


def _quantize(settings: QuantizeSettings, console: Console, calibration_set) -> Path:
    backend = backend_for(settings.backend)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    model_config = load_config(settings.input_model, settings.revision, settings.trust_remote_code)
    check_family_supported(model_config.to_dict(), f"--input_model {settings.input_model}")
    check_format_fits_model(get_recipe(settings.format), model_config.to_dict())
    tokenizer = load_tokenizer(settings.input_model, settings.revision, settings.trust_remote_code)
    if calibration_set is None:
        calibration_set = build_calibration(settings, tokenizer, console)
    timings["calibration_data"] = time.perf_counter() - started

    load_started = time.perf_counter()
    placement = None
    if settings.offload:
        placement = plan_offload(settings, model_config, calibration_set, console, use_gpus=backend.loads_on_gpu,
                                 disk_writeback=getattr(backend, "disk_layers_in_ram", lambda _: False)(settings))
        device_map, offload_folder = placement.device_map, str(offload_planning.offload_work_dir(settings.offload_folder))
    else:
        device = resolve_device(settings.device) if backend.loads_on_gpu else "cpu"
        device_map, offload_folder = ({"": device} if device != "cpu" else None), None
    model = load_model(settings.input_model, dtype=settings.dtype, revision=settings.revision,
                       trust_remote_code=settings.trust_remote_code, device_map=device_map, offload_folder=offload_folder)
    require_finite_weights(model, settings.input_model)
    timings["load"] = time.perf_counter() - load_started

    module_names = skip_layers.quantizable_module_names(model)
    default_matches = skip_layers.detect_default_skips(module_names)
    user_matches = skip_layers.resolve_user_skips(list(settings.skip_layers), module_names)
    skip_layers.print_skip_table(console, default_matches, user_matches)
    skipped = [*default_matches, *user_matches]
    skip_layers.check_something_left(skipped, module_names)
    calibrate_started = time.perf_counter()
    model = backend.calibrate(model, tokenizer, calibration_set, skipped, settings, console)
    timings["calibrate"] = time.perf_counter() - calibrate_started

    output = Path(settings.output_model)
    with atomic_output_dir(output, settings.overwrite) as staging:
        export_started = time.perf_counter()
        quantization = backend.export(model, staging, settings)
        require_servable(staging, where=str(output))  # our own vLLM / TensorRT-LLM check (servability.py)
        timings["export"] = time.perf_counter() - export_started
        copied = copy_tokenizer_files(settings.input_model, tokenizer, staging)
        timings["total"] = time.perf_counter() - started
        manifest = run_manifest.build_manifest(
            source=run_manifest.source_description(settings.input_model, settings.revision, model_config),
            mix_path=str(resolve_data_path(settings.dataset_yaml).resolve()),
            calibration=run_manifest.calibration_description(calibration_set, settings.batch_size),
            quantization={
                **quantization, "dtype": settings.dtype,
                "skipped": {match.module_glob: list(match.modules) for match in skipped}, "copied_files": copied,
            },
            timings_s=timings,
            placement=_placement_summary(placement),
        )
        run_manifest.write_manifest(staging, manifest)
    if settings.offload and settings.clean_offload:
        offload_planning.clean_offload_folder(settings.offload_folder)
    console.print(f"[green]wrote[/] {output} ({quantization['format']} via {backend.name}, "
                  f"{len(calibration_set.samples)} calibration samples, calibration {timings['calibrate']:.1f} s, "
                  f"export {timings['export']:.1f} s)")
    return output


def plan_offload(settings: QuantizeSettings, model_config, calibration_set, console: Console, use_gpus: bool = True,
                 disk_writeback: bool = False):
    """Print and return the placement; ``use_gpus=False`` plans CPU + disk only (llm-compressor onloads by itself)."""
    if settings.clean_offload:
        offload_planning.clean_offload_folder(settings.offload_folder)
    offload_planning.offload_work_dir(settings.offload_folder).mkdir(parents=True, exist_ok=True)
    gpu_budgets, cpu_budget = offload_planning.default_budgets(settings.max_gpu_memory, settings.max_cpu_memory)
    if not use_gpus:
        gpu_budgets = []
    longest = max((len(sample) for sample in calibration_set.samples), default=1)
    dtype = TORCH_DTYPES[settings.dtype] if settings.dtype != "auto" else torch.bfloat16
    plan = offload_planning.plan_placement(
        model_config, dtype, offload_planning.build_max_memory(gpu_budgets, cpu_budget),
        batch_size=settings.batch_size, max_seq_len=longest, trust_remote_code=settings.trust_remote_code,
        disk_writeback=disk_writeback,
    )
    offload_planning.print_placement(console, plan)
    return plan


def _placement_summary(plan) -> dict | None:
    if plan is None:
        return None
    return {
        "layers_per_device": dict(plan.layers_per_device),
        "bytes_per_device": plan.bytes_per_device,
        "total_weight_bytes": plan.total_weight_bytes,
        "device_map": {name: offload_planning.device_name(device) for name, device in plan.device_map.items()},
        # disk layers' bytes calibration keeps in RAM (ModelOpt's offload writeback); 0: the writeback was skipped
        "cpu_writeback_bytes": plan.cpu_writeback_bytes,
        # the budget of every visible GPU and of the CPU the plan was made with (disk: unbounded, left out)
        "budgets": {offload_planning.device_name(device): budget for device, budget in plan.max_memory.items()
                    if device != "disk"},
    }
