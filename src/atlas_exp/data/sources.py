"""Where expert records come from, and the one entry point that turns sources into trajectories.

Sources are plain classes with simple typed constructor arguments so that Hydra can build them from
`conf/data/*.yaml` (`_target_: atlas_exp.data.sources.LocalFiles`). Constructors only check their
options; nothing is read until `load_trajectories` iterates a source, so composing a config stays cheap.

A source offers either
- `iter_records()` yielding `RawRecord`s plus `convert(raw) -> Trajectory` (the `RecordSource` base class
  gives `convert` through `importers.convert_record`), or
- `iter_trajectories()` yielding ready `Trajectory`s (for sources that generate data, e.g. an expert).

Record locations (`where`, also each trajectory's `source`): `<file>:<line>` for JSONL (1-based lines),
`<file>#<n>` for the n-th record (1-based) of a JSON array or parquet file, `<name>[<split>]#<n>` for a
`datasets` row. Every DataError message starts with that location.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from atlas_exp.artifacts import file_fingerprint, fingerprint
from atlas_exp.data.importers import (
    ChatFields,
    ImportOptions,
    PairOptions,
    TranscriptOptions,
    check_format,
    convert_record,
    env_from_filename,
    looks_like_pair,
)
from atlas_exp.data.trajectory import Trajectory
from atlas_exp.errors import ConfigError, DataError

log = logging.getLogger(__name__)

#: file kinds `LocalFiles` reads (lower-case suffixes); other files inside a folder are listed in a warning
EXTENSIONS = (".jsonl", ".json", ".parquet")
ON_ERROR = ("error", "skip")
#: a turn longer than this many characters gets a warning (likely a whole log or file pasted into one turn)
LONG_TURN_CHARS = 100_000
#: how many records a warning names one by one
WARN_FIRST = 5


@dataclass
class RawRecord:
    """One decoded record and what its converter needs to know about where it came from.

    `error` is set instead of `data` when the record could not even be decoded (bad JSON line, unreadable
    file), so that `on_error="skip"` can count it like any other bad record and move on.
    """

    where: str
    data: Any = None
    default_id: str | None = None
    fallback_env: str | None = None
    error: DataError | None = None


@dataclass(frozen=True)
class SkippedRecord:
    """A record left out under `on_error="skip"`: where it is, which field, and why."""

    where: str
    field: str | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"where": self.where, "field": self.field, "reason": self.reason}


@dataclass
class LoadResult:
    """What `load_trajectories` read: the trajectories, how many records it saw, and what it skipped."""

    trajectories: list[Trajectory]
    n_read: int
    skipped: list[SkippedRecord] = field(default_factory=list)
    #: per source: {"source", "n_read", "n_loaded", "n_skipped", "unread_files"?, "ignored_files"?}
    per_source: list[dict[str, Any]] = field(default_factory=list)
    #: loaded but suspicious: {"long_turns": [where...], "assistant_first": [where...]} (see `check_trajectory`)
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
            "skipped": [s.to_dict() for s in self.skipped[:max_skipped]],
            "per_source": self.per_source,
            "warnings": {k: {"n": len(v), "first": v[:max_skipped]} for k, v in self.warnings.items() if v},
        }


class RecordSource:
    """Base for sources of raw records in the formats `importers` knows.

    `format`: auto | agentgym | sharegpt | openai | generic | transcript | pairs. `env`: the env of records
    that name none (overrides the id and file-name rules, never a record's own `env`). Lists of messages:
    `messages_key` (the field holding the turns), `role_key`, `content_key`, `loss_key`, `weight_key` and
    `roles` ({canonical role: [names in the file]}); `transcript` and `pairs`: the options of those
    formats (`importers.TranscriptOptions`, `importers.PairOptions`). `limit`: read at most this many
    records per file (or per split), for quick runs and samples.
    """

    def __init__(self, format: str = "auto", env: str | None = None, messages_key: str | None = None,
                 limit: int | None = None, role_key: str | None = None, content_key: str | None = None,
                 loss_key: str | None = None, weight_key: str | None = None, roles: Any = None,
                 transcript: Any = None, pairs: Any = None):
        self.format = check_format(format)
        if env is not None and (not isinstance(env, str) or not env.strip()):
            raise ConfigError(f"env={env!r}: expected a non-empty env name or null")
        self.env = env
        self.options = ImportOptions(
            format=self.format,
            chat=ChatFields.build(messages_key, role_key, content_key, loss_key, weight_key, roles),
            transcript=TranscriptOptions.build(transcript),
            pairs=PairOptions.build(pairs),
        )
        self.messages_key = self.options.chat.messages_key
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ConfigError(f"limit={limit!r}: expected a positive integer or null")
        self.limit = limit

    def iter_records(self) -> Iterator[RawRecord]:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__

    def convert(self, raw: RawRecord) -> Trajectory:
        if raw.error is not None:
            raise raw.error
        return convert_record(
            raw.data,
            where=raw.where,
            default_id=raw.default_id,
            default_env=self.env,
            fallback_env=raw.fallback_env,
            options=self.options,
        )

    def _options(self) -> dict[str, Any]:
        return {**self.options.fingerprint_parts(), "env": self.env, "limit": self.limit}


class LocalFiles(RecordSource):
    """Records from local files or folders: `.jsonl`, `.json` (an array of records or one record) and
    `.parquet` (read with pyarrow).

    Each path is a file, a folder (searched recursively; hidden files and folders skipped) or a glob
    pattern (`data/agenttraj_l/*.jsonl`, `data/**/*.parquet`). Files are read in the order the paths are
    given, each folder's or pattern's files sorted by path, so the same inputs always give the same
    trajectory order (which the seeded filters and splits rely on). A file listed twice is read once. A
    missing path, an empty folder or a pattern matching nothing is a ConfigError: the config is wrong,
    not a record.

    Folders often hold metadata next to the data (AgentTraj-L's `stats.json`, `dataset_info.json`): a
    `.json` file found by a folder search whose top level is an object without `conversations`,
    `messages` or `messages_key` (nor input/output fields) is not read, and a warning names it
    (`ignored_files` lists them). A file named explicitly is always read, and then such content is a
    DataError. Other files a folder search finds but does not read (other or upper-case extensions such
    as `.JSONL`, empty files) are listed in a warning too (`unread_files`); hidden ones are not.

    A `.json` array whose items all look like messages (objects with a `role`) is one generic record,
    not a list of records. A UTF-8 byte-order mark at the start of a `.jsonl`/`.json` file is skipped.
    """

    def __init__(self, paths: str | list[str], format: str = "auto", env: str | None = None,
                 messages_key: str | None = None, limit: int | None = None, **options: Any):
        super().__init__(format=format, env=env, messages_key=messages_key, limit=limit, **options)
        # Hydra passes a ListConfig, not a list: accept any iterable of path-likes
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.paths = [str(p) for p in paths]
        if not self.paths:
            raise ConfigError("LocalFiles: paths is empty")
        self.ignored_files: list[str] = []
        self.unread_files: list[str] = []

    def describe(self) -> str:
        return f"LocalFiles({', '.join(self.paths)})"

    def files(self) -> list[Path]:
        """The files to read, in reading order."""
        return [f for f, _ in self._files()]

    def _files(self) -> list[tuple[Path, bool]]:
        """(file, found by a folder search) in reading order; `unread_files` gets what folders hold besides."""
        out: list[tuple[Path, bool]] = []
        seen: set[Path] = set()
        unread: list[str] = []
        for p in self.paths:
            path = Path(p).expanduser()
            if any(c in p for c in "*?["):
                anchor = Path(path.anchor) if path.is_absolute() else Path(".")
                pattern = str(path.relative_to(anchor)) if path.is_absolute() else str(path)
                found = [(f, False) for f in sorted(anchor.glob(pattern)) if f.is_file() and f.suffix in EXTENSIONS]
                if not found:
                    raise ConfigError(f"data source pattern {p} matches no {'/'.join(EXTENSIONS)} file")
            elif path.is_dir():
                visible = [
                    f for f in sorted(path.rglob("*"), key=lambda f: f.relative_to(path).as_posix())
                    if f.is_file() and not any(part.startswith(".") for part in f.relative_to(path).parts)
                ]
                found = [(f, True) for f in visible if f.suffix in EXTENSIONS]
                unread += [str(f) for f in visible if f.suffix not in EXTENSIONS]
                if not found:
                    hint = f" (it holds {', '.join(Path(u).name for u in unread[:5])}: upper-case or other " \
                           "extensions are not read)" if unread else ""
                    raise ConfigError(f"data source folder {path} holds no {'/'.join(EXTENSIONS)} file{hint}")
            elif path.is_file():
                if path.suffix not in EXTENSIONS:
                    raise ConfigError(f"data source file {path}: unsupported type {path.suffix!r} "
                                      f"(expected {', '.join(EXTENSIONS)})")
                found = [(path, False)]
            else:
                raise ConfigError(f"data source path {path} does not exist")
            for f, by_folder in found:
                key = f.resolve()
                if key not in seen:
                    seen.add(key)
                    out.append((f, by_folder))
        self.unread_files = unread
        return out

    def fingerprint(self) -> str:
        """Changes when any file's content or a reading option changes (for stage caching)."""
        return fingerprint(self._options(), [(str(f), file_fingerprint(f)) for f in self.files()])

    def iter_records(self) -> Iterator[RawRecord]:
        self.ignored_files = []
        files = self._files()
        empty = {f for f, _ in files if _is_empty(f)}
        why = [f"{u} (not {'/'.join(EXTENSIONS)})" for u in self.unread_files] + [f"{f} (empty)" for f, _ in files if f in empty]
        self.unread_files += [str(f) for f, _ in files if f in empty]
        if why:
            more = f"; and {len(why) - WARN_FIRST} more (data_summary.json lists them)" if len(why) > WARN_FIRST else ""
            log.warning("%s: not reading %d file(s): %s%s", self.describe(), len(why), "; ".join(why[:WARN_FIRST]), more)
        for f, by_folder in files:
            if f in empty:
                continue
            if f.suffix == ".jsonl":
                records = _read_jsonl(f)
            elif f.suffix == ".parquet":
                records = _read_parquet(f)
            else:
                data = _load_json(f)
                if by_folder and self.format not in ("transcript", "pairs") and isinstance(data, dict) and not (
                    any(data.get(k) is not None for k in ("conversations", "messages", self.messages_key) if k)
                    or looks_like_pair(data)
                ):
                    log.warning("ignoring %s: a JSON object without conversations/messages (metadata?); "
                                "name the file explicitly to read it as a record", f)
                    self.ignored_files.append(str(f))
                    continue
                records = _json_records(f, data)
            stem_env = env_from_filename(f)
            for i, raw in enumerate(records):
                if self.limit is not None and i >= self.limit:
                    break
                raw.fallback_env = stem_env
                yield raw


class HubDataset(RecordSource):
    """Records from a `datasets` dataset: a Hub name (`AgentGym/AgentTraj-L`) or a local dataset folder.

    Everything goes through `datasets.load_dataset(name, split=..., data_files=..., revision=...)`, so a
    local folder in the Hub layout (`data/train-00000-of-00001.parquet`, or JSON files) reads exactly as
    the Hub copy would. Typed columns are fine: a field missing from some rows comes back as null, and
    null `loss`/`weight`/`env`/`id` mean "absent" to the converters.

    Rows without an id get `<last part of name>_<n>`. A failure to load (offline, unknown name or split)
    is a ConfigError naming the dataset.
    """

    def __init__(self, name: str, split: str = "train", data_files: str | list[str] | dict | None = None,
                 revision: str | None = None, format: str = "auto", env: str | None = None,
                 messages_key: str | None = None, limit: int | None = None, cache_dir: str | None = None,
                 **options: Any):
        super().__init__(format=format, env=env, messages_key=messages_key, limit=limit, **options)
        if not isinstance(name, str) or not name:
            raise ConfigError(f"HubDataset: name={name!r}: expected a dataset name or folder")
        self.name = name
        self.split = split
        self.data_files = _plain(data_files)
        self.revision = revision
        self.cache_dir = cache_dir

    def describe(self) -> str:
        return f"HubDataset({self.name}, split={self.split})"

    def fingerprint(self) -> str:
        """The options, plus the files' contents when `name` is a local folder (a Hub revision pins the rest)."""
        parts: list[Any] = [self.name, self.split, self.data_files, self.revision, self._options()]
        if Path(self.name).is_dir():
            root = Path(self.name)
            parts.append([(f.relative_to(root).as_posix(), file_fingerprint(f))
                          for f in sorted(root.rglob("*")) if f.is_file()
                          and not any(p.startswith(".") for p in f.relative_to(root).parts)])
        return fingerprint(*parts)

    def load(self):
        import datasets

        kwargs: dict[str, Any] = {"split": self.split}
        if self.data_files is not None:
            kwargs["data_files"] = self.data_files
        if self.revision is not None:
            kwargs["revision"] = self.revision
        if self.cache_dir is not None:
            kwargs["cache_dir"] = self.cache_dir
        try:
            return datasets.load_dataset(self.name, **kwargs)
        except Exception as e:  # noqa: BLE001 - offline, unknown name/split, bad files: all user-fixable
            raise ConfigError(f"{self.describe()}: could not load the dataset: {type(e).__name__}: {e}") from None

    def iter_records(self) -> Iterator[RawRecord]:
        ds = self.load()
        if self.limit is not None and self.limit < len(ds):
            ds = ds.select(range(self.limit))
        base = Path(self.name.rstrip("/")).name or "record"
        for i, row in enumerate(ds, 1):
            yield RawRecord(where=f"{self.name}[{self.split}]#{i}", data=row, default_id=f"{base}_{i}")


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
    for src in sources:
        if isinstance(src, (str, os.PathLike)):
            src = LocalFiles(str(src))
        name = src.describe() if hasattr(src, "describe") else type(src).__name__
        n_read = n_loaded = n_skipped = 0
        first_skip: SkippedRecord | None = None
        bar = tqdm(desc=name, unit=" rec", disable=None if progress else True, leave=False)
        try:
            if hasattr(src, "iter_records"):
                for raw in src.iter_records():
                    n_read += 1
                    bar.update()
                    try:
                        traj = src.convert(raw)
                    except DataError as e:
                        if on_error == "error":
                            raise
                        n_skipped += 1
                        result.skipped.append(SkippedRecord(where=e.source or raw.where, field=e.field, reason=e.reason))
                        first_skip = first_skip or result.skipped[-1]
                        continue
                    _check(traj, result.warnings)
                    result.trajectories.append(traj)
                    n_loaded += 1
            elif hasattr(src, "iter_trajectories"):
                for traj in src.iter_trajectories():
                    n_read += 1
                    n_loaded += 1
                    bar.update()
                    _check(traj, result.warnings)
                    result.trajectories.append(traj)
            else:
                raise ConfigError(f"data source {src!r} has neither iter_records() nor iter_trajectories()")
        finally:
            bar.close()
        result.n_read += n_read
        entry = {"source": name, "n_read": n_read, "n_loaded": n_loaded, "n_skipped": n_skipped}
        for key in ("unread_files", "ignored_files"):
            if getattr(src, key, None):
                entry[key] = list(getattr(src, key))
        result.per_source.append(entry)
        log.info("%s: %d records read, %d trajectories, %d skipped", name, n_read, n_loaded, n_skipped)
        if n_loaded == 0:
            raise ConfigError(f"data source {name} gave no trajectory: {_why_empty(entry, first_skip)}")
    if result.skipped:
        first = "; ".join(
            f"{s.where}{f' [{s.field}]' if s.field else ''}: {s.reason}" for s in result.skipped[:log_first]
        )
        log.warning("skipped %d of %d records (data.on_error=skip); first: %s", result.n_skipped, result.n_read, first)
    for kind, what in (("long_turns", f"a turn longer than {LONG_TURN_CHARS:,} characters"),
                       ("assistant_first", "a first turn by the assistant (no task or observation before its first step)")):
        hits = result.warnings[kind]
        if hits:
            log.warning("%d trajectories have %s (kept): %s%s", len(hits), what, "; ".join(hits[:log_first]),
                        " ..." if len(hits) > log_first else "")
    return result


def _check(traj: Trajectory, warnings: dict[str, list[str]]) -> None:
    where = traj.source or traj.id
    long = [(i, len(m.content)) for i, m in enumerate(traj.messages) if len(m.content) > LONG_TURN_CHARS]
    if long:
        i, n = long[0]
        warnings["long_turns"].append(f"{where} (turn {i}: {n:,} characters)")
    if traj.messages[0].role == "assistant":
        warnings["assistant_first"].append(where)


def _why_empty(entry: dict[str, Any], first_skip: SkippedRecord | None) -> str:
    if entry["n_read"] == 0:
        files = entry.get("unread_files", []) + entry.get("ignored_files", [])
        listed = f": not read: {', '.join(files[:WARN_FIRST])}{' ...' if len(files) > WARN_FIRST else ''}" if files else ""
        return f"it holds no record (empty files or an empty JSON array){listed}"
    s = first_skip
    first = f"; first: {s.where}{f' [{s.field}]' if s.field else ''}: {s.reason}" if s else ""
    return f"all {entry['n_read']} of its records are bad and were skipped (data.on_error=skip){first}"


# --- file readers: each yields RawRecords, turning decode failures into error records -----------------


_BOM = b"\xef\xbb\xbf"


def _stem(path: Path) -> str:
    return path.name.split(".", 1)[0]


def _is_empty(path: Path) -> bool:
    """Empty, or only whitespace (and a byte-order mark): nothing to read. Large files are not scanned."""
    try:
        size = path.stat().st_size
        if size > 4096:
            return False
        return not path.read_bytes().replace(_BOM, b"").strip()
    except OSError:
        return False


def _read_jsonl(path: Path) -> Iterator[RawRecord]:
    stem = _stem(path)
    with path.open("rb") as f:
        for lineno, line in enumerate(f, 1):
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


def _load_json(path: Path) -> Any:
    """The decoded file, or a DataError (not raised) naming the line of a syntax error."""
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as e:
        return DataError(f"not UTF-8 text: {e.reason}", source=str(path))
    except json.JSONDecodeError as e:
        return DataError(f"invalid JSON: {e.msg} (column {e.colno})", source=f"{path}:{e.lineno}")


def _json_records(path: Path, data: Any) -> Iterator[RawRecord]:
    if isinstance(data, DataError):
        yield RawRecord(data.source or str(path), error=data)
        return
    stem = _stem(path)
    if isinstance(data, list) and not (data and all(isinstance(m, dict) and "role" in m for m in data)):
        for i, rec in enumerate(data, 1):
            yield RawRecord(f"{path}#{i}", data=rec, default_id=f"{stem}_{i}")
    else:
        yield RawRecord(f"{path}#1", data=data, default_id=f"{stem}_1")


def _read_parquet(path: Path) -> Iterator[RawRecord]:
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


def _plain(v: Any) -> Any:
    """OmegaConf containers -> plain dict/list/str, as `datasets` expects."""
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, Iterable):
        return [_plain(x) for x in v]
    return v
