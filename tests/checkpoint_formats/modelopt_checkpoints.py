"""Tiny ModelOpt exports made on the CPU (NemotronH NVFP4 / W4A16, Llama NVFP4), shared by the tests that need them."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch


def modelopt_export(model_factory, directory: Path, config_name: str = "NVFP4_DEFAULT_CFG") -> Path:
    """Save the tiny model, reload it as stage 1 does (from_pretrained), calibrate with max on CPU, export."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM

    source = directory.parent / f"{directory.name}-bf16"
    model_factory().to(torch.bfloat16).save_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).eval()
    ids = torch.randint(1, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mtq.quantize(model, getattr(mtq, config_name), lambda m: [m(row[None]) for row in ids])
    export_hf_checkpoint(model, export_dir=str(directory))
    return directory


def corrupted_copy(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination)
    return destination
