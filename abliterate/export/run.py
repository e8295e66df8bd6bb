"""One export, end to end: choose the merge source, write the format atomically, verify, card, manifest.

Everything that can be wrong with the inputs is checked before the first shard
is read; the output directory appears, complete and verified, only at the end
(``atomic_output_dir``): an interrupted or failed export leaves nothing behind.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
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


@dataclass(frozen=True)
class ExportJob:
    """One format of an export: its ExportSettings plus what was resolved from them.

    Every option is read from ``settings`` (no field copied), so the export runs
    exactly with the settings the CLI or the pipeline validated.
    """

    settings: ExportSettings
    trial: ChosenTrial
    format: str  # one of FORMATS
    output: Path
    checkpoint: Path  # the model stage 2 searched on (the stage-1 checkpoint for nvfp4)

    @property
    def recalibrate(self) -> bool:
        """Only nvfp4 is calibrated; the other formats of the same export are written as usual."""
        return self.settings.recalibrate and self.format == "nvfp4"

    @property
    def tolerance(self) -> Tolerance:
        return Tolerance(refusals=self.settings.refusal_tolerance, compliance=self.settings.refusal_tolerance,
                         false_refusals=self.settings.refusal_tolerance, kl_absolute=self.settings.kl_tolerance)


def check_job(job: ExportJob) -> None:
    if job.format not in FORMATS:
        raise UserError("--format", f"unknown format {job.format!r}", f"choose from {', '.join(FORMATS)}")
    check_writable_output(job.output, job.settings.overwrite)
    for flag, path in (("--checkpoint", job.checkpoint), ("--base_model", job.settings.base_model)):
        if path is not None and not (Path(path) / "config.json").is_file():
            raise UserError(flag, f"{path} is not a Hugging Face checkpoint directory (no config.json)",
                            "give a local model folder")
    if job.format == "nvfp4" and not job.recalibrate and \
            detect_format(job.checkpoint).kind not in NVFP4_REEXPORTABLE:
        raise UserError("--checkpoint", f"{job.checkpoint} is not a ModelOpt NVFP4 checkpoint",
                        "nvfp4 re-export reuses the stage-1 scales: pass the stage-1 output directory")


def make_merger(job: ExportJob) -> StreamingMerger:
    """The merge source: the bf16 base when given, else the checkpoint's own (dequantized) weights."""
    base_model = job.settings.base_model
    source = base_model or job.checkpoint
    # Dequantized weights about to be re-quantized stay float32 (no rounding in between).
    requantizing = job.format == "nvfp4" and not job.recalibrate
    dtype = torch.float32 if requantizing and base_model is None else torch.bfloat16
    return StreamingMerger.from_directory(source, job.trial, dtype=dtype)


def run_export(job: ExportJob, console: Console | None = None) -> dict:
    console = console or Console()
    settings = job.settings
    check_job(job)
    merger = make_merger(job)
    console.print(f"merge source: {merger.source.description}")
    console.print(f"edit: trial {job.trial.header.trial_number} ({job.trial.method}), "
                  f"{len(merger.plan.edits)} tensors to edit {merger.plan.summary()}")
    started = time.perf_counter()
    with atomic_output_dir(job.output, settings.overwrite) as temporary:
        if job.recalibrate:
            report = recalibrated_export(merger, job.checkpoint, temporary, dataset_yaml=settings.dataset_yaml,
                                         show_progress=settings.progress, console=console)
        elif job.format == "nvfp4":
            report = export_nvfp4(merger, job.checkpoint, temporary, show_progress=settings.progress)
        elif job.format == "bf16":
            report = export_full_precision(merger, temporary, show_progress=settings.progress)
        else:
            report = export_adapter(merger, temporary, str(settings.base_model or job.checkpoint))
        carried = carry_model_files([job.checkpoint, *(p for p in [settings.base_model] if p)], temporary)
        merge_seconds = time.perf_counter() - started
        merge_peak_memory = peak_memory_bytes()  # before verification loads whole models
        verify = None
        if settings.verify and job.format == "adapter":
            console.print("adapter: not verified (an adapter alone is not a model; verify the bf16 or nvfp4 export)")
        elif settings.verify:
            console.print("verifying: reloading the export and re-measuring refusals, compliance and KL ...")
            verify = verify_export(job.trial, temporary, job.tolerance, device_map=settings.device_map,
                                   trust_remote_code=settings.trust_remote_code).to_dict()
        manifest = {
            "format": job.format,
            "trial_dir": str(settings.trial.absolute()),
            "trial_number": job.trial.header.trial_number,
            "merge_source": {"path": str(Path(merger.source.directory).absolute()),
                             "kind": "dequantized" if merger.source.is_dequantized else "full_precision",
                             "description": merger.source.description},
            "searched_checkpoint": str(Path(job.checkpoint).absolute()),
            "settings": settings.model_dump(mode="json"),
            "export": report,
            "carried_files": carried,
            "verify": verify,
            "merge_seconds": round(merge_seconds, 3),
            "merge_peak_memory_bytes": merge_peak_memory,
            "libraries": library_versions(),
        }
        (temporary / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        (temporary / "README.md").write_text(render_model_card(
            trial=job.trial.data, export=report, source=merger.source.description, verify=verify,
            extra_metrics=None))
        if verify is not None and not verify["passed"]:
            raise UserError(
                f"verify {job.output}",
                "the export does not reproduce the chosen trial: " + "; ".join(verify["problems"]),
                "nothing was written; check --base_model matches the searched model, widen the tolerance "
                "(--refusal_tolerance / --kl_tolerance) if the gap is expected, or pass --no-verify",
            )
    console.print(f"wrote {job.output} ({job.format}, {merge_seconds:.1f}s"
                  + (", verified" if verify else "") + ")")
    return manifest


def export_job(settings: ExportSettings, fmt: str, output: Path, trial: ChosenTrial | None = None) -> ExportJob:
    trial = trial or read_chosen_trial(settings.trial)
    checkpoint = settings.checkpoint or Path(trial.header.model or "")
    if not str(checkpoint) or not checkpoint.is_dir():
        raise UserError("--checkpoint", f"the searched model {str(checkpoint)!r} is not a local directory",
                        "pass --checkpoint with the stage-1 (or searched) checkpoint directory")
    return ExportJob(settings=settings, trial=trial, format=fmt, output=output, checkpoint=checkpoint)


def run_exports(settings: ExportSettings, console: Console | None = None, *, formats: tuple[str, ...] | None = None,
                subdirectories: bool | None = None) -> dict[str, dict]:
    """Every requested format, each its own atomic directory; returns format -> manifest (with ``output``)."""
    trial = read_chosen_trial(settings.trial)
    manifests = {}
    for fmt in formats or settings.formats:
        output = settings.output_for(fmt, subdirectories=subdirectories)
        manifests[fmt] = {"output": str(output), **run_export(export_job(settings, fmt, output, trial), console)}
    return manifests
