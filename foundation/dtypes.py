"""The one table of dtype spellings users may write, and what each means to torch.

Both stages take a dtype on the command line (``--dtype bf16``,
``--dtypes bfloat16 float32``) and users type the short and the long
spellings interchangeably; one table keeps the stages agreeing on what each
spelling loads. ``auto`` is passed through: transformers then picks the
checkpoint's own dtype.
"""

from __future__ import annotations

import torch

# spelling -> torch dtype (or "auto")
TORCH_DTYPES: dict[str, torch.dtype | str] = {
    "auto": "auto",
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}

# torch dtype -> the short name reports print
SHORT_NAMES: dict[torch.dtype, str] = {torch.float8_e4m3fn: "fp8", torch.bfloat16: "bf16", torch.float16: "fp16",
                                       torch.float32: "fp32"}
