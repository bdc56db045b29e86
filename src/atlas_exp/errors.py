"""Errors that name what is wrong in the user's input, so a run never dies deep inside a library."""

from __future__ import annotations


class AtlasError(Exception):
    """Base class: a problem the user can fix (bad input, bad config, missing artifact)."""


class StageStopped(AtlasError):
    """A stage stopped on purpose, waiting for something outside the run (e.g. a Batch API file to be
    answered); the message says what to do next. Exit status 3, not an error."""


class ConfigError(AtlasError):
    """An option has a value we cannot use; the message names the option."""


class DataError(AtlasError):
    """A record that cannot be read as a trajectory.

    Carries where it came from (file, line or record number) and which field is at fault, so the
    message reads like `data/x.jsonl:17 [messages[3].content]: empty content`.
    """

    def __init__(self, message: str, *, source: str | None = None, field: str | None = None):
        self.reason = message
        self.source = source
        self.field = field
        where = source or "<input>"
        if field:
            where += f" [{field}]"
        super().__init__(f"{where}: {message}")


class TemplateError(AtlasError):
    """The model's chat template cannot give exact per-turn token spans."""
