"""Records from a `datasets` dataset (`data=agenttraj_l`): a Hub name or a local folder in the Hub layout,
loaded with `datasets.load_dataset`, one `RawRecord` a row."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from atlas_exp.artifacts import file_fingerprint, fingerprint
from atlas_exp.config import plain
from atlas_exp.data.sources.base import RawRecord, RecordSource
from atlas_exp.errors import ConfigError


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
        self.data_files = plain(data_files)
        self.revision = revision
        self.cache_dir = cache_dir

    def describe(self) -> str:
        return f"HubDataset({self.name}, split={self.split})"

    def fingerprint(self) -> str:
        """The options, plus the files' contents when `name` is a local folder (a Hub revision pins the rest)."""
        parts: list[Any] = [self.name, self.split, self.data_files, self.revision, self._options()]
        if Path(self.name).is_dir():
            root = Path(self.name)
            parts.append([(file.relative_to(root).as_posix(), file_fingerprint(file))
                          for file in sorted(root.rglob("*")) if file.is_file()
                          and not any(part.startswith(".") for part in file.relative_to(root).parts)])
        return fingerprint(*parts)

    def load(self):
        """The `datasets.Dataset` of the split (a ConfigError naming the dataset when it does not load)."""
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
        dataset = self.load()
        if self.limit is not None and self.limit < len(dataset):
            dataset = dataset.select(range(self.limit))
        base = Path(self.name.rstrip("/")).name or "record"
        for i, row in enumerate(dataset, 1):
            yield RawRecord(where=f"{self.name}[{self.split}]#{i}", data=row, default_id=f"{base}_{i}")

