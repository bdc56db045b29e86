"""Judge replies as files: the OpenAI Batch API format (also what vLLM's `run_batch` reads and writes).

Researchers judge thousands of trajectories through the Batch API (half price, no rate limits) or vLLM's
`run_batch`, so `selector=oracle` can write its requests as a batch input file and read the answers back
from output files instead of talking to an endpoint:

    request line: {"custom_id": "<trajectory id>@<fingerprint>", "method": "POST",
                   "url": "/v1/chat/completions", "body": {"model", "messages", "temperature", ...}}
    output line:  {"custom_id", "response": {"status_code": 200, "body": <chat completion>}, "error": null}

A reply must belong to its request, and a `custom_id` alone cannot say so: if the prompt wording, the judge
model or the trajectory changed since the file was made, the stored reply answers another question. So every
reply is indexed by the fingerprint of the request it answered (`request_fingerprint`: the body fields a
reply depends on), taken from the request line with the same `custom_id` in the batch's input file, or from
the fingerprint our own `custom_id`s carry after the `@`. The oracle looks replies up by the fingerprint of
the request it would send now; a trajectory whose id is in the files but whose request is not is reported as
"request changed", never used.

Which body fields a reply depends on: `model`, `messages`, `temperature`, `top_p` and `seed`. Not
`max_tokens` (a reply cut short fails validation anyway) nor `response_format` (a constrained or free-form
reply is parsed and checked the same way), so a file made with other values for those still matches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atlas_exp.artifacts import atomic_open
from atlas_exp.errors import ConfigError, DataError

log = logging.getLogger(__name__)

#: the request body fields that decide what the judge answers (see the module docstring)
REPLY_FIELDS = ("model", "messages", "temperature", "top_p", "seed")
#: hex digits of the fingerprint kept in our custom_ids and used as the index key (64 bits)
FP_CHARS = 16
CHAT_URL = "/v1/chat/completions"
_CUSTOM_ID = re.compile(rf"^(?P<id>.+)@(?P<fp>[0-9a-f]{{{FP_CHARS}}})$")

#: why a trajectory has no usable reply in the files (keys of `BatchIndex.status`)
MISSING, ERRORED, CHANGED, UNVERIFIED = "missing", "errored", "request changed", "unverified"


def request_fingerprint(body: dict[str, Any]) -> str:
    """sha256 (first FP_CHARS hex) over the body fields a reply depends on.

    >>> a = request_fingerprint({"model": "gpt-4o", "temperature": 0, "messages": [{"role": "user", "content": "hi"}]})
    >>> a == request_fingerprint({"model": "gpt-4o", "temperature": 0.0, "max_tokens": 9,
    ...                           "messages": [{"role": "user", "content": "hi"}]})
    True
    >>> a == request_fingerprint({"model": "gpt-4o", "temperature": 0, "messages": [{"role": "user", "content": "hi!"}]})
    False
    """
    key: dict[str, Any] = {}
    for name in REPLY_FIELDS:
        value = body.get(name)
        if value is None:
            continue
        if name in ("temperature", "top_p"):
            value = float(value)  # 0 and 0.0 ask the same thing
        elif name == "messages":
            value = [{"role": m.get("role"), "content": m.get("content")} for m in value]
        key[name] = value
    blob = json.dumps(key, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:FP_CHARS]


def custom_id(traj_id: str, fp: str) -> str:
    """Our custom_id: the trajectory id and the request's fingerprint, so an output file verifies alone."""
    return f"{traj_id}@{fp}"


def split_custom_id(cid: str) -> tuple[str, str | None]:
    """(trajectory id, fingerprint or None) of a custom_id: ours carry `@<fingerprint>`, others are plain ids.

    >>> split_custom_id("textcraft_3@0123456789abcdef")
    ('textcraft_3', '0123456789abcdef')
    >>> split_custom_id("textcraft_3")
    ('textcraft_3', None)
    """
    m = _CUSTOM_ID.match(cid)
    return (m["id"], m["fp"]) if m else (cid, None)


@dataclass
class BatchReply:
    """One answered request read from an output file."""

    custom_id: str
    text: str
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    where: str


@dataclass
class BatchIndex:
    """Every usable reply of some output files by request fingerprint, and why other lines are not usable.

    `status[trajectory id]` holds the reasons its lines could not be used (errored, request changed,
    unverified), so a trajectory without a reply can be reported as precisely as the files allow.
    """

    replies: dict[str, BatchReply] = field(default_factory=dict)
    status: dict[str, list[str]] = field(default_factory=dict)
    #: trajectory id -> where its usable replies are (to tell "request changed" from "missing")
    answered: dict[str, list[str]] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)

    def get(self, fp: str) -> BatchReply | None:
        return self.replies.get(fp)

    def why_missing(self, traj_id: str, *, repair: bool = False) -> tuple[str, str]:
        """(kind, message) for a trajectory whose current request (first or `repair`) has no reply in the files."""
        if repair:
            return MISSING, "not judged: the repair request is not in the batch output"
        if traj_id in self.answered:
            return CHANGED, (
                f"not judged: request changed ({self.answered[traj_id][0]} answers another prompt, judge "
                "model, trajectory or cap than the request made now)"
            )
        reasons = self.status.get(traj_id)
        if not reasons:
            return MISSING, "not judged: missing from the batch output"
        kind = ERRORED if any(r.startswith(ERRORED) for r in reasons) else UNVERIFIED
        return kind, f"not judged: {reasons[-1]}"


