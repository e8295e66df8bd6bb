"""Is every safetensors file of a model folder whole? Checked from the headers alone, before any load.

A shard cut short by an interrupted copy, a flipped byte in its JSON header or a
header length of 2^40 otherwise surfaces as safetensors' ``SafetensorError``
traceback from deep inside ``from_pretrained`` (stage 1 and stage 2 alike), after
ModelOpt's import and the tokenizer load. The format is simple enough to check
exactly: 8 bytes of little-endian header length, that many bytes of JSON, then
the tensor data, whose offsets must end at the end of the file.
"""

from __future__ import annotations

import json
from pathlib import Path

from foundation.errors import UserError

# safetensors itself refuses headers above 100 MB (its MAX_HEADER_SIZE)
MAX_HEADER_BYTES = 100_000_000
_FIX = "the file is damaged or incomplete: copy or download it again from the original checkpoint"


def check_safetensors_file(path: str | Path, where: str | None = None) -> None:
    """Raise a UserError naming ``path`` and what is wrong with it, unless its header and size agree."""
    path = Path(path)
    label = where or str(path)
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise UserError(label, f"{path} is {size} bytes long: too short to be a safetensors file", _FIX)
        header_bytes = int.from_bytes(prefix, "little")
        if header_bytes > MAX_HEADER_BYTES or 8 + header_bytes > size:
            raise UserError(label, f"{path}: its header claims {header_bytes:,} bytes, but the file holds {size:,} "
                            "(the header length is corrupt, or this is not a safetensors file)", _FIX)
        raw = handle.read(header_bytes)
    try:
        header = json.loads(raw)
        ends = [int(entry["data_offsets"][1]) for name, entry in header.items() if name != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as error:
        raise UserError(label, f"{path}: its header is not valid safetensors JSON ({error})", _FIX) from None
    needed = 8 + header_bytes + max(ends, default=0)
    if needed > size:
        raise UserError(label, f"{path} is truncated: its tensors need {needed:,} bytes, the file holds {size:,} "
                        f"({(needed - size) / needed:.0%} missing)", _FIX)


def check_safetensors_folder(folder: str | Path, where: str | None = None) -> None:
    """Every ``*.safetensors`` file directly in ``folder`` (a model directory); a Hub id or a missing folder is skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for path in sorted(folder.glob("*.safetensors")):
        check_safetensors_file(path, where)
