"""One export, end to end: choose the merge source, write the format atomically, verify, card, manifest.

Everything that can be wrong with the inputs is checked before the first shard
is read; the output directory appears, complete and verified, only at the end
(``atomic_output_dir``): an interrupted or failed export leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from abliterate.artifacts import (
    DIRECTIONS_FILE,
    TRIAL_FILE,
    ChosenTrial,
    read_chosen_trial,
)
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
from foundation.output_guard import check_output_location
from foundation.output_lock import output_lock
from foundation.provenance import library_versions, peak_memory_bytes
from foundation.weight_files import require_safetensors

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
    settings = job.settings
    # --overwrite deletes the output first: it must not be, hold or sit inside anything the export reads.
    check_output_location(job.output, {"trial": settings.trial, "--checkpoint": job.checkpoint,
                                       "--base_model": settings.base_model, "--dataset_yaml": settings.dataset_yaml},
                          output_flag="--output")
    check_writable_output(job.output, settings.overwrite)
    for flag, path in (("--checkpoint", job.checkpoint), ("--base_model", job.settings.base_model)):
        if path is not None and not (Path(path) / "config.json").is_file():
            raise UserError(flag, f"{path} is not a Hugging Face checkpoint directory (no config.json)",
                            "give a local model folder")
        if path is not None:
            require_safetensors(path, flag)
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
    """One format; its output is locked from the checks to the rename (a second writer is refused at once)."""
    check_job(job)
    with output_lock(job.output):
        return _export(job, console or Console())


def _export(job: ExportJob, console: Console) -> dict:
    settings = job.settings
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
            "trial_sha256": trial_sha256(settings.trial),
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


def trial_sha256(trial_dir: Path) -> str:
    """What defines the edit: chosen_trial.json and its directions (a re-run abliterate at the same path differs)."""
    digest = hashlib.sha256()
    for name in (TRIAL_FILE, DIRECTIONS_FILE):
        digest.update((Path(trial_dir) / name).read_bytes())
    return digest.hexdigest()


# Settings that do not change what a format's directory holds (the trial is compared by its hash, the
# output is where we look; both may be spelled differently from another working directory).
_NOT_CONTENT = ("formats", "overwrite", "progress", "device_map", "trust_remote_code", "trial", "output")


def completed_export(output: Path, settings: ExportSettings, fmt: str) -> dict | None:
    """The manifest of a complete export of ``fmt`` at ``output`` made from this trial with these settings, else None.

    A multi-format export killed after one format was written leaves that format complete (each format is
    its own atomic directory): the re-run skips it and writes the missing ones. An existing output of
    another trial or other settings is an error naming the difference (--overwrite replaces it)."""
    manifest_path = output / MANIFEST_NAME
    if not output.is_dir():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        return None  # not one of our exports: check_job reports the existing directory
    recorded = {k: v for k, v in (manifest.get("settings") or {}).items() if k not in _NOT_CONTENT}
    current = {k: v for k, v in settings.model_dump(mode="json").items() if k not in _NOT_CONTENT}
    differences = [] if manifest.get("format") == fmt else ["format"]
    if manifest.get("trial_sha256") != trial_sha256(settings.trial):
        differences.append("trial (chosen_trial.json / directions)")
    differences += sorted(key for key in {*recorded, *current} if recorded.get(key) != current.get(key))
    if differences:
        raise UserError(str(output), f"holds an export of another {fmt} run (differs in: {', '.join(differences)})",
                        "choose another --output, or pass --overwrite to replace it")
    return manifest


def run_exports(settings: ExportSettings, console: Console | None = None, *, formats: tuple[str, ...] | None = None,
                subdirectories: bool | None = None) -> dict[str, dict]:
    """Every requested format, each its own atomic directory; returns format -> manifest (with ``output``).

    Without --overwrite, a format whose directory already holds the same export is skipped (said so): an
    export killed between formats resumes with the missing ones."""
    console = console or Console()
    trial = read_chosen_trial(settings.trial)
    manifests = {}
    for fmt in formats or settings.formats:
        output = settings.output_for(fmt, subdirectories=subdirectories)
        done = None if settings.overwrite else completed_export(output, settings, fmt)
        if done is not None:
            console.print(f"{fmt}: {output} is already complete (same trial and settings), skipped; "
                          "pass --overwrite to redo it")
            manifests[fmt] = {"output": str(output), **done}
            continue
        manifests[fmt] = {"output": str(output), **run_export(export_job(settings, fmt, output, trial), console)}
    return manifests
