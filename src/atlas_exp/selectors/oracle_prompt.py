"""The judge's prompt and the checking of its reply, for `selector=oracle` (ATLaS, arXiv 2503.02197).

The paper has a strong LLM (GPT-4o) read a whole expert trajectory and name its critical steps under four
criteria: Plan Creation, Critical Observation, Critical Action and Self Correction. The wording below is
ours; what is kept from the paper is the procedure: the judge sees every turn (observations too, since a
step is often critical *because of* what it reacts to), first writes a short plan of the task's
sub-goals (so its picks are anchored to the task's structure rather than to surface cues), then returns
at most `cap` critical steps, most critical first, each with a category and a one-line reason.

Everything the judge says is checked here before it reaches a selection: a reply we cannot trust is
rejected with a message that names what is wrong (`InvalidReply`), and the selector retries with that
message shown to the judge. The one rule we fix ourselves instead of rejecting is the cap: a judge that
names too many steps has still ranked them, so we keep its first `cap` picks.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from atlas_exp.data.trajectory import Trajectory

#: the paper's four criteria, in its order; the names are the categories the judge must use
CATEGORIES: dict[str, str] = {
    "Plan Creation": (
        "the agent lays out how it will solve the task: it breaks the goal into sub-goals or fixes the "
        "order of the work, based on what it has observed so far."
    ),
    "Critical Observation": (
        "the agent picks out (or recalls from earlier) a piece of information from the environment that "
        "decides what it should do next, e.g. a missing ingredient, an error message, the item it needs."
    ),
    "Critical Action": (
        "an action that decisively moves the task toward success; without it (or with a different one) "
        "the task would fail or stall."
    ),
    "Self Correction": (
        "the agent notices that something went wrong (a failed action, a wrong assumption, an unexpected "
        "result) and changes course."
    ),
}

#: a reason is meant to be one line; longer ones are cut so selection.jsonl stays readable
MAX_REASON_CHARS = 300
#: a "short plan"; bounded in the constrained schema so a small judge cannot spend max_tokens on it
MAX_PLAN_CHARS = 800


class InvalidReply(ValueError):
    """The judge's reply cannot be used as it is; the message says why (and is shown back to the judge)."""


def judge_cap(n_steps: int, ratio: float) -> int:
    """How many steps the judge may name: ceil(ratio * n), at least 1, at most n.

    The paper asks for *at most* a share of the steps, so this rounds up (the judge may name fewer);
    the tiny epsilon keeps float noise (0.1 * 30 = 3.0000000000000004) from adding a step.
    """
    if n_steps <= 0:
        return 0
    return max(1, min(n_steps, math.ceil(ratio * n_steps - 1e-9)))


# --------------------------------------------------------------------------------------------- prompt

SYSTEM_PROMPT = """\
You review trajectories of an AI agent that solved a task by talking to an environment. The agent's turns \
are numbered steps; between them you see the environment's observations. Your job is to find the critical \
steps: the few steps an agent most needs to learn in order to solve tasks like this one.

A step is critical if it fits one of these four categories:
{criteria}

Routine steps are not critical: repeating an action already taken, mechanical follow-ups fully determined \
by earlier steps, or steps that could be replaced by many other choices without changing the outcome.

Work in this order:
1. Read the whole trajectory.
2. Write a short plan: the task's sub-goals, in order, as the trajectory shows them.
3. Choose the critical steps, most critical first. For each give its step number, exactly one category \
from the list above, and a one-line reason.

Reply with one JSON object and nothing else, in exactly this form:
{{"plan": "<short plan with the sub-goals>", "critical_steps": [{{"step": <step number>, "category": "<category>", "reason": "<one line>"}}]}}
"""

USER_PROMPT = """\
Trajectory with {n} steps (numbered 0 to {last}):

{body}

Name at most {cap} critical step{s} (at least one), most critical first. Reply with the JSON object only."""

REPAIR_PROMPT = """\
Your reply could not be used (attempt {attempt}): {error}
Reply again with one JSON object only, {{"plan": "...", "critical_steps": [{{"step": <number>, "category": \
"<category>", "reason": "..."}}]}}, naming between 1 and {cap} distinct steps numbered 0 to {last}, with \
categories from: {categories}."""


def _clip(text: str, max_chars: int | None) -> str:
    """Keep the head and tail of a very long turn: both ends carry the meaning (task text, final state)."""
    if not max_chars or len(text) <= max_chars:
        return text
    head = max_chars * 2 // 3
    tail = max_chars - head
    return f"{text[:head]}\n... [{len(text) - max_chars} characters omitted] ...\n{text[-tail:]}"


