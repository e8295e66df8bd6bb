"""``--recalibrate``: quantize the merged model afresh with ModelOpt, for comparison with reused scales.

The merged bf16 model is written (streaming) to a scratch directory beside the
output, then stage 1 runs on it with the settings stage 1 recorded for the
original checkpoint (format, calibration mix and sampling, KV cache, skipped
layers), so the only difference from the reused-scales export is the fresh
calibration. Stage 1 loads the whole merged model (with its own offload
options for large ones); the reused-scales path never does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from rich.console import Console

from abliterate.export.formats_out import carry_model_files, export_full_precision
from abliterate.export.streaming_merge import StreamingMerger
from quantize.manifest import read_manifest

MERGED_SCRATCH = ".merged-bf16"


def stage1_recorded_settings(stage1_dir: Path) -> dict[str, Any]:
    """The QuantizeSettings fields stage 1 recorded in its manifest (empty when it has none)."""
    manifest = read_manifest(stage1_dir)
    if manifest is None:
        return {}
    quantization, calibration = manifest.quantization, manifest.calibration
    recorded = calibration.settings or {}
    fields: dict[str, Any] = {
        "format": quantization.format,
        "kv_cache": quantization.kv_cache,
        "dataset_yaml": calibration.mix_file,
        "batch_size": calibration.batch_size,
        "skip_layers": tuple(quantization.skipped or ()),
        **{key: recorded.get(key) for key in ("max_samples", "max_seq_len", "seed", "oversample_ratio", "min_token_length")},
    }
    return {key: value for key, value in fields.items() if value not in (None, ())}


def recalibrated_export(merger: StreamingMerger, stage1_dir: Path, out_dir: Path, *, dataset_yaml: Path | None,
                        show_progress: bool = True, console: Console | None = None) -> dict:
    """Write a freshly calibrated ModelOpt checkpoint of the merged model into ``out_dir`` (a temporary dir)."""
    from quantize.settings import QuantizeSettings
    from quantize.stage import run_quantize

    # Inside the export's temporary directory, so a run killed mid-way leaves its bf16 copy where the next run's
    # atomic_output_dir removes it anyway; beside it (older versions) it survived and made every re-run fail.
    legacy = out_dir.parent / f"{out_dir.name}.merged-bf16"
    if legacy.exists():
        shutil.rmtree(legacy)
    merged_dir = out_dir / MERGED_SCRATCH
    try:
        shutil.rmtree(merged_dir, ignore_errors=True)
        merged_dir.mkdir()
        export_full_precision(merger, merged_dir, show_progress=show_progress)
        carry_model_files([stage1_dir, merger.source.directory], merged_dir)
        recorded = stage1_recorded_settings(stage1_dir)
        if dataset_yaml is not None:
            recorded["dataset_yaml"] = dataset_yaml
        settings = QuantizeSettings(input_model=str(merged_dir), output_model=out_dir / "quantized", **recorded)
        run_quantize(settings, console)
        for item in (out_dir / "quantized").iterdir():
            item.rename(out_dir / item.name)
        (out_dir / "quantized").rmdir()
    finally:
        shutil.rmtree(merged_dir, ignore_errors=True)
    quant = json.loads((out_dir / "hf_quant_config.json").read_text()).get("quantization", {})
    return {"format": "nvfp4", "recalibrated": True, "edited_tensors": len(set(merger.edited_names)),
            "quant_algo": quant.get("quant_algo"), "stage1_settings_reused": sorted(recorded)}
