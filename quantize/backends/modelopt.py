"""ModelOpt: ``mtq.quantize`` over the calibration loop, then ``export_hf_checkpoint`` (a unified HF checkpoint)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from checkpoint_formats.exclusions import repair_exclusions
from foundation.model_fingerprint import (
    changed_files,
    fingerprint_digest,
    model_fingerprint,
)
from quantize import calibrate as calibration_loop
from quantize import expert_coverage
from quantize import export as checkpoint_export
from quantize import offload as offload_planning
from quantize.recipes import build_quant_config, get_algorithm, get_recipe
from quantize.settings import QuantizeSettings
from quantize.skip_layers import SkipMatch, disabled_quantizer_patterns
from quantize.source_model import pad_token_id

SOURCE_FILE = "quant_abliterate_source.json"  # beside ModelOpt's manifest.json / layer_NNNN in a checkpoint dir


def layerwise_checkpoint_dir(settings: QuantizeSettings, calibration_set, console: Console | None = None) -> str | None:
    """Per-layer resume checkpoints, keyed by what they depend on so a changed run never resumes stale state.

    The model enters the key by its content (``foundation.model_fingerprint``: size, mtime and header hash of
    every weights file), not its path: a model replaced at the same path must not resume the old one's layers.
    Checkpoints of an earlier run on the same path whose model has changed since are deleted, saying so.
    """
    if not (settings.layerwise and settings.offload):
        return None
    fingerprint = model_fingerprint(settings.input_model)
    model_key = fingerprint_digest(fingerprint) if fingerprint is not None else str(settings.input_model)
    inputs = "|".join([model_key, settings.format, settings.kv_cache, settings.dtype, str(settings.algorithm),
                       f"all_experts={settings.calib_all_experts}",
                       *sorted(settings.skip_layers), calibration_set.token_ids_sha256])
    run_key = f"{settings.format}-{hashlib.sha256(inputs.encode()).hexdigest()[:16]}"
    root = offload_planning.offload_work_dir(settings.offload_folder) / "layerwise_checkpoints"
    source = {"input_model": str(Path(settings.input_model).expanduser().resolve()), "fingerprint": fingerprint}
    if fingerprint is not None:
        discard_stale_checkpoints(root, run_key, source, console)
    directory = root / run_key
    directory.mkdir(parents=True, exist_ok=True)
    (directory / SOURCE_FILE).write_text(json.dumps(source, indent=1, sort_keys=True) + "\n")
    return str(directory)


def discard_stale_checkpoints(root: Path, run_key: str, source: dict, console: Console | None) -> None:
    """Delete other runs' checkpoints of the same model path whose recorded model content differs from today's."""
    if not root.is_dir():
        return
    for other in sorted(root.iterdir()):
        recorded_file = other / SOURCE_FILE
        if other.name == run_key or other.is_symlink() or not recorded_file.is_file():
            continue
        try:
            recorded = json.loads(recorded_file.read_text())
        except (OSError, ValueError):
            continue
        if recorded.get("input_model") != source["input_model"] or recorded.get("fingerprint") == source["fingerprint"]:
            continue
        changes = "; ".join(changed_files(recorded.get("fingerprint") or {}, source["fingerprint"]))
        if console is not None:
            console.print(f"[bold yellow]model changed:[/] {escape(source['input_model'])} is not the model the "
                          f"layerwise checkpoints in {escape(str(other))} were calibrated on ({escape(changes)}): "
                          "discarding them and calibrating every layer again")
        shutil.rmtree(other)


class ModelOptBackend:
    name = "modelopt"
    loads_on_gpu = True

    @staticmethod
    def disk_layers_in_ram(settings: QuantizeSettings) -> bool:
        """Whether calibration will copy every disk-offloaded weight into RAM (ModelOpt's writeback, kept for
        algorithms that change weights; --layerwise calibrates layer by layer without it)."""
        if not settings.offload or settings.layerwise:
            return False
        algorithm = get_algorithm(settings.algorithm or get_recipe(settings.format).algorithm)
        return not (algorithm.keeps_weights and calibration_loop.offload_writeback_can_be_skipped())

    def calibrate(self, model, tokenizer, calibration_set, skipped: list[SkipMatch], settings: QuantizeSettings,
                  console: Console):
        recipe = get_recipe(settings.format)
        all_experts = settings.calib_all_experts and expert_coverage.is_moe_model(model)
        quant_config = build_quant_config(
            recipe, kv_cache=settings.kv_cache, disabled_quantizer_patterns=disabled_quantizer_patterns(skipped),
            layerwise=settings.layerwise, algorithm=settings.algorithm, calib_all_experts=all_experts,
            layerwise_checkpoint_dir=layerwise_checkpoint_dir(settings, calibration_set, console),
        )
        algorithm = settings.algorithm or recipe.algorithm
        forward_loop = calibration_loop.make_forward_loop(
            calibration_set, settings.batch_size, pad_token_id(tokenizer), console,
            description=f"calibrating {recipe.name} ({algorithm}{', every expert' if all_experts else ''})",
            fast_max=algorithm == "max",  # weights stay constant through max calibration (quantize/max_statistics.py)
        )
        recorder = expert_coverage.CoverageRecorder()
        # One-pass offload only: --layerwise never writes back while it calibrates (measured), and its resume
        # (full_restore) reloads saved weights through the writeback, which is left as ModelOpt has it.
        skip_writeback = settings.offload and not settings.layerwise and get_algorithm(algorithm).keeps_weights
        model, _ = calibration_loop.calibrate(model, quant_config, recorder.wrap(forward_loop, all_experts),
                                              skip_offload_writeback=skip_writeback)
        self.coverage = expert_coverage.coverage_report(model, recorder, all_experts)
        expert_coverage.enforce_coverage(self.coverage, settings.allow_uncalibrated, console)
        return model

    def export(self, model, staging: Path, settings: QuantizeSettings) -> dict[str, Any]:
        recipe = get_recipe(settings.format)
        checkpoint_export.export_modelopt_checkpoint(model, staging)
        repaired = repair_exclusions(staging)  # ModelOpt 0.47 mangles NemotronH and PhiMoE exclusions (checkpoint_formats/exclusions.py)
        hf_quant = checkpoint_export.read_quant_config(staging).get("quantization", {})
        return {
            "backend": self.name, "format": recipe.name, "modelopt_config": recipe.modelopt_config,
            "quant_algo": hf_quant.get("quant_algo"), "kv_cache": settings.kv_cache, "layerwise": settings.layerwise,
            "algorithm": settings.algorithm or recipe.algorithm,
            "calibration_coverage": self.coverage.as_manifest() if getattr(self, "coverage", None) else None,
            "exclude_modules": hf_quant.get("exclude_modules"),
            "repaired_exclusions": repaired,
        }
