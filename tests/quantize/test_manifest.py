"""quantize_manifest.json has one typed, versioned reader; manifests written before the version field read as v1."""

import json

import pytest

from foundation.errors import UserError
from quantize.manifest import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    build_manifest,
    read_manifest,
)

# The head of a manifest as stage 1 wrote it before schema_version existed (version 1).
UNVERSIONED = {
    "producer": "quant-abliterate quantize", "created_utc": "2026-11-30T12:00:00+00:00",
    "source": {"model": "/models/tiny", "local": True, "revision": None, "commit_hash": None, "architectures": []},
    "calibration": {"mix_file": "datasets_yaml/offline_mix.yaml", "mix_sha256": "ab", "samples": 8, "batch_size": 2,
                    "settings": {"max_samples": 8, "max_seq_len": 64, "seed": 0}},
    "quantization": {"backend": "modelopt", "format": "nvfp4", "kv_cache": "none", "dtype": "bfloat16",
                     "skipped": {"*lm_head": ["lm_head"]}, "a_field_added_later": 1},
    "timings_s": {"total": 1.0},
}


def test_a_manifest_without_schema_version_is_version_1(tmp_path):
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(UNVERSIONED))
    manifest = read_manifest(tmp_path)
    assert manifest.schema_version == 1
    assert (manifest.quantization.format, manifest.calibration.batch_size) == ("nvfp4", 2)
    assert manifest.calibration.settings["max_seq_len"] == 64


def test_the_export_reuses_stage1_settings_from_an_unversioned_manifest(tmp_path):
    from abliterate.export.recalibrate import stage1_recorded_settings

    (tmp_path / MANIFEST_NAME).write_text(json.dumps(UNVERSIONED))
    assert stage1_recorded_settings(tmp_path) == {
        "format": "nvfp4", "kv_cache": "none", "dataset_yaml": "datasets_yaml/offline_mix.yaml", "batch_size": 2,
        "skip_layers": ("*lm_head",), "max_samples": 8, "max_seq_len": 64, "seed": 0}
    assert stage1_recorded_settings(tmp_path / "none") == {}


def test_written_manifests_carry_the_schema_version(tmp_path):
    manifest = build_manifest(source={}, mix_path="mix.yaml", calibration={}, quantization={}, timings_s={})
    assert next(iter(manifest)) == "schema_version" and manifest["schema_version"] == SCHEMA_VERSION


def test_bad_manifests_are_user_errors(tmp_path):
    path = tmp_path / MANIFEST_NAME
    path.write_text("{oops")
    with pytest.raises(UserError, match=rf"{MANIFEST_NAME}:1:2: not valid JSON"):
        read_manifest(tmp_path)
    path.write_text(json.dumps({**UNVERSIONED, "schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(UserError, match="newer than this quant-abliterate reads") as caught:
        read_manifest(tmp_path)
    assert "upgrade" in caught.value.fix
    path.write_text(json.dumps({**UNVERSIONED, "calibration": {"batch_size": "two"}}))
    with pytest.raises(UserError, match=rf"{MANIFEST_NAME}: calibration.batch_size"):
        read_manifest(tmp_path)
