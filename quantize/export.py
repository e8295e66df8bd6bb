"""Write the ModelOpt unified HF checkpoint plus what a server needs beside it.

``export_hf_checkpoint`` writes the safetensors, ``config.json`` (with
``quantization_config``), ``hf_quant_config.json`` and the generation config;
it streams layer by layer when the model is accelerate-offloaded. A server
also needs the tokenizer and chat template, which ModelOpt does not copy.
The caller passes a temporary directory (``atomic_output_dir``), so a crash in
here never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


def ensure_architectures(model) -> None:
    """``export_hf_checkpoint`` needs ``config.architectures``; models built from a config lack it."""
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]


def export_modelopt_checkpoint(model, export_dir: Path) -> float:
    """Export a ModelOpt-quantized model; returns the seconds taken."""
    from modelopt.torch.export import export_hf_checkpoint

    ensure_architectures(model)
    started = time.perf_counter()
    export_hf_checkpoint(model, export_dir=str(export_dir))
    if not (Path(export_dir) / "hf_quant_config.json").is_file():
        raise RuntimeError(f"ModelOpt export wrote no hf_quant_config.json into {export_dir}: no quantizer was enabled?")
    return time.perf_counter() - started


def read_quant_config(export_dir: Path) -> dict:
    return json.loads((Path(export_dir) / "hf_quant_config.json").read_text())
