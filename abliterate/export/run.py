"""One export, end to end: choose the merge source, write the format atomically, verify, card, manifest.

Everything that can be wrong with the inputs is checked before the first shard
is read; the output directory appears, complete and verified, only at the end
(``atomic_output_dir``): an interrupted or failed export leaves nothing behind.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from abliterate.artifacts import ChosenTrial, read_chosen_trial
from abliterate.export.formats_out import (
    FORMATS,
    NVFP4_REEXPORTABLE,
    carry_model_files,
    export_adapter,
    export_full_precision,
    export_nvfp4,
)
from abliterate.export.model_card import render_model_card
from abliterate.export.recalibrate import recalibrated_export
from abliterate.export.settings import ExportSettings
from abliterate.export.streaming_merge import StreamingMerger
from abliterate.export.verify import Tolerance, verify_export
from checkpoint_formats.detect import detect_format
from foundation.atomic_output import atomic_output_dir, check_writable_output
from foundation.errors import UserError
from foundation.provenance import library_versions, peak_memory_bytes

MANIFEST_NAME = "export_manifest.json"


@dataclass
class ExportRequest:
    trial: ChosenTrial
    trial_dir: Path
    output: Path
    format: str  # one of FORMATS
    checkpoint: Path  # the model stage 2 searched on (the stage-1 checkpoint for nvfp4)
    base_model: Path | None = None
    overwrite: bool = False
    verify: bool = True
    tolerance: Tolerance = field(default_factory=Tolerance)
    show_progress: bool = True
    device_map: str | None = None  # for verify; None: as stage 2 loaded
    recalibrate: bool = False  # nvfp4 only: fresh ModelOpt calibration of the merged model
    dataset_yaml: Path | None = None  # calibration mix for recalibrate (default: stage 1's)
    # extra model-card rows measured elsewhere, e.g. {"original (bf16)": {"refusals":..., "perplexity":...}}
    card_metrics: dict[str, dict] | None = None


def check_request(request: ExportRequest) -> None:
    if request.format not in FORMATS:
        raise UserError("--format", f"unknown format {request.format!r}", f"choose from {', '.join(FORMATS)}")
    check_writable_output(request.output, request.overwrite)
    for flag, path in (("--checkpoint", request.checkpoint), ("--base_model", request.base_model)):
        if path is not None and not (Path(path) / "config.json").is_file():
            raise UserError(flag, f"{path} is not a Hugging Face checkpoint directory (no config.json)",
                            "give a local model folder")
    if request.recalibrate and request.format != "nvfp4":
        raise UserError("--recalibrate", f"only applies to --format nvfp4, not {request.format}", "drop --recalibrate")
    if request.format == "nvfp4" and not request.recalibrate and \
            detect_format(request.checkpoint).kind not in NVFP4_REEXPORTABLE:
        raise UserError("--checkpoint", f"{request.checkpoint} is not a ModelOpt NVFP4 checkpoint",
                        "nvfp4 re-export reuses the stage-1 scales: pass the stage-1 output directory")


def make_merger(request: ExportRequest) -> StreamingMerger:
    """The merge source: the bf16 base when given, else the checkpoint's own (dequantized) weights."""
    source = request.base_model or request.checkpoint
    # Dequantized weights about to be re-quantized stay float32 (no rounding in between).
    requantizing = request.format == "nvfp4" and not request.recalibrate
    dtype = torch.float32 if requantizing and request.base_model is None else torch.bfloat16
    return StreamingMerger.from_directory(source, request.trial, dtype=dtype)