def _read_lines(path: Path, option: str) -> Iterable[tuple[int, Any]]:
    if not path.is_file():
        raise ConfigError(f"{option}: {path} is not a file")
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                yield n, DataError(f"not JSON ({e.msg})", source=f"{path}:{n}")


def sibling_input(output: Path) -> Path | None:
    """The batch input file beside an output file: `x.batch_output.jsonl` -> `x.batch_input.jsonl`
    (OpenAI's downloads `batch_<id>_output.jsonl` -> `batch_<id>_input.jsonl`); None if there is none."""
    name = output.name
    i = name.rfind("output")
    if i < 0:
        return None
    cand = output.with_name(name[:i] + "input" + name[i + len("output"):])
    return cand if cand.is_file() else None


def read_requests(paths: Sequence[Path], option: str) -> dict[str, str]:
    """custom_id -> request fingerprint, from batch input files (a malformed line is an error naming it)."""
    out: dict[str, str] = {}
    for path in paths:
        for n, rec in _read_lines(path, option):
            where = f"{path}:{n}"
            if isinstance(rec, DataError):
                raise rec
            if not isinstance(rec, dict) or not isinstance(rec.get("custom_id"), str):
                raise DataError("a batch request line needs a string custom_id", source=where, field="custom_id")
            body = rec.get("body")
            if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
                raise DataError("a batch request line needs body.messages", source=where, field="body.messages")
            out[rec["custom_id"]] = request_fingerprint(body)
    return out


def _completion(body: Any) -> tuple[str, str | None, int | None, int | None]:
    """(text, finish_reason, prompt tokens, completion tokens) of a chat completion body; ValueError if it
    is not one."""
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ValueError("response.body has no choices")
    msg = choices[0].get("message") or {}
    text = msg.get("content") if isinstance(msg, dict) else None
    if not isinstance(text, str):
        raise ValueError("response.body.choices[0].message.content is not text")
    usage = body.get("usage") or {}
    p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
    return text, choices[0].get("finish_reason"), (int(p) if p is not None else None), (int(c) if c is not None else None)


def read_outputs(outputs: Sequence[str | Path], requests: Sequence[str | Path] = (), *, option: str = "selector.batch") -> BatchIndex:
    """Index the replies of batch output files by the fingerprint of the request each one answered.

    The request of a line is found in `requests` (input files) or the output file's sibling input file by
    `custom_id`, else in the fingerprint our own custom_ids carry. A line whose request cannot be known is
    `unverified` and not used: without its request we cannot tell that it answers the question asked now.
    """
    index = BatchIndex()
    given = [Path(p).expanduser() for p in requests]
    for p in outputs:
        path = Path(p).expanduser()
        inputs = list(given)
        sib = sibling_input(path)
        if sib is not None and sib not in inputs:
            inputs.append(sib)
        by_id = read_requests(inputs, f"{option}.requests")
        index.files.append(str(path))
        for n, rec in _read_lines(path, f"{option}.read"):
            where = f"{path}:{n}"
            if isinstance(rec, DataError) or not isinstance(rec, dict) or not isinstance(rec.get("custom_id"), str):
                index.counts["unreadable_lines"] += 1
                log.warning("%s: not a batch output line (no JSON object with a custom_id); ignored", where)
                continue
            cid = rec["custom_id"]
            traj_id, own_fp = split_custom_id(cid)
            fp = by_id.get(cid) or own_fp
            reasons = index.status.setdefault(traj_id, [])
            if fp is None:
                index.counts["unverified"] += 1
                reasons.append(f"{UNVERIFIED}: {where} has no request to check it against (give the batch input "
                               f"file as {option}.requests)")
                continue
            resp = rec.get("response") or {}
            status = resp.get("status_code") if isinstance(resp, dict) else None
            err = rec.get("error")
            if err or status != 200:
                index.counts["errored"] += 1
                msg = err.get("message") if isinstance(err, dict) else (err or f"HTTP {status}")
                reasons.append(f"{ERRORED}: {where}: {str(msg)[:200]}")
                continue
            try:
                text, finish, p_tok, c_tok = _completion(resp.get("body"))
            except ValueError as e:
                index.counts["errored"] += 1
                reasons.append(f"{ERRORED}: {where}: {e}")
                continue
            index.replies[fp] = BatchReply(cid, text, finish, p_tok, c_tok, where)
            index.answered.setdefault(traj_id, []).append(where)
            index.counts["replies"] += 1
    return index


def request_line(traj_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """One batch input line for a chat request body."""
    return {"custom_id": custom_id(traj_id, request_fingerprint(body)), "method": "POST", "url": CHAT_URL, "body": body}


def write_requests(path: str | Path, lines: Sequence[dict[str, Any]]) -> Path:
    """Write batch input lines atomically (a crash never leaves half a file to upload)."""
    out = Path(path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(out) as f:
        for line in lines:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    return out


def submit_hint(path: Path, n_requests: int, n_trajectories: int, n_done: int, model: str) -> str:
    """What to do with a written batch file, and how to read the answers back."""
    out = path.with_name(path.name.replace("input", "output")) if "input" in path.name else path.with_suffix(".output.jsonl")
    return (
        f"selector=oracle: wrote {n_requests} request(s) for {n_trajectories} trajectorie(s) without a usable "
        f"reply to {path} ({n_done} already judged). Submit it: OpenAI Batch API -> upload it with "
        f"purpose=batch and create a batch for endpoint {CHAT_URL} (completion_window 24h), then download the "
        f"output file; or vLLM -> python -m vllm.entrypoints.openai.run_batch -i {path} -o {out} --model "
        f"{model}. Then rerun with selector.batch.read=[{out}] (plus any earlier output files)."
    )
