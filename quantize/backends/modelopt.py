"""ModelOpt: ``mtq.quantize`` over the calibration loop, then ``export_hf_checkpoint`` (a unified HF checkpoint)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from rich.console import Console

from checkpoint_formats.exclusions import repair_exclusions
from quantize import calibrate as calibration_loop
from quantize import export as checkpoint_export
from quantize import offload as offload_planning
from quantize.recipes import build_quant_config, get_recipe
from quantize.settings import QuantizeSettings
from quantize.skip_layers import SkipMatch, disabled_quantizer_patterns
from quantize.source_model import pad_token_id


def layerwise_checkpoint_dir(settings: QuantizeSettings, calibration_set) -> str | None:
    """Per-layer resume checkpoints, keyed by what they depend on so a changed run never resumes stale state."""
    if not (settings.layerwise and settings.offload):
        return None
    inputs = "|".join([str(settings.input_model), settings.format, settings.kv_cache, settings.dtype,
                       *sorted(settings.skip_layers), calibration_set.token_ids_sha256])
    run_key = f"{settings.format}-{hashlib.sha256(inputs.encode()).hexdigest()[:16]}"
    return str(offload_planning.offload_work_dir(settings.offload_folder) / "layerwise_checkpoints" / run_key)


class ModelOptBackend:
    name = "modelopt"
    loads_on_gpu = True

    def calibrate(self, model, tokenizer, calibration_set, skipped: list[SkipMatch], settings: QuantizeSettings,
                  console: Console):
        recipe = get_recipe(settings.format)
        quant_config = build_quant_config(
            recipe, kv_cache=settings.kv_cache, disabled_quantizer_patterns=disabled_quantizer_patterns(skipped),
            layerwise=settings.layerwise, layerwise_checkpoint_dir=layerwise_checkpoint_dir(settings, calibration_set),
        )
        forward_loop = calibration_loop.make_forward_loop(
            calibration_set, settings.batch_size, pad_token_id(tokenizer), console,
            description=f"calibrating {recipe.name}",
        )
        model, _ = calibration_loop.calibrate(model, quant_config, forward_loop)
        return model

    def export(self, model, staging: Path, settings: QuantizeSettings) -> dict[str, Any]:
        recipe = get_recipe(settings.format)
        checkpoint_export.export_modelopt_checkpoint(model, staging)
        repaired = repair_exclusions(staging)  # ModelOpt 0.47 mangles NemotronH and PhiMoE exclusions (checkpoint_formats/exclusions.py)
        hf_quant = checkpoint_export.read_quant_config(staging).get("quantization", {})
        return {
            "backend": self.name, "format": recipe.name, "modelopt_config": recipe.modelopt_config,
            "quant_algo": hf_quant.get("quant_algo"), "kv_cache": settings.kv_cache, "layerwise": settings.layerwise,
            "exclude_modules": hf_quant.get("exclude_modules"),
            "repaired_exclusions": repaired,
        }