def render_trajectory(traj: Trajectory, *, max_turn_chars: int | None = None) -> str:
    """All turns with explicit labels; only steps get numbers, so the judge cannot name a non-step.

    Non-trainable assistant turns (AgentTraj-L's "OK. I'll follow your instructions") are shown, since
    the dialogue reads oddly without them, but labelled as context.
    """
    parts = []
    for m in traj.messages:
        content = _clip(m.content.strip(), max_turn_chars)
        if m.role == "assistant":
            label = f"[Step {m.step}]" if m.is_step else "[Agent turn, context only, not a step]"
        elif m.role == "system":
            label = "[System]"
        else:
            label = "[Observation]"
        parts.append(f"{label}\n{content}")
    return "\n\n".join(parts)


def build_messages(traj: Trajectory, cap: int, *, max_turn_chars: int | None = None) -> list[dict[str, str]]:
    """The chat messages for one trajectory: fixed instructions (system) + the numbered trajectory (user).

    The system prompt does not depend on the trajectory, so servers with prefix caching reuse it.
    """
    criteria = "\n".join(f"- {name}: {desc}" for name, desc in CATEGORIES.items())
    n = traj.n_steps
    return [
        {"role": "system", "content": SYSTEM_PROMPT.format(criteria=criteria)},
        {
            "role": "user",
            "content": USER_PROMPT.format(
                n=n, last=n - 1, body=render_trajectory(traj, max_turn_chars=max_turn_chars), cap=cap,
                s="" if cap == 1 else "s",
            ),
        },
    ]


def repair_messages(
    messages: list[dict[str, str]], bad_reply: str, error: str, *, n_steps: int, cap: int, attempt: int = 1
) -> list[dict[str, str]]:
    """The original prompt plus the rejected reply and what was wrong with it.

    Repeating the same request at temperature 0 would return the same reply; showing the error changes
    the request (so a retry can succeed) and keeps it deterministic (so it is cacheable). Only the latest
    bad reply is included, so the conversation does not grow with each retry. The attempt number keeps
    two repairs of the same bad reply distinct, so the second is really asked, not served from the cache.
    """
    return [
        *messages,
        {"role": "assistant", "content": bad_reply if bad_reply.strip() else "(empty reply)"},
        {
            "role": "user",
            "content": REPAIR_PROMPT.format(
                attempt=attempt, error=error, cap=cap, last=n_steps - 1, categories=", ".join(CATEGORIES)
            ),
        },
    ]


def reply_schema(n_steps: int, cap: int, *, bounded: bool = True) -> dict[str, Any]:
    """JSON schema of a reply, for `response_format` (structured output / grammar-constrained decoding).

    `plan` comes first so that a constrained decoder writes the plan before it picks steps, as the paper
    asks. `bounded` adds the numeric and length limits (step range, 1..cap items, text lengths): llama.cpp turns them
    into its grammar, which keeps a small model from running on; servers that reject such keywords get
    the unbounded schema (the client falls back automatically) and we check the limits ourselves.
    """
    step: dict[str, Any] = {"type": "integer"}
    reason: dict[str, Any] = {"type": "string"}
    plan: dict[str, Any] = {"type": "string"}
    items: dict[str, Any] = {
        "type": "object",
        "properties": {
            "step": step,
            "category": {"type": "string", "enum": list(CATEGORIES)},
            "reason": reason,
        },
        "required": ["step", "category", "reason"],
        "additionalProperties": False,
    }
    array: dict[str, Any] = {"type": "array", "items": items}
    if bounded:
        step.update(minimum=0, maximum=max(0, n_steps - 1))
        array.update(minItems=1, maxItems=cap)
        reason.update(maxLength=MAX_REASON_CHARS)
        plan.update(maxLength=MAX_PLAN_CHARS)
    return {
        "type": "object",
        "properties": {"plan": plan, "critical_steps": array},
        "required": ["plan", "critical_steps"],
        "additionalProperties": False,
    }


# ---------------------------------------------------------------------------------------------- reply

