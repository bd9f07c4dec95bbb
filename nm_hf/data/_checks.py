"""Checks of the data flags and local data files, run before `datasets` reads them (its errors name neither
file nor line)."""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from typing import Any, TextIO

__all__ = ["given_files", "json_records", "open_text", "scan_text_file"]


def given_files(
    dataset_name: str | None,
    train_file: str | os.PathLike[str] | None,
    validation_file: str | os.PathLike[str] | None,
    test_file: str | os.PathLike[str] | None,
) -> dict[str, str]:
    """The local data files given, by split name; refused alongside a `--dataset_name` (one source only)."""
    files = {"train": train_file, "validation": validation_file, "test": test_file}
    given = {name: os.fspath(path) for name, path in files.items() if path is not None}
    if dataset_name is not None and given:
        flags = ", ".join(f"--{name}_file" for name in given)
        raise ValueError(f"Pass either --dataset_name ({dataset_name}) or {flags}, not both")
    return given


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


def open_text(path: str) -> TextIO:
    """Open a UTF-8 text file, transparently decompressing ``.gz``; lines end at ``\\n`` only (a lone ``\\r``
    does not end one), as the JSON lines and parallel text readers of `datasets` split them."""
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def json_records(path: str, flag: str, example: str | None = None) -> Iterator[tuple[int, Any]]:
    """``(line number, record)`` for every non-blank line of a JSON lines file (optionally .gz).

    The file is checked first (`scan_text_file`); a line that is not JSON raises `ValueError` naming the
    flag, the file and the (1-based) line, followed by `example` of a valid line when given; a file
    without records is refused the same way, after its last line.
    """
    scan_text_file(path, flag)
    count = 0
    with open_text(path) as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                hint = f"; expected one object per line, e.g. {example}" if example else ""
                raise ValueError(f"{flag} {path}, line {lineno}: invalid JSON ({err.msg}){hint}") from None
            count += 1
            yield lineno, record
    if count == 0:
        raise ValueError(f"{flag} {path}: the file is empty (no JSON record)")
