"""Records from local files or folders (`data=local`): which files a list of paths, folders and glob
patterns names, in a fixed order, what a folder holds besides (metadata, other extensions, empty files:
warned about, not read), and the fingerprint of their contents for stage caching. Decoding each file is
`files`' business."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from atlas_exp.artifacts import file_fingerprint, fingerprint
from atlas_exp.data.importers import env_from_filename, looks_like_pair
from atlas_exp.data.sources.base import WARN_FIRST, RawRecord, RecordSource
from atlas_exp.data.sources.files import is_empty, json_records, load_json, read_jsonl, read_parquet
from atlas_exp.errors import ConfigError

log = logging.getLogger(__name__)

#: file kinds `LocalFiles` reads (lower-case suffixes); other files inside a folder are listed in a warning
EXTENSIONS = (".jsonl", ".json", ".parquet")


class _Found(NamedTuple):
    """A file to read."""

    path: Path
    #: found by a folder search, not named by the config: a metadata `.json` there is passed over, not an error
    by_folder: bool


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
        self.paths = [str(path) for path in paths]
        if not self.paths:
            raise ConfigError("LocalFiles: paths is empty")
        self.ignored_files: list[str] = []
        self.unread_files: list[str] = []

    def describe(self) -> str:
        return f"LocalFiles({', '.join(self.paths)})"

    def files(self) -> list[Path]:
        """The files to read, in reading order."""
        return [found.path for found in self._files()]

    def _files(self) -> list[_Found]:
        """The files to read, in reading order; `unread_files` gets what folders hold besides."""
        out: list[_Found] = []
        seen: set[Path] = set()
        unread: list[str] = []
        for given in self.paths:
            path = Path(given).expanduser()
            if any(char in given for char in "*?["):
                anchor = Path(path.anchor) if path.is_absolute() else Path(".")
                pattern = str(path.relative_to(anchor)) if path.is_absolute() else str(path)
                found = [_Found(file, False) for file in sorted(anchor.glob(pattern))
                         if file.is_file() and file.suffix in EXTENSIONS]
                if not found:
                    raise ConfigError(f"data source pattern {given} matches no {'/'.join(EXTENSIONS)} file")
            elif path.is_dir():
                visible = [
                    file for file in sorted(path.rglob("*"), key=lambda file: file.relative_to(path).as_posix())
                    if file.is_file() and not any(part.startswith(".") for part in file.relative_to(path).parts)
                ]
                found = [_Found(file, True) for file in visible if file.suffix in EXTENSIONS]
                unread += [str(file) for file in visible if file.suffix not in EXTENSIONS]
                if not found:
                    hint = f" (it holds {', '.join(Path(name).name for name in unread[:5])}: upper-case or other " \
                           "extensions are not read)" if unread else ""
                    raise ConfigError(f"data source folder {path} holds no {'/'.join(EXTENSIONS)} file{hint}")
            elif path.is_file():
                if path.suffix not in EXTENSIONS:
                    raise ConfigError(f"data source file {path}: unsupported type {path.suffix!r} "
                                      f"(expected {', '.join(EXTENSIONS)})")
                found = [_Found(path, False)]
            else:
                raise ConfigError(f"data source path {path} does not exist")
            for file in found:
                key = file.path.resolve()
                if key not in seen:
                    seen.add(key)
                    out.append(file)
        self.unread_files = unread
        return out

    def fingerprint(self) -> str:
        """Changes when any file's content or a reading option changes (for stage caching)."""
        return fingerprint(self._options(), [(str(file), file_fingerprint(file)) for file in self.files()])

    def iter_records(self) -> Iterator[RawRecord]:
        self.ignored_files = []
        files = self._files()
        empty = {found.path for found in files if is_empty(found.path)}
        why = [f"{name} (not {'/'.join(EXTENSIONS)})" for name in self.unread_files] + \
              [f"{found.path} (empty)" for found in files if found.path in empty]
        self.unread_files += [str(found.path) for found in files if found.path in empty]
        if why:
            more = f"; and {len(why) - WARN_FIRST} more (data_summary.json lists them)" if len(why) > WARN_FIRST else ""
            log.warning("%s: not reading %d file(s): %s%s", self.describe(), len(why), "; ".join(why[:WARN_FIRST]), more)
        for file, by_folder in files:
            if file in empty:
                continue
            if file.suffix == ".jsonl":
                records = read_jsonl(file)
            elif file.suffix == ".parquet":
                records = read_parquet(file)
            else:
                data = load_json(file)
                if by_folder and self.format not in ("transcript", "pairs") and isinstance(data, dict) and not (
                    any(data.get(k) is not None for k in ("conversations", "messages", self.messages_key) if k)
                    or looks_like_pair(data)
                ):
                    log.warning("ignoring %s: a JSON object without conversations/messages (metadata?); "
                                "name the file explicitly to read it as a record", file)
                    self.ignored_files.append(str(file))
                    continue
                records = json_records(file, data)
            stem_env = env_from_filename(file)
            for i, raw in enumerate(records):
                if self.limit is not None and i >= self.limit:
                    break
                raw.fallback_env = stem_env
                yield raw
