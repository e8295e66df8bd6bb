"""Weights are read from safetensors only: a pickle (``.bin``, ``.pt``) runs code when ``torch.load`` opens it.

Every ``from_pretrained`` of a model passes ``use_safetensors=True`` (transformers then
never falls back to a pickle); ``require_safetensors`` says so plainly, before any load,
when a local model folder holds pickles and no safetensors. There is deliberately no
flag to load pickles: convert them once, in an environment you trust.
"""

from __future__ import annotations

import os
from pathlib import Path

from foundation.errors import UserError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
CONVERT_HINT = ("convert it once, where you trust the files: python -c \"from transformers import "
                "AutoModelForCausalLM as M; M.from_pretrained('IN', use_safetensors=False).save_pretrained('OUT')\" "
                "(save_pretrained writes safetensors), then pass OUT")


def require_safetensors(model: str | os.PathLike[str], flag: str) -> None:
    """Refuse a local model folder whose weights are only pickles; a Hub id is left to ``use_safetensors=True``."""
    folder = Path(os.path.expanduser(os.fspath(model)))
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(path.name for path in folder.iterdir() if path.suffix.lower() in PICKLE_SUFFIXES
                     and not path.name.startswith(("training_args", "optimizer", "scheduler", "rng_state")))
    if pickles:
        shown = ", ".join(pickles[:3]) + (f" and {len(pickles) - 3} more" if len(pickles) > 3 else "")
        raise UserError(
            f"{flag} {model}",
            f"holds only pickle weights ({shown}), no .safetensors; loading a pickle runs torch.load, which can "
            "execute code hidden in the file, so quant-abliterate reads safetensors only",
            CONVERT_HINT,
        )
