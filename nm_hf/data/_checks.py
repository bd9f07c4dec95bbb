"""Checks of local data files, run before `datasets` reads them (its errors name neither file nor line)."""

from __future__ import annotations

import gzip
import os

__all__ = ["scan_text_file"]


def scan_text_file(path: str | os.PathLike[str], flag: str) -> bool:
    """Check that `path` (optionally .gz) is UTF-8 text; return whether it holds any non-blank text.

    A bad byte raises `ValueError` naming the flag, the file and the (1-based) line. Lines are decoded
    one at a time (a newline byte never occurs inside a UTF-8 sequence), so a large file costs one
    streaming read.
    """
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    has_text = False
    with opener(path, "rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"{flag} {path}: not UTF-8 text (byte 0x{raw[err.start]:02x} on line {lineno}); convert "
                    "it to UTF-8, e.g. iconv -f latin1 -t utf-8") from None
            if not has_text and text.strip():
                has_text = True
    return has_text
