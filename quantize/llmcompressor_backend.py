"""Second backend: compressed-tensors NVFP4 through llm-compressor's ``oneshot``.

Its sequential pipeline calibrates one decoder layer at a time, onloading
each to the GPU and keeping only that layer's activations, so GPU memory is
about one layer whatever the model size: the leanest path for very large
models. The output is a compressed-tensors checkpoint (``weight_packed``,
reciprocal global scales, ``"format": "nvfp4-pack-quantized"``), which vLLM
serves as well; ``quant-abliterate convert`` turns it into ModelOpt's layout.
The same calibration set, skip rules, atomic output and manifest apply; with
``--offload_folder`` the model waits in CPU RAM and on disk (same planner as
the ModelOpt path, GPUs left to llm-compressor's onloading).
"""

from __future__ import annotations

import fnmatch
import time
from pathlib import Path

from rich.console import Console

from foundation.atomic_output import atomic_output_dir
from foundation.tokenizer_files import copy_tokenizer_files
from quantize import manifest as run_manifest
from quantize import skip_layers
from quantize.export import ensure_architectures
from quantize.offload import clean_offload_folder, offload_work_dir
from quantize.settings import QuantizeSettings
from quantize.source_model import load_config, load_model, load_tokenizer

LLMCOMPRESSOR_SCHEMES = {"nvfp4": "NVFP4", "w4a16_nvfp4": "NVFP4A16"}


def ignore_entry(module_glob: str) -> str:
    """llm-compressor ignores modules by name or by ``re:`` regex; a glob becomes the latter."""
    return "re:" + fnmatch.translate(module_glob)


def run_llmcompressor(settings: QuantizeSettings, console: Console, calibration_set=None) -> Path:
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier

    from quantize.stage import _placement_summary, build_calibration, plan_offload

    started = time.perf_counter()
    timings: dict[str, float] = {}
    scheme = LLMCOMPRESSOR_SCHEMES[settings.format]
    model_config = load_config(settings.input_model, settings.revision, settings.trust_remote_code)
    tokenizer = load_tokenizer(settings.input_model, settings.revision, settings.trust_remote_code)
    if calibration_set is None:
        calibration_set = build_calibration(settings, tokenizer, console)
    # Loaded on the CPU (and disk, with --offload_folder) on purpose: the
    # sequential pipeline onloads one layer at a time to the GPU by itself.
    load_started = time.perf_counter()
    placement = plan_offload(settings, model_config, calibration_set, console, use_gpus=False) if settings.offload else None
    model = load_model(settings.input_model, dtype=settings.dtype, revision=settings.revision,
                       trust_remote_code=settings.trust_remote_code,
                       device_map=placement.device_map if placement else None,
                       offload_folder=str(offload_work_dir(settings.offload_folder)) if placement else None)
    timings["load"] = time.perf_counter() - load_started

    module_names = skip_layers.quantizable_module_names(model)
    default_matches = skip_layers.detect_default_skips(module_names)
    user_matches = skip_layers.resolve_user_skips(list(settings.skip_layers), module_names)
    skip_layers.print_skip_table(console, default_matches, user_matches)
    matches = [*default_matches, *user_matches]
    recipe = QuantizationModifier(targets="Linear", scheme=scheme, ignore=[ignore_entry(m.module_glob) for m in matches])

    calibrate_started = time.perf_counter()
    console.print(f"llm-compressor oneshot ({scheme}, sequential pipeline) on {len(calibration_set.samples)} samples")
    model = oneshot(
        model=model, tokenizer=tokenizer, recipe=recipe, dataset=calibration_set.as_hf_dataset(),
        num_calibration_samples=len(calibration_set.samples), max_seq_length=max(len(s) for s in calibration_set.samples),
        batch_size=settings.batch_size, shuffle_calibration_samples=False, pipeline="sequential",
    )
    timings["calibrate"] = time.perf_counter() - calibrate_started

    output = Path(settings.output_model)
    with atomic_output_dir(output, settings.overwrite) as staging:
        export_started = time.perf_counter()
        ensure_architectures(model)
        model.save_pretrained(str(staging), save_compressed=True)
        copied = copy_tokenizer_files(settings.input_model, tokenizer, staging)
        timings["export"] = time.perf_counter() - export_started
        timings["total"] = time.perf_counter() - started
        manifest = run_manifest.build_manifest(
            source=run_manifest.source_description(settings.input_model, settings.revision, model_config),
            mix_path=str(settings.dataset_yaml),
            calibration=run_manifest.calibration_description(calibration_set, settings.batch_size),
            quantization={
                "backend": "llmcompressor", "format": settings.format, "llmcompressor_scheme": scheme,
                "checkpoint_format": "compressed-tensors", "dtype": settings.dtype,
                "skipped": {match.module_glob: list(match.modules) for match in matches}, "copied_files": copied,
            },
            timings_s=timings,
            placement=_placement_summary(placement),
        )
        run_manifest.write_manifest(staging, manifest)
    if settings.offload and settings.clean_offload:
        clean_offload_folder(settings.offload_folder)
    console.print(f"[green]wrote[/] {output} (compressed-tensors {scheme}, calibration {timings['calibrate']:.1f} s)")
    return output
