"""Policies: what turns a batch of conversations into the agent's next replies.

The evaluation loop (`eval/rollout.py`) keeps many episodes in flight and asks the policy for all their
next turns at once, so a policy's one job is `generate(conversations) -> replies`, batched:

- `HFPolicy`: a transformers causal LM (the run's finetuned model by default: base + LoRA adapter, merged
  for speed, or the full finetuned weights), greedy by default, left-padded batched `generate`, each
  episode's keys/values kept between turns (`eval/prefix_cache.py`) so that a turn prefills only what it
  adds. Batching is what makes CPU evaluation of a 135M model bearable and GPU evaluation of an 8B model cheap.
- `VLLMPolicy` (`eval/vllm_policy.py`): the same model on an in-process vLLM engine, for GPU machines.
- `OpenAIPolicy`: any OpenAI-compatible chat endpoint (vLLM, llama.cpp, OpenAI), N requests in flight,
  with the oracle's client (retries with backoff, disk cache keyed by the prompt, token counts).

A conversation that no longer fits the model's context gets `NoReply("context_limit")`: the loop ends that
episode there (AgentGym's evaluation does the same), never with a silently truncated prompt. An endpoint
that fails after its retries gives `NoReply("no_reply")`, which ends only that episode.
"""

from __future__ import annotations

import inspect
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from atlas_exp.device import get_device, get_dtype
from atlas_exp.errors import ConfigError
from atlas_exp.eval.prefix_cache import PrefixCache, Row, layout

log = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class ModelSource:
    """Which weights `policy.model` names, resolved against the run: shared by the local policies.

    `run`: the run dir's trained model (a LoRA `adapter` over the base model, or full `weights` saved there);
    `base`: the untrained base model (the "no finetuning" row); anything else: a model folder or Hub name.
    """

    keyword: str
    spec: Any  # atlas_exp.models.ModelSpec of the run's base model
    cache_dir: str
    adapter: str | None = None
    weights: str | None = None
    tokenizer_dir: str | None = None

    @classmethod
    def resolve(cls, context: PolicyContext, model: str) -> "ModelSource":
        from atlas_exp.models import ModelSpec

        spec = ModelSpec.from_cfg(context.model_cfg)
        run_dir = Path(context.run_model_dir)
        if model == "run":
            tok_dir = str(run_dir) if (run_dir / "tokenizer_config.json").exists() else None
            if (run_dir / "adapter_config.json").exists():
                return cls(model, spec, context.cache_dir, adapter=str(run_dir), tokenizer_dir=tok_dir)
            if (run_dir / "config.json").exists():
                return cls(model, spec, context.cache_dir, weights=str(run_dir), tokenizer_dir=tok_dir)
            raise ConfigError(
                f"policy.model=run: no trained model in {run_dir} (run the train stage first, or set "
                "policy.model=base to evaluate the untrained base model)"
            )
        if model == "base":
            return cls(model, spec, context.cache_dir)
        return cls(model, spec, context.cache_dir, weights=model, tokenizer_dir=model)

    @property
    def base_path(self) -> str:
        """The base model as a folder `from_pretrained` (and vLLM) can load (GGUF converted once)."""
        from atlas_exp.models import materialize

        return materialize(self.spec, self.cache_dir)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.keyword, "base": self.spec.name}
        if self.adapter:
            out["adapter"] = self.adapter
        if self.weights:
            out["weights"] = self.weights
        return out

    def tokenizer(self):
        """The tokenizer the model was trained with, with a chat template (an error naming the option if none)."""
        from atlas_exp.models import load_tokenizer

        if self.tokenizer_dir is None:
            tok = load_tokenizer(self.spec, self.cache_dir)
        else:
            from transformers import AutoTokenizer

            try:
                tok = AutoTokenizer.from_pretrained(self.tokenizer_dir)
            except OSError as e:
                raise ConfigError(f"policy.model={self.keyword!r}: no tokenizer at {self.tokenizer_dir} ({e})") from None
            if self.spec.chat_template and self.keyword == "run":
                tok.chat_template = self.spec.chat_template
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
        if tok.chat_template is None:
            raise ConfigError(f"policy.model={self.keyword!r}: the tokenizer has no chat template; set model.chat_template")
        return tok


