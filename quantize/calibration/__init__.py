"""Calibration data mixes: a YAML list of weighted datasets -> token ids.

    mix = load_mix("datasets_yaml/offline_mix.yaml")
    calib = build_calibration_set(mix, tokenizer, max_samples=256)
    for input_ids, attention_mask in calib.batches(4, tokenizer.pad_token_id): ...
"""

from quantize.calibration.build import build_calibration_set
from quantize.calibration.calibration_set import CalibrationSet, DatasetCount
from quantize.calibration.schema import (
    CalibrationMix,
    CalibrationSettings,
    DatasetEntry,
    load_mix,
)

__all__ = [
    "CalibrationMix",
    "CalibrationSet",
    "CalibrationSettings",
    "DatasetCount",
    "DatasetEntry",
    "build_calibration_set",
    "load_mix",
]
