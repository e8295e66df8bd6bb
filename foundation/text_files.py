"""Reading a user's text file (a corpus, a prompt list, a YAML spec) with a clear message when it is not UTF-8.

Every text format we read is UTF-8. A file saved in Latin-1 or Windows-1252
(``café`` as the single byte 0xE9) otherwise fails deep inside a parser with a
``UnicodeDecodeError``, or worse, inside pyarrow after the dataset was built;
here it fails first, naming the file, the line and the byte, and saying how to
convert it.
"""

from __future__ import annotations

import codecs
from pathlib import Path

from foundation.errors import UserError

_CHUNK = 1 << 20


def _not_utf8(path: Path, where: str | None, line: int, byte: int, offset: int) -> UserError:
    return UserError(
        where or str(path),
        f"{path} is not UTF-8 text: byte 0x{byte:02x} at line {line} (byte offset {offset}) cannot be decoded "
        "(the file was probably saved as Latin-1 / Windows-1252)",
        f"re-save it as UTF-8, e.g. `iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8{path.suffix}` "
        "and point at the converted file",
    )


def require_utf8(path: str | Path, where: str | None = None) -> None:
    """Raise a UserError naming the first undecodable byte (and its line) unless ``path`` is UTF-8.

    Reads in chunks, so a multi-gigabyte corpus costs one sequential read and no memory.
    """
    path = Path(path)
    decoder = codecs.getincrementaldecoder("utf-8")()
    consumed = 0
    with path.open("rb") as handle:
        while True:
            chunk = handle.read(_CHUNK)
            final = not chunk
            try:
                decoder.decode(chunk, final=final)
            except UnicodeDecodeError as error:
                # error.start is relative to the decoder's buffered input (the tail of the last chunk + this one)
                pending = len(error.object) - len(chunk)
                position = consumed - pending + error.start
                with path.open("rb") as again:
                    head = again.read(max(position, 0))
                raise _not_utf8(path, where, head.count(b"\n") + 1, error.object[error.start], position) from None
            if final:
                return
            consumed += len(chunk)


def decode_utf8(raw: bytes, path: str | Path, where: str | None = None) -> str:
    """``raw`` (the bytes of ``path``) as text, with a UserError naming the line instead of a UnicodeDecodeError."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise _not_utf8(Path(path), where, raw[: error.start].count(b"\n") + 1, raw[error.start], error.start) from None


def read_utf8_text(path: str | Path, where: str | None = None) -> str:
    """``path.read_text(encoding="utf-8")``, with a UserError naming the line instead of a UnicodeDecodeError."""
    return decode_utf8(Path(path).read_bytes(), path, where)


def is_blank_file(path: str | Path) -> bool:
    """True when the file holds nothing but whitespace (an empty corpus or prompt list)."""
    with Path(path).open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            if chunk.strip():
                return False
    return True