def encode_chat(tokenizer: Any, conversation: list[Message]) -> list[int]:
    """The prompt tokens of a conversation, ending with the assistant turn's header (as in training)."""
    ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # BatchEncoding in newer transformers
        ids = ids["input_ids"]
    return list(ids)


def stop_token_ids(tokenizer: Any, model: Any = None) -> list[int]:
    """The end-of-turn tokens: eos plus the template's own turn terminator when it differs (<|eot_id|>)."""
    ids = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for x in (tokenizer.eos_token_id, gen_eos):
        if isinstance(x, int):
            ids.add(x)
        elif isinstance(x, (list, tuple)):
            ids.update(int(i) for i in x)
    vocab = tokenizer.get_vocab()
    for tok in ("<|im_end|>", "<|eot_id|>", "<|end|>", "</s>"):
        if tok in vocab:
            ids.add(int(vocab[tok]))
    return sorted(ids)


class HFPolicy:
    """A local transformers model as the agent.

    `model`: `run` (the run dir's trained model: the adapter in `<run_dir>/model` over the base model, or
    the full weights saved there), `base` (the untrained base model: the "no finetuning" row), or a path /
    Hub name of any causal LM. `max_context` caps prompt + reply tokens (default: the model's own limit).
    `reuse_kv_cache` keeps each conversation's keys/values for its next turn, and `preallocate_kv_cache`
    decodes into a cache that grows in place instead of being copied per token (both exact: off only to
    measure them, and off by themselves for sliding-window or recurrent models). With reuse on,
    `separate_prefill` (auto: on a CPU) prefills each prompt of a batch alone when padding their new tokens
    to the longest would waste over a quarter of the prefill; the batch then decodes together.
    """

    name = "hf"
    reply_neutral = ("batch_size", "reuse_kv_cache", "preallocate_kv_cache", "separate_prefill")
    loads_base_model = True

    def __init__(
        self,
        *,
        context: PolicyContext,
        model: str = "run",
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_context: int | None = None,
        dtype: str = "auto",
        batch_size: int = 16,
        reuse_kv_cache: bool = True,
        preallocate_kv_cache: bool = True,
        separate_prefill: str | bool = "auto",
    ):
        import torch

        from atlas_exp.models import load_model

        if max_new_tokens < 1:
            raise ConfigError(f"policy.max_new_tokens must be >= 1, got {max_new_tokens}")
        if separate_prefill not in ("auto", True, False):
            raise ConfigError(f"policy.separate_prefill={separate_prefill!r}: auto, true or false")
        self.max_new_tokens = int(max_new_tokens)
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.batch_size = int(batch_size)
        self.device = get_device()
        torch_dtype = get_dtype(dtype, self.device, option="policy.dtype",
                                invalid="{option}={value!r} is not a torch dtype (auto | bfloat16 | float16 | float32)")
        src = ModelSource.resolve(context, model)
        self.source = src.describe()
        if src.adapter is not None:
            from peft import PeftModel

            base = load_model(src.spec, context.cache_dir, dtype=torch_dtype)
            # merged once: generation then runs at the base model's speed
            self.model = PeftModel.from_pretrained(base, src.adapter).merge_and_unload()
        elif src.weights is not None:
            from transformers import AutoModelForCausalLM

            try:
                self.model = AutoModelForCausalLM.from_pretrained(src.weights, dtype=torch_dtype)
            except OSError as e:
                what = f"the run's weights in {src.weights} do not load" if model == "run" else \
                    "not a run/base keyword, a model folder or a Hub name"
                raise ConfigError(f"policy.model={model!r}: {what} ({e})") from None
        else:
            self.model = load_model(src.spec, context.cache_dir, dtype=torch_dtype)
        self.tokenizer = src.tokenizer()
        self.tokenizer.padding_side = "left"
        self.model.to(self.device).eval()
        limit = getattr(self.model.config, "max_position_embeddings", None) or 4096
        self.max_context = int(min(max_context, limit) if max_context else limit)
        self.stop_ids = stop_token_ids(self.tokenizer, self.model)
        self.stats = {"calls": 0, "replies": 0, "prompt_tokens": 0, "completion_tokens": 0, "context_limit": 0,
                      "prefilled_alone": 0}
        # sliding-window / recurrent caches cannot be re-laid out row by row: those models prefill every turn
        plain = _plain_attention(self.model)
        self.prefix_cache = PrefixCache() if reuse_kv_cache and plain else None
        # decoding appends to a preallocated cache instead of concatenating (eval/kv_cache.py); same replies
        self.preallocate_kv_cache = bool(preallocate_kv_cache and plain)
        # on a CPU a prefill is compute-bound, so padding costs its full price; on a GPU it is nearly free
        self.separate_prefill = self.device == "cpu" if separate_prefill == "auto" else bool(separate_prefill)
        # transformers renamed `past_key_values` to `cache` during 5.x; use whichever this version's models take
        self._cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        torch.manual_seed(context.seed)

    def describe(self) -> dict[str, Any]:
        return {
            "policy": self.name,
            **self.source,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_context": self.max_context,
        }

    def encode(self, conversation: list[Message]) -> list[int]:
        return encode_chat(self.tokenizer, conversation)

    def generate(self, conversations: list[list[Message]]) -> list[str | NoReply]:
        out: list[str | NoReply] = [NoReply("context_limit", f"prompt + {self.max_new_tokens} new tokens > {self.max_context}")] * len(conversations)
        encoded = [(i, self.encode(c)) for i, c in enumerate(conversations)]
        fits = [(i, ids) for i, ids in encoded if len(ids) + self.max_new_tokens <= self.max_context]
        self.stats["context_limit"] += len(encoded) - len(fits)
        rows = [(i, self.prefix_cache.match(ids) if self.prefix_cache else Row(ids)) for i, ids in fits]
        if self.prefix_cache is not None and len(rows) > 1:
            # a prefix many prompts share (an env's instruction) is prefilled once, then matched like a kept one
            shared = self.prefix_cache.shared_prefixes([r for _, r in rows])
            for prefix in shared:
                self._prefill(prefix, self.prefix_cache.match(prefix))
            if shared:
                rows = [(i, self.prefix_cache.match(r.ids)) for i, r in rows]
        # similar amounts of new tokens together: less padding in each generate call
        rows.sort(key=lambda x: len(x[1].new))
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            if self._prefill_alone(chunk):
                # each prompt up to its last token is prefilled on its own, then matched: the batched call
                # below feeds one token a row, so no compute goes to padding the new parts to the longest
                for _, r in chunk:
                    if len(r.new) > 1:
                        self._prefill(r.ids[:-1], r)
                        self.stats["prefilled_alone"] += 1
                chunk = [(i, self.prefix_cache.match(r.ids)) for i, r in chunk]
            for (i, row), (reply, n) in zip(chunk, self._generate_chunk([r for _, r in chunk])):
                out[i] = reply
                self.stats["replies"] += 1
                self.stats["prompt_tokens"] += len(row.ids)
                self.stats["completion_tokens"] += n
        if self.prefix_cache is not None:
            self.prefix_cache.commit()
            self.stats.update(self.prefix_cache.stats)
        return out

    def _prefill_alone(self, chunk: list[tuple[int, Row]]) -> bool:
        """Whether padding this chunk's new tokens to the longest would cost over a quarter more compute."""
        if not self.separate_prefill or self.prefix_cache is None or len(chunk) < 2:
            return False
        new = [len(r.new) for _, r in chunk]
        return max(new) * len(new) > 1.25 * sum(new)

    def _prefill(self, ids: list[int], base: Row | None = None) -> None:
        """Run `ids` through the model alone and keep its keys/values for this call's matches; continue from
        `base`'s reused keys/values when given (then only `ids[base.reused:]` is computed)."""
        import torch
        from transformers import DynamicCache

        start = base.reused if base is not None and base.entry is not None else 0
        kw: dict[str, Any] = {}
        if start:
            kw[self._cache_kw] = DynamicCache([(k[:, :, :start], v[:, :, :start]) for k, v in base.entry.layers])
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([ids[start:]], device=self.device), use_cache=True,
                             logits_to_keep=1, **kw)
        self.prefix_cache.add_prefix(ids, getattr(out, self._cache_kw), base if start else None)

    def _generate_chunk(self, rows: list[Row]) -> list[tuple[str, int]]:
        """One batched `generate` for `rows`: (reply text, reply tokens) per row."""
        import torch
        from transformers import DynamicCache

        from atlas_exp.eval.kv_cache import GrowingCache

        pad = self.tokenizer.pad_token_id
        input_ids, mask, reused = (self.prefix_cache.layout if self.prefix_cache is not None else layout)(rows, pad)
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "pad_token_id": pad,
                                  "eos_token_id": self.stop_ids, "return_dict_in_generate": True}
        # the reused keys/values come from kept entries: already on the model's device
        if self.preallocate_kv_cache:
            kwargs[self._cache_kw] = GrowingCache(input_ids.shape[1] + self.max_new_tokens, reused)
        elif reused is not None:
            kwargs[self._cache_kw] = DynamicCache(reused)
        del reused  # the cache holds its own copy: one batch's keys/values less in memory while decoding
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with torch.inference_mode():
            gen = self.model.generate(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device), **kwargs)
        width = input_ids.shape[1]
        new = gen.sequences[:, width:].cpu()
        self.stats["calls"] += 1
        replies, kept = [], []
        for row in range(len(rows)):
            toks = new[row].tolist()
            n = len(toks)
            for k, t in enumerate(toks):
                if t in self.stop_ids:
                    n = k
                    break
            replies.append((self.tokenizer.decode(toks[:n], skip_special_tokens=True).strip(), n))
            kept.append(toks[:n + 1])  # the stop token too: the next prompt continues after it
        cache = getattr(gen, self._cache_kw, None)
        if self.prefix_cache is not None and cache is not None:
            self.prefix_cache.keep(cache, mask, rows, kept)
        return replies

    def close(self) -> None:
        self.model = None
        if self.prefix_cache is not None:
            self.prefix_cache.clear()


