"""Record -> Trajectory converters for the public formats expert trajectories come in.

Every converter raises a `DataError` naming where the record came from and its own field. Each format,
the field map and how the env is resolved: docs/data_formats.md#record-formats.

One module a concern, imports pointing down: `options` (the format and field options) and `records` (the
env and id rules, text fields, building the trajectory) at the bottom; one module per record family on
them (`chat`: lists of messages, AgentGym/ShareGPT, OpenAI and any field map; `transcript`; `pairs`);
`convert` (format detection and `convert_record`) on top. This package only gathers their public names.
"""

from atlas_exp.data.importers.chat import from_agentgym, from_generic, from_openai
from atlas_exp.data.importers.convert import convert_record, detect_format
from atlas_exp.data.importers.options import (
    DEFAULT_ROLES,
    FORMATS,
    MAPPED_ROLES,
    ChatFields,
    ImportOptions,
    PairOptions,
    TranscriptOptions,
    check_format,
)
from atlas_exp.data.importers.pairs import from_pairs, looks_like_pair
from atlas_exp.data.importers.records import env_from_filename, env_from_id, resolve_env
from atlas_exp.data.importers.transcript import from_transcript

__all__ = [
    "DEFAULT_ROLES",
    "FORMATS",
    "MAPPED_ROLES",
    "ChatFields",
    "ImportOptions",
    "PairOptions",
    "TranscriptOptions",
    "check_format",
    "convert_record",
    "detect_format",
    "env_from_filename",
    "env_from_id",
    "from_agentgym",
    "from_generic",
    "from_openai",
    "from_pairs",
    "from_transcript",
    "looks_like_pair",
    "resolve_env",
]