def run_export(request: ExportRequest, console: Console | None = None) -> dict:
    console = console or Console()
    check_request(request)
    merger = make_merger(request)
    console.print(f"merge source: {merger.source.description}")
    console.print(f"edit: trial {request.trial.header.trial_number} ({request.trial.method}), "
                  f"{len(merger.plan.edits)} tensors to edit {merger.plan.summary()}")
    started = time.perf_counter()
    with atomic_output_dir(request.output, request.overwrite) as temporary:
        if request.recalibrate:
            report = recalibrated_export(merger, request.checkpoint, temporary, dataset_yaml=request.dataset_yaml,
                                         show_progress=request.show_progress, console=console)
        elif request.format == "nvfp4":
            report = export_nvfp4(merger, request.checkpoint, temporary, show_progress=request.show_progress)
        elif request.format == "bf16":
            report = export_full_precision(merger, temporary, show_progress=request.show_progress)
        else:
            report = export_adapter(merger, temporary, str(request.base_model or request.checkpoint))
        carried = carry_model_files([request.checkpoint, *(p for p in [request.base_model] if p)], temporary)
        merge_seconds = time.perf_counter() - started
        merge_peak_memory = peak_memory_bytes()  # before verification loads whole models
        verify = None
        if request.verify and request.format == "adapter":
            console.print("adapter: not verified (an adapter alone is not a model; verify the bf16 or nvfp4 export)")
        elif request.verify:
            console.print("verifying: reloading the export and re-measuring refusals, compliance and KL ...")
            verify = verify_export(request.trial, temporary, request.tolerance, device_map=request.device_map).to_dict()
        manifest = {
            "format": request.format,
            "trial_dir": str(request.trial_dir.absolute()),
            "trial_number": request.trial.header.trial_number,
            "merge_source": {"path": str(Path(merger.source.directory).absolute()),
                             "kind": "dequantized" if merger.source.is_dequantized else "full_precision",
                             "description": merger.source.description},
            "searched_checkpoint": str(Path(request.checkpoint).absolute()),
            "export": report,
            "carried_files": carried,
            "verify": verify,
            "merge_seconds": round(merge_seconds, 3),
            "merge_peak_memory_bytes": merge_peak_memory,
            "libraries": library_versions(),
        }
        (temporary / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        (temporary / "README.md").write_text(render_model_card(
            trial=request.trial.data, export=report, source=merger.source.description, verify=verify,
            extra_metrics=request.card_metrics))
        if verify is not None and not verify["passed"]:
            raise UserError(
                f"verify {request.output}",
                "the export does not reproduce the chosen trial: " + "; ".join(verify["problems"]),
                "nothing was written; check --base_model matches the searched model, widen the tolerance "
                "(--refusal_tolerance / --kl_tolerance) if the gap is expected, or pass --no-verify",
            )
    console.print(f"wrote {request.output} ({request.format}, {merge_seconds:.1f}s"
                  + (", verified" if verify else "") + ")")
    return manifest


def export_request(settings: ExportSettings, fmt: str, output: Path, trial: ChosenTrial | None = None) -> ExportRequest:
    trial = trial or read_chosen_trial(settings.trial)
    checkpoint = settings.checkpoint or Path(trial.header.model or "")
    if not str(checkpoint) or not checkpoint.is_dir():
        raise UserError("--checkpoint", f"the searched model {str(checkpoint)!r} is not a local directory",
                        "pass --checkpoint with the stage-1 (or searched) checkpoint directory")
    tolerance = Tolerance(refusals=settings.refusal_tolerance, compliance=settings.refusal_tolerance,
                          kl_absolute=settings.kl_tolerance)
    return ExportRequest(trial=trial, trial_dir=settings.trial, output=output, format=fmt, checkpoint=checkpoint,
                         base_model=settings.base_model, overwrite=settings.overwrite, verify=settings.verify,
                         tolerance=tolerance, show_progress=settings.progress, device_map=settings.device_map,
                         recalibrate=settings.recalibrate and fmt == "nvfp4", dataset_yaml=settings.dataset_yaml)


def run_exports(settings: ExportSettings, console: Console | None = None, *, formats: tuple[str, ...] | None = None,
                subdirectories: bool | None = None) -> dict[str, dict]:
    """Every requested format, each its own atomic directory; returns format -> manifest (with ``output``)."""
    trial = read_chosen_trial(settings.trial)
    manifests = {}
    for fmt in formats or settings.formats:
        output = settings.output_for(fmt, subdirectories=subdirectories)
        manifests[fmt] = {"output": str(output), **run_export(export_request(settings, fmt, output, trial), console)}
    return manifests