_FENCE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\n?(.*?)```", re.DOTALL)


def extract_json(text: str) -> dict[str, Any]:
    """The reply's JSON object, wherever it is: the whole text, a ``` fenced block, or embedded in prose.

    Plain-text servers (no response_format) often wrap the object in a code fence or a sentence. Among
    several objects the first one with `critical_steps` wins (a model may echo an example first).
    """
    if not isinstance(text, str) or not text.strip():
        raise InvalidReply("the reply is empty")
    stripped = text.strip()
    candidates: list[Any] = []
    try:
        candidates.append(json.loads(stripped))
    except json.JSONDecodeError:
        pass
    for m in _FENCE.finditer(text):
        try:
            candidates.append(json.loads(m.group(1).strip()))
        except json.JSONDecodeError:
            pass
    if not any(isinstance(c, dict) and "critical_steps" in c for c in candidates):
        dec = json.JSONDecoder()
        for m in re.finditer(r"\{", text):
            try:
                obj, _ = dec.raw_decode(text, m.start())
            except json.JSONDecodeError:
                continue
            candidates.append(obj)
            if isinstance(obj, dict) and "critical_steps" in obj:
                break
    dicts = [c for c in candidates if isinstance(c, dict)]
    for c in dicts:
        if "critical_steps" in c:
            return c
    if dicts:
        return dicts[0]  # parse_reply then names the missing key
    raise InvalidReply("no JSON object found in the reply")


def normalize_category(value: Any) -> str | None:
    """Map 'self-correction', 'PLAN_CREATION', ' critical  action ' to the canonical name; None if unknown."""
    if not isinstance(value, str):
        return None
    key = " ".join(re.sub(r"[-_]", " ", value).split()).lower()
    for name in CATEGORIES:
        if name.lower() == key:
            return name
    return None


def _as_index(value: Any) -> int | None:
    """A step number as JSON may carry it: 3, 3.0 or "3"; anything else (bools, "step 3") is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


@dataclass
class Pick:
    """One critical step as the judge named it."""

    step: int
    category: str
    reason: str | None


@dataclass
class Verdict:
    """A checked reply: the judge's plan and its picks in its order, at most `cap` of them.

    `dropped` are valid picks beyond the cap, kept only to report how often the judge over-selects.
    """

    plan: str | None
    picks: list[Pick]
    dropped: list[Pick] = field(default_factory=list)


def parse_reply(text: str, *, n_steps: int, cap: int) -> Verdict:
    """Check a reply; raise InvalidReply naming the first problem.

    Rejected: no JSON object, no `critical_steps` list, an empty list, a step that is not an integer in
    0..n_steps-1, the same step twice, a category outside the four. Accepted and fixed: more than `cap`
    picks (we keep the judge's first `cap`), a plan given as a list of sub-goals (joined), multi-line
    or over-long reasons (flattened, cut).
    """
    obj = extract_json(text)
    raw = obj.get("critical_steps")
    if not isinstance(raw, list):
        raise InvalidReply('the JSON object has no "critical_steps" list')
    if not raw:
        raise InvalidReply('"critical_steps" is empty; name at least one step')
    picks: list[Pick] = []
    seen: set[int] = set()
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise InvalidReply(f"critical_steps[{i}] is not an object")
        k = _as_index(item.get("step"))
        if k is None:
            raise InvalidReply(f"critical_steps[{i}].step is {item.get('step')!r}, not a step number")
        if not 0 <= k < n_steps:
            raise InvalidReply(f"critical_steps[{i}].step is {k}, outside 0..{n_steps - 1}")
        if k in seen:
            raise InvalidReply(f"step {k} is named more than once")
        seen.add(k)
        cat = normalize_category(item.get("category"))
        if cat is None:
            raise InvalidReply(
                f"critical_steps[{i}].category is {item.get('category')!r}; use one of {', '.join(CATEGORIES)}"
            )
        reason = item.get("reason")
        if reason is not None:
            reason = " ".join(str(reason).split())[:MAX_REASON_CHARS] or None
        picks.append(Pick(step=k, category=cat, reason=reason))
    plan = obj.get("plan")
    if isinstance(plan, list):
        plan = "\n".join(str(p) for p in plan)
    elif plan is not None and not isinstance(plan, str):
        plan = json.dumps(plan, ensure_ascii=False)
    plan = plan.strip() if isinstance(plan, str) and plan.strip() else None
    return Verdict(plan=plan, picks=picks[:cap], dropped=picks[cap:])


def rank_scores(n_steps: int, picks: list[Pick]) -> list[float]:
    """Score per step: the judge's r-th pick (0-based) of m gets (m - r) / m, so 1.0 for the first and
    lower but > 0 for later ones; unpicked steps get 0.

    Higher means more critical, as the selection contract wants; `top_k` on these scores gives back the
    judge's own first picks, so a smaller ratio can be derived later without asking the judge again.
    """
    scores = [0.0] * n_steps
    m = len(picks)
    for r, p in enumerate(picks):
        scores[p.step] = (m - r) / m
    return scores
