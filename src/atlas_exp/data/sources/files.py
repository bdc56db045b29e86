"""Local files -> `RawRecord`s: JSONL (one record a line), JSON (an array of records, or one record) and
parquet. Each reader yields what it decodes and turns a decode failure (bad JSON, not UTF-8, an unreadable
parquet) into a record carrying the error, so `data.on_error=skip` counts it like any other bad record.
Which files to read, and in what order, is `local.LocalFiles`' business."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from atlas_exp.data.sources.base import RawRecord
from atlas_exp.errors import DataError

_BOM = b"\xef\xbb\xbf"


def _stem(path: Path) -> str:
    """The file name before its first dot: the start of the ids of records that have none."""
    return path.name.split(".", 1)[0]


def is_empty(path: Path) -> bool:
    """Empty, or only whitespace (and a byte-order mark): nothing to read. Large files are not scanned."""
    try:
        size = path.stat().st_size
        if size > 4096:
            return False
        return not path.read_bytes().replace(_BOM, b"").strip()
    except OSError:
        return False


def read_jsonl(path: Path) -> Iterator[RawRecord]:
    """One record a non-blank line, `where` = `<file>:<line>`."""
    stem = _stem(path)
    with path.open("rb") as lines:
        for lineno, line in enumerate(lines, 1):
            where = f"{path}:{lineno}"
            if lineno == 1 and line.startswith(_BOM):
                line = line[len(_BOM):]
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                yield RawRecord(where, error=DataError(f"not UTF-8 text: {e.reason}", source=where))
                continue
            if not text.strip():
                continue
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                yield RawRecord(where, error=DataError(f"invalid JSON: {e.msg} (column {e.colno})", source=where))
                continue
            yield RawRecord(where, data=data, default_id=f"{stem}_{lineno}")


def load_json(path: Path) -> Any:
    """The decoded file, or a DataError (not raised) naming the line of a syntax error."""
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as e:
        return DataError(f"not UTF-8 text: {e.reason}", source=str(path))
    except json.JSONDecodeError as e:
        return DataError(f"invalid JSON: {e.msg} (column {e.colno})", source=f"{path}:{e.lineno}")


def json_records(path: Path, data: Any) -> Iterator[RawRecord]:
    """The records of a decoded `.json` file (`load_json`): an array's items, or the file as one record (an
    object, or an array of messages), `where` = `<file>#<n>`."""
    if isinstance(data, DataError):
        yield RawRecord(data.source or str(path), error=data)
        return
    stem = _stem(path)
    if isinstance(data, list) and not (data and all(isinstance(item, dict) and "role" in item for item in data)):
        for i, record in enumerate(data, 1):
            yield RawRecord(f"{path}#{i}", data=record, default_id=f"{stem}_{i}")
    else:
        yield RawRecord(f"{path}#1", data=data, default_id=f"{stem}_1")


def read_parquet(path: Path) -> Iterator[RawRecord]:
    """One record a row, read in batches, `where` = `<file>#<n>`; an unreadable file ends with an error record."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    stem = _stem(path)
    i = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
            for row in batch.to_pylist():
                i += 1
                yield RawRecord(f"{path}#{i}", data=row, default_id=f"{stem}_{i}")
    except (pa.ArrowException, OSError) as e:
        where = f"{path}#{i + 1}" if i else str(path)
        yield RawRecord(where, error=DataError(f"cannot read parquet: {e}", source=where))

