"""Row readers for prompt files: jsonl (plain or gzip-compressed) and parquet, one dict per row, 1-based row numbers."""

from __future__ import annotations

import gzip
import json
import os
import zlib
from typing import Any, Iterator, Optional, Union

from aapo_megatron.errors import BadInputError

RowOrError = Union[dict[str, Any], str]

GZIP_MAGIC = b"\x1f\x8b"


class DataError(BadInputError, ValueError):
    """A prompt file or source is unusable (missing, unreadable, or every row bad); the message names it."""


def detect_format(path: str, source: Optional[str] = None) -> str:
    """"jsonl" or "parquet": from `source` when it is one of those, else from the file extension."""
    if source in ("jsonl", "parquet"):
        return source
    lower = path.lower()
    if lower.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        return "jsonl"
    if lower.endswith((".parquet", ".pq")):
        return "parquet"
    raise DataError(f"{path}: cannot tell the format from the extension; use .jsonl or .parquet, or set data.source")


def read_rows(path: str, source: Optional[str] = None) -> Iterator[tuple[int, RowOrError]]:
    """Yield (row number, row dict) per row; an unreadable row yields (row number, error message) instead."""
    check_readable(path)
    fmt = detect_format(path, source)
    if fmt == "jsonl":
        yield from _read_jsonl(path)
    else:
        yield from _read_parquet(path)


def check_readable(path: str) -> None:
    """DataError unless `path` is a file this process can open and, when named *.gz, gzip data."""
    if not os.path.exists(path):
        raise DataError(f"prompt file not found: {path}")
    if not os.path.isfile(path):
        raise DataError(f"{path}: not a regular file")
    try:
        with open(path, "rb") as fh:
            head = fh.read(2)
    except OSError as exc:
        raise DataError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    if path.lower().endswith(".gz") and head != GZIP_MAGIC:
        raise DataError(f"{path}: named .gz but not gzip data")


def _is_gzip(path: str) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == GZIP_MAGIC


def _read_jsonl(path: str) -> Iterator[tuple[int, RowOrError]]:
    """Rows are lines (1-based line numbers of the decompressed text); blank lines are not rows."""
    compressed = _is_gzip(path)
    lineno = 0
    try:
        with (gzip.open if compressed else open)(path, "rt", encoding="utf-8", errors="replace") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line.strip())
                except json.JSONDecodeError as exc:
                    yield lineno, f"invalid JSON ({exc.msg} at column {exc.colno})"
                    continue
                if not isinstance(row, dict):
                    yield lineno, f"not a JSON object (got {type(row).__name__})"
                    continue
                yield lineno, row
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError; EOFError: truncated gzip
        what = "corrupt gzip data" if compressed else "read error"
        raise DataError(f"{path}: {what} after line {lineno}: {exc}") from None


def _read_parquet(path: str) -> Iterator[tuple[int, RowOrError]]:
    """Rows in file order, numbered from 1; nested columns come back as dicts / lists."""
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError variants
        raise DataError(f"{path}: not a readable parquet file: {exc}") from None
    rowno = 0
    for batch in reader.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            rowno += 1
            yield rowno, row
