"""Repair the exclusion lists of a ModelOpt export so servers skip exactly the modules we kept unquantized.

ModelOpt 0.47's ``build_reverse_name_mapper`` appends the sentinel
``.\\x00modelopt_name_sentinel`` before applying a family's reverse renames; for
NemotronH the ``model.`` -> ``backbone.`` rule also matches inside
``modelopt``, so the sentinel is never stripped and ``exclude_modules`` /
``ignore`` hold ``'lm_head.\\x00backbone.pt_name_sentinel'``. vLLM then finds
no exclusion for ``lm_head`` and loads it as NVFP4 (and fails). We cut the
mangled sentinel off, map in-memory names (``model.``) to the checkpoint's own
(``backbone.``), and accept an entry only if it then matches a module the
exported tensors show exists: an entry that still resolves to nothing stops
stage 1 rather than shipping a checkpoint a server would misload.

ModelOpt also applies only part of a family's renames: for PhiMoE it writes
the router as ``block_sparse_moe.router`` (``mlp.`` renamed, ``router`` not),
while the checkpoint stores ``block_sparse_moe.gate`` (transformers'
``.mlp.router.`` <-> ``.block_sparse_moe.gate.``, ``layout.CHECKPOINT_RENAMES``).
So an entry is also read back to the model's name and spelled again with the
family's full renames. Both stage 1 and the NVFP4 re-export (which may start
from a checkpoint ModelOpt wrote elsewhere) run this repair before their
servability check.
"""

from __future__ import annotations

import json
from pathlib import Path

from checkpoint_formats.naming import CheckpointNaming, naming_for
from checkpoint_formats.reader import CheckpointReader
from checkpoint_formats.servability import checkpoint_modules, entry_matches
from foundation.errors import UserError

_SENTINEL_TAIL = "name_sentinel"  # what is left of ModelOpt's sentinel after a rename ate its "modelopt" part


def strip_sentinel(entry: str) -> str:
    """``'lm_head.\\x00backbone.pt_name_sentinel'`` -> ``'lm_head'``; a glob suffix after it is kept."""
    if "\x00" not in entry:
        return entry
    head, _, rest = entry.partition("\x00")
    tail = rest.partition(_SENTINEL_TAIL)[2] if _SENTINEL_TAIL in rest else ""
    return head.removesuffix(".") + tail


def _family_spellings(name: str, naming: CheckpointNaming) -> list[str]:
    """The checkpoint spellings of the module ``name`` read as the model's: ``...block_sparse_moe.router`` ->
    ``...block_sparse_moe.gate`` (renames are written for tensor names: a trailing dot makes the module one)."""
    if not naming.family_renames:
        return []
    return [candidate.removesuffix(".") for candidate in naming.disk_candidates(naming.to_model(name + "."))]


def repair_entry(entry: str, modules: set[str], naming: CheckpointNaming, where: str) -> str:
    stripped = strip_sentinel(entry)
    for candidate in dict.fromkeys([stripped, naming.to_disk(stripped), *_family_spellings(stripped, naming)]):
        if entry_matches(candidate, modules):
            return candidate
    raise UserError(
        where,
        f"entry {entry!r} names no module of the exported checkpoint (after removing ModelOpt's name sentinel: "
        f"{strip_sentinel(entry)!r})",
        "servers would quantize that module anyway: report the export bug, or --skip_layers with a pattern that "
        "names real modules",
    )


def repair_exclusions(export_dir: Path) -> dict[str, list[str]]:
    """Rewrite ``exclude_modules`` (hf_quant_config.json) and ``ignore`` (config.json) in place; returns the fixes."""
    export_dir = Path(export_dir)
    with CheckpointReader(export_dir) as reader:
        names = reader.names()
    config = json.loads((export_dir / "config.json").read_text()) if (export_dir / "config.json").is_file() else {}
    modules, naming = checkpoint_modules(names, config), naming_for(names, config=config)
    repaired: dict[str, list[str]] = {}
    targets = (("hf_quant_config.json", ("quantization", "exclude_modules")),
               ("config.json", ("quantization_config", "ignore")))
    for file_name, (section, field) in targets:
        path = export_dir / file_name
        if not path.is_file():
            continue
        document = json.loads(path.read_text())
        entries = (document.get(section) or {}).get(field)
        if not entries:
            continue
        where = f"{path}: {section}.{field}"
        fixed = list(dict.fromkeys(repair_entry(entry, modules, naming, where) for entry in entries))
        if fixed != entries:
            document[section][field] = fixed
            path.write_text(json.dumps(document, indent=4) + "\n")
            repaired[f"{file_name}: {section}.{field}"] = [e for e in entries if e not in fixed]
    return repaired
