"""Device names as users write them for ``--device_map``, checked before anything loads.

accelerate and transformers accept a handful of strategy names and device strings; anything else
(``banana``) used to fail once per dtype inside ``from_pretrained`` and end in "try another --dtypes
list", and ``cuda`` on a machine without a GPU only failed there too.
"""

from __future__ import annotations

import re

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
_DEVICE = re.compile(r"cpu|mps|\d+|(cuda|xpu|npu)(:\d+)?")


def check_device_map(value: str) -> str:
    """``value`` unchanged when it is a strategy or a device name, else ValueError listing the accepted forms."""
    if value in STRATEGIES or _DEVICE.fullmatch(value):
        return value
    raise ValueError(f"unknown device_map {value!r}; use one of {', '.join(STRATEGIES)}, cpu, cuda, cuda:N (a GPU index)")


def require_visible_device(device_map: object, flag: str = "--device_map") -> None:
    """A device_map naming a GPU on a machine where torch sees none (or fewer) is refused before the load."""
    from foundation.errors import UserError

    text = str(device_map) if isinstance(device_map, str) else None
    if text is None or not (text.startswith("cuda") or text.isdigit()):
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(text.split(":", 1)[1]) if ":" in text else int(text) if text.isdigit() else 0
    if count == 0:
        raise UserError(flag, f"{text} was requested but torch sees no CUDA GPU on this machine",
                        "pass --device_map cpu (or auto, which uses a GPU when there is one)")
    if index >= count:
        raise UserError(flag, f"{text} was requested but torch sees only {count} GPU(s) (cuda:0..cuda:{count - 1})",
                        f"pass a GPU index below {count}, or --device_map auto")
