"""transformers' loading report, made a hard error: no weight may be silently random or silently ignored.

``from_pretrained(..., output_loading_info=True)`` returns, next to the model,
the checkpoint keys it could not place (``unexpected_keys``), the parameters
the checkpoint lacks and that it therefore initialized at random
(``missing_keys``) and those whose shape differs (``mismatched_keys``). A
missing ``o_proj.weight`` only logs "newly initialized" and a stage would then
quantize or abliterate random weights; every stage that loads a model checks
the report here instead. Keys a model class declares optional
(``_keys_to_ignore_on_load_*``, tied weights) are already left out by
transformers.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from foundation.errors import UserError

_SHOWN = 5


def _listed(names: Iterable[Any]) -> str:
    names = sorted(str(name) for name in names)
    return ", ".join(names[:_SHOWN]) + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def require_complete_load(info: dict[str, Any], folder: str, where: str) -> None:
    """Raise a UserError naming the tensors when the report has any missing, unexpected or mismatched key."""
    missing = list(info.get("missing_keys") or ())
    unexpected = list(info.get("unexpected_keys") or ())
    mismatched = [entry[0] if isinstance(entry, (tuple, list)) else entry for entry in info.get("mismatched_keys") or ()]
    if not (missing or unexpected or mismatched):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensor(s) the model needs are missing (they would be random): {_listed(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} tensor(s) match no parameter of the model (they would be ignored): "
                     f"{_listed(unexpected)}")
    if mismatched:
        parts.append(f"{len(mismatched)} tensor(s) have another shape than config.json implies: {_listed(mismatched)}")
    raise UserError(
        where,
        f"the safetensors files in {folder} do not match its config.json: " + "; ".join(parts),
        "restore the complete checkpoint (every shard and tensor, unedited), or point at the folder whose "
        "config.json describes these weights",
    )
