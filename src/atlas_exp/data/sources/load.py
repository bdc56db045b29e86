"""Sources -> trajectories: `load_trajectories`, the data stage's one entry point, reads every source in
order, applies `data.on_error` (stop at the first bad record, or skip and account for it), warns about
trajectories that load but look wrong, and says what it read (`LoadResult`, data_summary.json)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from atlas_exp.data.sources.base import WARN_FIRST
from atlas_exp.data.sources.local import LocalFiles
from atlas_exp.data.trajectory import Trajectory
from atlas_exp.errors import ConfigError, DataError

log = logging.getLogger(__name__)

ON_ERROR = ("error", "skip")
#: a turn longer than this many characters gets a warning (likely a whole log or file pasted into one turn)
LONG_TURN_CHARS = 100_000


@dataclass(frozen=True)
class SkippedRecord:
    """A record left out under `on_error="skip"`: where it is, which field, and why."""

    where: str
    field: str | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"where": self.where, "field": self.field, "reason": self.reason}

    def describe(self) -> str:
        """`<where> [<field>]: <reason>`, as the warnings and errors name a skipped record."""
        return f"{self.where}{f' [{self.field}]' if self.field else ''}: {self.reason}"


@dataclass
class LoadResult:
    """What `load_trajectories` read: the trajectories, how many records it saw, and what it skipped."""

    trajectories: list[Trajectory]
    n_read: int
    skipped: list[SkippedRecord] = field(default_factory=list)
    #: per source: {"source", "n_read", "n_loaded", "n_skipped", "unread_files"?, "ignored_files"?}
    per_source: list[dict[str, Any]] = field(default_factory=list)
    #: loaded but suspicious: {"long_turns": [where...], "assistant_first": [where...]} (see `_note_suspicious`)
    warnings: dict[str, list[str]] = field(default_factory=dict)

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    def summary(self, max_skipped: int = 50) -> dict[str, Any]:
        """A JSON-ready account for the data stage's summary (the first `max_skipped` skips in full)."""
        return {
            "n_read": self.n_read,
            "n_loaded": len(self.trajectories),
            "n_skipped": self.n_skipped,
            "skipped": [skip.to_dict() for skip in self.skipped[:max_skipped]],
            "per_source": self.per_source,
            "warnings": {kind: {"n": len(hits), "first": hits[:max_skipped]}
                         for kind, hits in self.warnings.items() if hits},
        }


def load_trajectories(sources: Any, on_error: str = "error", *, progress: bool = True,
                      log_first: int = WARN_FIRST) -> LoadResult:
    """Read every source in order into trajectories.

    `on_error="error"` raises the first bad record's DataError (it names file, line and field).
    `on_error="skip"` leaves bad records out, lists them in `LoadResult.skipped` and logs one warning with
    the count and the first `log_first` reasons, so no drop goes unreported. Problems with a source as a
    whole (a missing path, a dataset that cannot load, a source that gives no trajectory at all) always
    raise a ConfigError naming the source and why: skipping them would silently train on less data than
    configured.

    Loaded trajectories that look wrong are kept, and warned about with their record (`LoadResult.warnings`):
    a turn longer than LONG_TURN_CHARS characters, a trajectory that starts with an assistant turn.

    `sources`: one source or a list of them (a plain path string is read as `LocalFiles(path)`).
    """
    if on_error not in ON_ERROR:
        raise ConfigError(f"data.on_error={on_error!r}: expected one of {', '.join(ON_ERROR)}")
    if isinstance(sources, (str, os.PathLike)) or not isinstance(sources, Iterable):
        sources = [sources]
    result = LoadResult(trajectories=[], n_read=0, warnings={"long_turns": [], "assistant_first": []})
    for source in sources:
        if isinstance(source, (str, os.PathLike)):
            source = LocalFiles(str(source))
        name = source.describe() if hasattr(source, "describe") else type(source).__name__
        n_read = n_loaded = n_skipped = 0
        first_skip: SkippedRecord | None = None
        bar = tqdm(desc=name, unit=" rec", disable=None if progress else True, leave=False)
        try:
            if hasattr(source, "iter_records"):
                for raw in source.iter_records():
                    n_read += 1
                    bar.update()
                    try:
                        traj = source.convert(raw)
                    except DataError as e:
                        if on_error == "error":
                            raise
                        n_skipped += 1
                        result.skipped.append(SkippedRecord(where=e.source or raw.where, field=e.field, reason=e.reason))
                        first_skip = first_skip or result.skipped[-1]
                        continue
                    _note_suspicious(traj, result.warnings)
                    result.trajectories.append(traj)
                    n_loaded += 1
            elif hasattr(source, "iter_trajectories"):
                for traj in source.iter_trajectories():
                    n_read += 1
                    n_loaded += 1
                    bar.update()
                    _note_suspicious(traj, result.warnings)
                    result.trajectories.append(traj)
            else:
                raise ConfigError(f"data source {source!r} has neither iter_records() nor iter_trajectories()")
        finally:
            bar.close()
        result.n_read += n_read
        entry = {"source": name, "n_read": n_read, "n_loaded": n_loaded, "n_skipped": n_skipped}
        for key in ("unread_files", "ignored_files"):
            if getattr(source, key, None):
                entry[key] = list(getattr(source, key))
        result.per_source.append(entry)
        log.info("%s: %d records read, %d trajectories, %d skipped", name, n_read, n_loaded, n_skipped)
        if n_loaded == 0:
            raise ConfigError(f"data source {name} gave no trajectory: {_why_empty(entry, first_skip)}")
    if result.skipped:
        first = "; ".join(skip.describe() for skip in result.skipped[:log_first])
        log.warning("skipped %d of %d records (data.on_error=skip); first: %s", result.n_skipped, result.n_read, first)
    for kind, what in (("long_turns", f"a turn longer than {LONG_TURN_CHARS:,} characters"),
                       ("assistant_first", "a first turn by the assistant (no task or observation before its first step)")):
        hits = result.warnings[kind]
        if hits:
            log.warning("%d trajectories have %s (kept): %s%s", len(hits), what, "; ".join(hits[:log_first]),
                        " ..." if len(hits) > log_first else "")
    return result


def _note_suspicious(traj: Trajectory, warnings: dict[str, list[str]]) -> None:
    """Add the trajectory to `warnings` when it looks wrong: a very long turn, an assistant turn first."""
    where = traj.source or traj.id
    long_turn = next((i for i, m in enumerate(traj.messages) if len(m.content) > LONG_TURN_CHARS), None)
    if long_turn is not None:
        warnings["long_turns"].append(f"{where} (turn {long_turn}: {len(traj.messages[long_turn].content):,} characters)")
    if traj.messages[0].role == "assistant":
        warnings["assistant_first"].append(where)


def _why_empty(entry: dict[str, Any], first_skip: SkippedRecord | None) -> str:
    """Why a source gave no trajectory, from its `per_source` entry and its first skipped record."""
    if entry["n_read"] == 0:
        files = entry.get("unread_files", []) + entry.get("ignored_files", [])
        listed = f": not read: {', '.join(files[:WARN_FIRST])}{' ...' if len(files) > WARN_FIRST else ''}" if files else ""
        return f"it holds no record (empty files or an empty JSON array){listed}"
    first = f"; first: {first_skip.describe()}" if first_skip else ""
    return f"all {entry['n_read']} of its records are bad and were skipped (data.on_error=skip){first}"
