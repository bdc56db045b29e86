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

The modules, imports pointing down: `base` (RawRecord, RecordSource), `files` (decoding JSONL/JSON/parquet),
`local` (LocalFiles) and `hub` (HubDataset), `load` (load_trajectories, LoadResult) on top. This package
only gathers their public names (the configs' `_target_: atlas_exp.data.sources.LocalFiles` among them).
"""

from atlas_exp.data.sources.base import WARN_FIRST, RawRecord, RecordSource
from atlas_exp.data.sources.hub import HubDataset
from atlas_exp.data.sources.load import LONG_TURN_CHARS, ON_ERROR, LoadResult, SkippedRecord, load_trajectories
from atlas_exp.data.sources.local import EXTENSIONS, LocalFiles

__all__ = [
    "EXTENSIONS",
    "LONG_TURN_CHARS",
    "ON_ERROR",
    "WARN_FIRST",
    "HubDataset",
    "LoadResult",
    "LocalFiles",
    "RawRecord",
    "RecordSource",
    "SkippedRecord",
    "load_trajectories",
]
