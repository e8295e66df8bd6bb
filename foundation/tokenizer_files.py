"""The files a server needs beside the weights, copied verbatim into every exported checkpoint.

ModelOpt's export and our streaming re-export both write weights only; the
tokenizer and chat template must be byte-identical to the source's.
"""

from __future__ import annotations

import shutil
from pathlib import Path

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja", "chat_template.json",
)
BESIDE_WEIGHTS_FILES = ("generation_config.json", "preprocessor_config.json", "processor_config.json")


def has_tokenizer(directory: str | Path) -> bool:
    return any((Path(directory) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def copy_tokenizer_files(source_model: str, tokenizer, export_dir: Path) -> list[str]:
    """Copy the source's tokenizer/chat-template files verbatim; save from memory for Hub ids.

    Files the export already wrote (generation_config.json) are left as the export wrote them.
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
