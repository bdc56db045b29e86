"""Reading and writing stage artifacts: atomic, versioned, and inspectable (JSON/JSONL).

Every artifact is written to a temporary file in the same folder and renamed into place, so a crash
leaves either the previous artifact or the new one, never half a file. Each stage also writes a
`<stage>_summary.json` with the schema version and a fingerprint of its inputs and config; a stage that
finds a summary with the same fingerprint skips its work.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

from atlas_exp.errors import AtlasError, DataError

SCHEMA_VERSION = 1

# mkstemp creates files readable by their owner only; artifacts get the usual mode (0666 less the umask)
# so that collaborators on a shared file system can read a run.
_UMASK = os.umask(0)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[TextIO]:
    """Open a temporary file beside `path` for writing; on success it is fsynced and renamed into place,
    on any error it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AtlasError(f"missing artifact {path}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON: {e.msg}", source=f"{path}:{e.lineno}") from None


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows atomically; returns the count."""
    n = 0
    with atomic_open(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False))
            f.write("\n")
            n += 1
    return n


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """Yield (line_number, object) for each non-blank line; bad JSON raises a DataError naming the line."""
    path = Path(path)
    if not path.exists():
        raise AtlasError(f"missing artifact {path}")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"invalid JSON: {e.msg} (column {e.colno})", source=f"{path}:{lineno}") from None


def fingerprint(*parts: Any) -> str:
    """A stable hash of JSON-serialisable parts (configs, input fingerprints)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()[:16]


def file_fingerprint(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def summary_matches(summary_path: str | os.PathLike, fp: str, *artifacts: str | os.PathLike) -> bool:
    """True when a stage already finished with this fingerprint and its artifacts are all present."""
    p = Path(summary_path)
    if not p.exists() or not all(Path(a).exists() for a in artifacts):
        return False
    try:
        s = json.loads(p.read_text())
    except json.JSONDecodeError:
        return False
    return s.get("schema_version") == SCHEMA_VERSION and s.get("fingerprint") == fp
