"""Memory budgets as users write them (``80GiB``, ``200GB``, ``0``): one pattern for every flag that takes one.

accelerate parses these only when it plans a placement, so a typo (``80XB``) was either accepted
silently (a CPU-only run never plans) or failed deep inside ``from_pretrained``.
"""

from __future__ import annotations

import re

MEMORY_SIZE = re.compile(r"^\s*\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?\s*$", re.IGNORECASE)


def check_memory_size(value: object, what: str = "memory size") -> object:
    """``value`` unchanged when it is a byte count or a size with a unit, else ValueError naming ``what``."""
    if isinstance(value, bool) or not (isinstance(value, int) and value >= 0 or isinstance(value, str) and MEMORY_SIZE.match(value)):
        raise ValueError(f"{what}: {value!r} is not a size; write e.g. 80GiB, 200GB or 0 (units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    return value
