"""The one rule for "is this a local path or a Hugging Face Hub id?".

Models and calibration datasets are named the same way: an existing local
path, or a Hub repository id (``name`` or ``owner/name``). When the path does
not exist, the stages must agree on whether the user meant a path (say "does
not exist" now) or a Hub id (hand it to the Hub client), or one stage reports
a typo as missing while another sends it to the network.
"""

from __future__ import annotations

import re

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def is_hub_id(name: str) -> bool:
    """``name`` or ``owner/name`` of letters, digits, ``_ . -``, starting with a letter or digit."""
    return bool(_HUB_ID.match(name))


def looks_like_local_path(name: str) -> bool:
    """Anything that cannot be a Hub id (``/x``, ``./x``, ``~/x``, ``a/b/c``, ``C:\\x``) is meant as a path."""
    return not is_hub_id(name)
