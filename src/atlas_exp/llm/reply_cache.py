"""An append-only JSONL cache of replies (and of any JSON record keyed by a hash): what lets a selection or
evaluation that crashed, or is rerun, pay nothing for what it already got. Used by the chat client, and by
selectors that cache their own scores (perplexity, rollout values)."""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: bump when the cache record or key layout changes, so old records are not misread
CACHE_VERSION = 1


class ReplyCache:
    """Append-only JSONL of replies, loaded whole at start (a reply is ~1 KB; 100k of them fit easily).

    Each record is written with one `write` + flush + fsync under a lock, so concurrent threads never
    interleave and a crash can only tear the very last line, which `load` skips. Records carry the
    model name and token counts (to report what the cache saved), never the prompt or the key.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._data: dict[str, dict[str, Any]] = {}
        self.skipped = 0
        if self.path.exists():
            self._load()
        self._file = open(self.path, "a", encoding="utf-8")
        # after a torn last line, start on a fresh line so the next record stays parseable
        if self.path.stat().st_size and not self._ends_with_newline():
            self._file.write("\n")
            self._file.flush()

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as file:
            file.seek(-1, os.SEEK_END)
            return file.read(1) == b"\n"

    def _load(self) -> None:
        with open(self.path, encoding="utf-8", errors="replace") as lines:
            for line in lines:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    if record.get("v") == CACHE_VERSION:
                        self._data[record["key"]] = record
                except (json.JSONDecodeError, KeyError, AttributeError):
                    self.skipped += 1  # a torn line from a crash, or a foreign one: ignore it
        if self.skipped:
            log.warning("oracle cache %s: skipped %d unreadable line(s)", self.path, self.skipped)

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            return self._data.get(key)

    def put(self, key: str, record: dict[str, Any]) -> None:
        stored = {"v": CACHE_VERSION, "key": key, **record}
        line = json.dumps(stored, ensure_ascii=False) + "\n"
        with self._lock:
            self._data[key] = stored
            if self._file.closed:
                return  # a request that finished after close(): keep it in memory only
            self._file.write(line)
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.close()
