"""ReAct-style text transcripts -> Trajectory (`format=transcript`): one text block per record, cut into the
task, the agent's turns (kept verbatim, markers included) and the observations between them, by line
markers (`Thought`/`Action` vs `Observation`) or by an action prefix (`> `). The options:
`TranscriptOptions`."""

from __future__ import annotations

import re
from itertools import groupby
from typing import Any, NamedTuple

from atlas_exp.data.importers.options import TranscriptOptions
from atlas_exp.data.importers.records import build_trajectory, expect_object, text_value
from atlas_exp.data.trajectory import Message, Trajectory
from atlas_exp.errors import DataError

# the text fields `auto` looks for, in order
_TRANSCRIPT_TEXTS = ("transcript", "trajectory", "text")


class Part(NamedTuple):
    """A stretch of transcript text: the agent's (a Thought/Action) or not (an observation)."""

    agent: bool
    text: str


def _marker_regex(opts: TranscriptOptions) -> re.Pattern[str]:
    words = "|".join(re.escape(w) for w in sorted(opts.agent_markers + opts.observation_markers, key=len, reverse=True))
    return re.compile(rf"^[ \t]*(?P<marker>{words})(?:[ \t]*\d+)?[ \t]*:", re.MULTILINE)


def from_transcript(record: Any, *, where: str, options: TranscriptOptions | None = None,
                    default_id: str | None = None, default_env: str | None = None,
                    fallback_env: str | None = None) -> Trajectory:
    """One text transcript -> user (task) / assistant (agent text) / user (observation) turns."""
    opts = options or TranscriptOptions()
    if isinstance(record, str):
        record = {"text": record}
    expect_object(record, where)
    key = opts.text_key or next((k for k in _TRANSCRIPT_TEXTS if isinstance(record.get(k), str)), None)
    if key is None:
        raise DataError(f"no transcript field: expected one of {', '.join(_TRANSCRIPT_TEXTS)}; found fields "
                        f"{sorted(record)[:10]}. Set data.transcript.text_key", source=where)
    if record.get(key) is None:
        raise DataError("missing field (data.transcript.text_key)", source=where, field=key)
    text = text_value(record[key], where, key, allow_empty=False)
    prefix = ""
    if opts.start_marker is not None:
        at = text.rfind(opts.start_marker)
        if at < 0:
            raise DataError(f"the start marker {opts.start_marker!r} does not occur (data.transcript.start_marker)",
                            source=where, field=key)
        prefix, text = text[:at], text[at:]
    if opts.action_prefix is not None:
        head, turns = _split_lines(text, opts)
        how = f"no line starts with the action prefix {opts.action_prefix!r} (data.transcript.action_prefix)"
    else:
        head, turns = _split_markers(text, opts)
        how = (f"no line starts with an agent marker ({', '.join(opts.agent_markers)}; data.transcript.agent_markers), "
               f"or set data.transcript.action_prefix for `> action` transcripts")
    if not turns:
        raise DataError(f"no agent turn: {how}", source=where, field=key)
    task = []
    if opts.prompt_key is not None:
        if record.get(opts.prompt_key) is None:
            raise DataError("missing field (data.transcript.prompt_key)", source=where, field=opts.prompt_key)
        task.append(text_value(record[opts.prompt_key], where, opts.prompt_key, allow_empty=False).strip())
    if opts.keep_prefix and prefix.strip():
        task.insert(0, prefix.strip())
    if head.strip():
        task.append(head.strip())
    messages = ([Message("user", "\n\n".join(task))] if task else []) + [
        Message("assistant" if turn.agent else "user", turn.text) for turn in turns]
    consumed = {key} | ({opts.prompt_key} if opts.prompt_key else set())
    return build_trajectory(messages, record, where=where, list_field=key, default_id=default_id,
                            default_env=default_env, fallback_env=fallback_env, consumed=consumed)


def _merge(parts: list[Part], sep: str) -> list[Part]:
    """Consecutive parts of the same kind (agent / observation) as one turn, stripped; empty ones dropped."""
    turns = [Part(agent, sep.join(part.text for part in run).strip())
             for agent, run in groupby(parts, key=lambda part: part.agent)]
    return [turn for turn in turns if turn.text]


def _split_markers(text: str, opts: TranscriptOptions) -> tuple[str, list[Part]]:
    """(the text before the first marker, the turns) of a transcript cut at its marker lines."""
    matches = list(_marker_regex(opts).finditer(text))
    if not any(m.group("marker") in opts.agent_markers for m in matches):
        return text, []
    head = text[: matches[0].start()]
    parts = [Part(m.group("marker") in opts.agent_markers, text[m.start(): nxt.start() if nxt else len(text)].strip("\n"))
             for m, nxt in zip(matches, matches[1:] + [None])]
    return head, _merge(parts, "\n")


def _split_lines(text: str, opts: TranscriptOptions) -> tuple[str, list[Part]]:
    """(the lines before the first action, the turns) of a transcript whose actions start with a prefix."""
    prefix = opts.action_prefix or ""
    lines = text.splitlines()
    first = next((i for i, line in enumerate(lines) if line.startswith(prefix)), None)
    if first is None:
        return text, []
    head = "\n".join(lines[:first])
    parts = [Part(line.startswith(prefix), line[len(prefix):] if line.startswith(prefix) and opts.strip_prefix else line)
             for line in lines[first:]]
    return head, _merge(parts, "\n")