def _plain_attention(model: Any) -> bool:
    """Whether every layer's cache is a plain growing key/value cache (no sliding window, no recurrent state)."""
    cfg = model.config
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return False
    types = getattr(cfg, "layer_types", None)
    return not types or all(t == "full_attention" for t in types)


class OpenAIPolicy:
    """An OpenAI-compatible chat endpoint as the agent (vLLM, llama.cpp server, OpenAI).

    The key comes from `$api_key_env` and is never stored. Replies are cached on disk by prompt (under
    `cache_path`), so a crashed evaluation resumed with the same endpoint and decoding replays for free.
    """

    name = "openai"
    reply_neutral = ("concurrency", "cache_path")
    loads_base_model = False

    def __init__(
        self,
        *,
        context: PolicyContext,
        model: str,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        temperature: float = 0.0,
        max_new_tokens: int = 256,
        timeout: float = 120.0,
        max_retries: int = 4,
        concurrency: int = 8,
        cache_path: str | None = None,
        prices: dict[str, Any] | None = None,
    ):
        from atlas_exp.llm.client import ChatClient

        api_key = os.environ.get(api_key_env)
        if not api_key and not base_url:
            raise ConfigError(
                f"policy=openai needs policy.base_url (a local vLLM / llama.cpp server) or an API key in ${api_key_env}"
            )
        self.model_name = str(model)
        self.base_url = base_url
        self.concurrency = max(1, int(concurrency))
        self.client = ChatClient(
            model=self.model_name, base_url=base_url, api_key=api_key, api_key_env=api_key_env,
            temperature=float(temperature), max_tokens=int(max_new_tokens), timeout=float(timeout),
            max_retries=int(max_retries), response_format="none", seed=context.seed, prices=prices or {},
            cache_path=cache_path, option="policy",
        )
        self.max_new_tokens = int(max_new_tokens)
        self.temperature = float(temperature)
        self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="policy")

    @property
    def stats(self) -> dict[str, Any]:
        return self.client.stats.as_dict()

    def describe(self) -> dict[str, Any]:
        return {"policy": self.name, "model": self.model_name, "base_url": self.base_url,
                "max_new_tokens": self.max_new_tokens, "temperature": self.temperature}

    def _one(self, conversation: list[Message]) -> str | NoReply:
        from atlas_exp.llm.client import LLMError

        try:
            return self.client.chat(conversation).text.strip()
        except LLMError as e:
            # a reply that cannot be had ends the episode (counted), it does not stop the evaluation
            log.warning("policy: no reply (%s)", e)
            return NoReply("no_reply", str(e))

    def generate(self, conversations: list[list[Message]]) -> list[str | NoReply]:
        return list(self._pool.map(self._one, conversations))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.client.close()
