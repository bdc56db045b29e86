"""Which converter a record needs, and the one call that converts it: `detect_format` (for `format=auto`)
and `convert_record`, what a data source calls per record."""

from __future__ import annotations

from typing import Any

from atlas_exp.data.importers.chat import from_agentgym, from_generic, from_openai
from atlas_exp.data.importers.options import ChatFields, ImportOptions, check_format
from atlas_exp.data.importers.pairs import from_pairs, looks_like_pair
from atlas_exp.data.importers.records import type_name
from atlas_exp.data.importers.transcript import from_transcript
from atlas_exp.data.trajectory import Trajectory
from atlas_exp.errors import DataError


def detect_format(record: Any, *, where: str, messages_key: str | None = None) -> str:
    """Which converter a record needs (see the package docstring); a DataError when none fits.

    Typed tables (parquet, `datasets`) give every row every column, so a column only counts when it is
    not null in this row.
    """
    if isinstance(record, list):
        return "generic"
    if isinstance(record, dict):
        for key in (messages_key, "conversations", "messages"):
            if key and record.get(key) is not None:
                return "generic"
        if looks_like_pair(record):
            return "pairs"
        looked = f"`{messages_key}`, " if messages_key else ""
        raise DataError(
            f"cannot tell the record's format: expected {looked}`conversations` or `messages` (a list of turns), "
            f"or input/output fields; found fields {sorted(record)[:10]}. Set data.messages_key to the field "
            "holding the turns, or data.format=transcript|pairs",
            source=where,
        )
    raise DataError(f"expected a JSON object or a list of messages, got {type_name(record)}", source=where)


def convert_record(
    record: Any,
    *,
    where: str,
    format: str = "auto",
    default_id: str | None = None,
    default_env: str | None = None,
    fallback_env: str | None = None,
    messages_key: str | None = None,
    options: ImportOptions | None = None,
) -> Trajectory:
    """Convert one record with the named (or detected) format; see the package docstring for the rules."""
    if options is None:
        options = ImportOptions(format=check_format(format), chat=ChatFields(messages_key=messages_key))
    fmt = options.format
    chat = options.chat
    if fmt == "auto":
        fmt = detect_format(record, where=where, messages_key=chat.messages_key)
    origin = dict(where=where, default_id=default_id, default_env=default_env, fallback_env=fallback_env)
    if fmt == "agentgym":
        return from_agentgym(record, fields=chat, **origin)
    if fmt == "openai":
        return from_openai(record, fields=chat, **origin)
    if fmt == "transcript":
        return from_transcript(record, options=options.transcript, **origin)
    if fmt == "pairs":
        return from_pairs(record, options=options.pairs, **origin)
    return from_generic(record, fields=chat, **origin)
