"""What a data source is: the `RawRecord` a record source yields (a decoded record and where it came from,
or the error that kept it from decoding) and `RecordSource`, the base of the sources of records in the
formats `atlas_exp.data.importers` knows (its options become one `ImportOptions`; `convert` applies them).

A source offers either `iter_records()` plus `convert(raw)` (this base) or `iter_trajectories()` (sources
that generate data, e.g. the TextCraft expert); `load.load_trajectories` reads both kinds."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from atlas_exp.data.importers import (
    ChatFields,
    ImportOptions,
    PairOptions,
    TranscriptOptions,
    check_format,
    convert_record,
)
from atlas_exp.data.trajectory import Trajectory
from atlas_exp.errors import ConfigError, DataError

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
