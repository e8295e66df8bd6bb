"""Which stages exist and where their code lives.

A stage adapter (``pipelines/adapters/<stage>.py``) is the only place that
knows how a pipeline feeds one stage: it turns the YAML block into that
stage's own settings object and calls the stage's public API. Adapters are
imported lazily: ModelOpt alone takes ~15 s to import.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from pydantic import BaseModel


@dataclass
class StageContext:
    """What a stage gets from the runner: its inputs and where to write."""

    pipeline_name: str
    source_model: str
    input_dir: str | None  # the previous stage's artifact (None for the first stage)
    stage_dir: str  # an empty directory that becomes <output_dir>/<stage> on success
    trust_remote_code: bool = False
    evaluate_original: bool = True
    previous_results: dict[str, dict[str, Any]] = field(default_factory=dict)


class StageAdapter(Protocol):
    def build_settings(self, user_settings: dict[str, Any], context: StageContext) -> BaseModel: ...

    def run(self, settings: BaseModel, context: StageContext) -> dict[str, Any]: ...


ADAPTER_MODULES = {
    "quantize": "pipelines.adapters.quantize",
    "abliterate": "pipelines.adapters.abliterate",
    "export": "pipelines.adapters.export",
    "evaluate": "pipelines.adapters.evaluate",
}


def adapter_for(stage: str) -> ModuleType:
    return importlib.import_module(ADAPTER_MODULES[stage])


def artifact_dir(output_dir: Path, stage: str, result: dict[str, Any]) -> Path:
    """The directory a later stage reads: ``result['artifact']`` inside the stage dir."""
    return Path(output_dir) / stage / result.get("artifact", ".")
