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
import shutil
import time
from pathlib import Path

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja", "chat_template.json",
)
BESIDE_WEIGHTS_FILES = ("generation_config.json", "preprocessor_config.json", "processor_config.json")


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


def copy_tokenizer_files(source_model: str, tokenizer, export_dir: Path) -> list[str]:
    """Copy the source's tokenizer/chat-template files verbatim; save from memory for Hub ids.

    Verbatim copies keep the tokenizer byte-identical to the source; files the
    export already wrote (generation_config.json) are left as ModelOpt wrote them.
    """
    export_dir = Path(export_dir)
    source_dir = Path(source_model)
    copied: list[str] = []
    if source_dir.is_dir():
        for name in (*TOKENIZER_FILES, *BESIDE_WEIGHTS_FILES):
            source_file = source_dir / name
            if source_file.is_file() and not (export_dir / name).exists():
                shutil.copy2(source_file, export_dir / name)
                copied.append(name)
    if not any(name in copied for name in TOKENIZER_FILES) and tokenizer is not None:
        tokenizer.save_pretrained(str(export_dir))
        copied.extend(sorted(path.name for path in export_dir.iterdir() if path.name in TOKENIZER_FILES))
    return copied


def read_quant_config(export_dir: Path) -> dict:
    return json.loads((Path(export_dir) / "hf_quant_config.json").read_text())
