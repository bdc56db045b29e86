"""What a policy is, to the rollout loop and the eval stage: the `Policy` protocol (batched next-turn
generation), `NoReply` (why a conversation got none: the loop ends that episode with it), and the
`PolicyContext` the eval stage builds policies with. The policies themselves: `eval/policy.py` (HF,
OpenAI-compatible endpoint), `eval/vllm_policy.py`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

Message = dict[str, str]


@dataclass(frozen=True)
class NoReply:
    """Why a conversation got no reply; the loop ends its episode with `reason` as the end cause."""

    reason: str
    detail: str = ""


@dataclass(frozen=True)
class PolicyContext:
    """What the eval stage knows that a policy may need: the run's model and where models are cached."""

    #: the run's base model config (`cfg.model`, resolved): name_or_path, gguf_file, chat_template, ...
    model_cfg: dict[str, Any]
    #: `<run_dir>/model`: the training stage's output (a LoRA adapter or full weights); may not exist
    run_model_dir: Path
    cache_dir: str
    seed: int = 0


@runtime_checkable
class Policy(Protocol):
    """Batched next-turn generation. `generate` returns one reply per conversation, NoReply where it cannot.

    Two class attributes tell the eval stage what identifies the agent (its resume fingerprint), next to the
    options they are about: `reply_neutral` names the options that change how replies are computed (batching,
    caching, device placement) but not what they are, so changing them keeps the episodes already played;
    `loads_base_model` says that `model: run | base` loads `cfg.model`'s weights (then the base model is part
    of the agent). A policy class without them has neither.
    """

    name: str
    reply_neutral: ClassVar[tuple[str, ...]]
    loads_base_model: ClassVar[bool]

    def generate(self, conversations: list[list[Message]]) -> list[str | NoReply]: ...

    def describe(self) -> dict[str, Any]:
        """What produced the replies (model, adapter, decoding), for results.json and its fingerprint."""
        ...

    def close(self) -> None: ...
