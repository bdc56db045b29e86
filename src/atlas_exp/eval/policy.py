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

`eval/policy_base.py` says what a policy is (the protocol, NoReply, the context it is built with),
`eval/model_source.py` which local weights `policy.model` names (shared with `VLLMPolicy`); this module holds
the two policies `conf/policy/hf.yaml` and `openai.yaml` build.
"""

from __future__ import annotations

import inspect
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

from atlas_exp.device import get_device, get_dtype
from atlas_exp.errors import ConfigError
from atlas_exp.eval.model_source import ModelSource, encode_chat, stop_token_ids
from atlas_exp.eval.policy_base import Message, NoReply, PolicyContext
from atlas_exp.eval.prefix_cache import PrefixCache, Row, layout
from atlas_exp.llm.client import DEFAULT_API_KEY_ENV, DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT_S, ChatClient, LLMError

log = logging.getLogger(__name__)


class _Prompt(NamedTuple):
    """A conversation of a `generate` call that fits the context: its place in the call, its prompt row."""

    index: int
    row: Row


class _Generated(NamedTuple):
    """One reply of a batched `generate`: its text, and its token count (the stop token not counted)."""

    text: str
    n_tokens: int


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
        source = ModelSource.resolve(context, model)
        self.source = source.describe()
        if source.adapter is not None:
            from peft import PeftModel

            base = load_model(source.spec, context.cache_dir, dtype=torch_dtype)
            # merged once: generation then runs at the base model's speed
            self.model = PeftModel.from_pretrained(base, source.adapter).merge_and_unload()
        elif source.weights is not None:
            from transformers import AutoModelForCausalLM

            try:
                self.model = AutoModelForCausalLM.from_pretrained(source.weights, dtype=torch_dtype)
            except OSError as e:
                what = f"the run's weights in {source.weights} do not load" if model == "run" else \
                    "not a run/base keyword, a model folder or a Hub name"
                raise ConfigError(f"policy.model={model!r}: {what} ({e})") from None
        else:
            self.model = load_model(source.spec, context.cache_dir, dtype=torch_dtype)
        self.tokenizer = source.tokenizer()
        self.tokenizer.padding_side = "left"
        self.model.to(self.device).eval()
        limit = getattr(self.model.config, "max_position_embeddings", None) or 4096
        self.max_context = int(min(max_context, limit) if max_context else limit)
        self.stop_ids = stop_token_ids(self.tokenizer, self.model)
        self.stats = {"calls": 0, "replies": 0, "prompt_tokens": 0, "completion_tokens": 0, "context_limit": 0,
                      "prefilled_alone": 0}
        # sliding-window / recurrent caches cannot be re-laid out row by row: those models prefill every turn
        plain = _has_plain_attention(self.model)
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
        prompts = [_Prompt(i, self.prefix_cache.match(ids) if self.prefix_cache else Row(ids)) for i, ids in fits]
        if self.prefix_cache is not None and len(prompts) > 1:
            # a prefix many prompts share (an env's instruction) is prefilled once, then matched like a kept one
            shared = self.prefix_cache.shared_prefixes([prompt.row for prompt in prompts])
            for prefix in shared:
                self._prefill(prefix, self.prefix_cache.match(prefix))
            if shared:
                prompts = [self._rematch(prompt) for prompt in prompts]
        # similar amounts of new tokens together: less padding in each generate call
        prompts.sort(key=lambda prompt: len(prompt.row.new))
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start:start + self.batch_size]
            if self._prefill_alone(chunk):
                # each prompt up to its last token is prefilled on its own, then matched: the batched call
                # below feeds one token a row, so no compute goes to padding the new parts to the longest
                for prompt in chunk:
                    if len(prompt.row.new) > 1:
                        self._prefill(prompt.row.ids[:-1], prompt.row)
                        self.stats["prefilled_alone"] += 1
                chunk = [self._rematch(prompt) for prompt in chunk]
            for prompt, reply in zip(chunk, self._generate_chunk([prompt.row for prompt in chunk])):
                out[prompt.index] = reply.text
                self.stats["replies"] += 1
                self.stats["prompt_tokens"] += len(prompt.row.ids)
                self.stats["completion_tokens"] += reply.n_tokens
        if self.prefix_cache is not None:
            self.prefix_cache.commit()
            self.stats.update(self.prefix_cache.stats)
        return out

    def _rematch(self, prompt: _Prompt) -> _Prompt:
        """The prompt matched again against the kept keys/values (after prefills added some)."""
        return _Prompt(prompt.index, self.prefix_cache.match(prompt.row.ids))

    def _prefill_alone(self, chunk: list[_Prompt]) -> bool:
        """Whether padding this chunk's new tokens to the longest would cost over a quarter more compute."""
        if not self.separate_prefill or self.prefix_cache is None or len(chunk) < 2:
            return False
        new = [len(prompt.row.new) for prompt in chunk]
        return max(new) * len(new) > 1.25 * sum(new)

    def _prefill(self, ids: list[int], base: Row | None = None) -> None:
        """Run `ids` through the model alone and keep its keys/values for this call's matches; continue from
        `base`'s reused keys/values when given (then only `ids[base.reused:]` is computed)."""
        import torch
        from transformers import DynamicCache

        start = base.reused if base is not None and base.entry is not None else 0
        cache_kwargs: dict[str, Any] = {}
        if start:
            cache_kwargs[self._cache_kw] = DynamicCache([(keys[:, :, :start], values[:, :, :start])
                                                         for keys, values in base.entry.layers])
        with torch.inference_mode():
            output = self.model(input_ids=torch.tensor([ids[start:]], device=self.device), use_cache=True,
                                logits_to_keep=1, **cache_kwargs)
        self.prefix_cache.add_prefix(ids, getattr(output, self._cache_kw), base if start else None)

    def _generate_chunk(self, rows: list[Row]) -> list[_Generated]:
        """One batched `generate` for `rows`: the reply per row."""
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
            generated = self.model.generate(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                                            **kwargs)
        width = input_ids.shape[1]
        new = generated.sequences[:, width:].cpu()
        self.stats["calls"] += 1
        replies, kept = [], []
        for i in range(len(rows)):
            tokens = new[i].tolist()
            n_reply = next((k for k, token in enumerate(tokens) if token in self.stop_ids), len(tokens))
            replies.append(_Generated(self.tokenizer.decode(tokens[:n_reply], skip_special_tokens=True).strip(), n_reply))
            kept.append(tokens[:n_reply + 1])  # the stop token too: the next prompt continues after it
        cache = getattr(generated, self._cache_kw, None)
        if self.prefix_cache is not None and cache is not None:
            self.prefix_cache.keep(cache, mask, rows, kept)
        return replies

    def close(self) -> None:
        self.model = None
        if self.prefix_cache is not None:
            self.prefix_cache.clear()


def _has_plain_attention(model: Any) -> bool:
    """Whether every layer's cache is a plain growing key/value cache (no sliding window, no recurrent state)."""
    cfg = model.config
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return False
    layer_types = getattr(cfg, "layer_types", None)
    return not layer_types or all(kind == "full_attention" for kind in layer_types)


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
        api_key_env: str = DEFAULT_API_KEY_ENV,
        temperature: float = 0.0,
        max_new_tokens: int = 256,
        timeout: float = DEFAULT_TIMEOUT_S,
        max_retries: int = DEFAULT_MAX_RETRIES,
        concurrency: int = 8,
        cache_path: str | None = None,
        prices: dict[str, Any] | None = None,
    ):
        # the endpoint options are the client's own (same defaults, same checks), named as a policy's
        self.client = ChatClient.from_env(
            model=str(model), base_url=base_url, api_key_env=api_key_env, needs_endpoint="policy=openai",
            option="policy", temperature=float(temperature), max_tokens=int(max_new_tokens), timeout=float(timeout),
            max_retries=int(max_retries), response_format="none", seed=context.seed, prices=prices or {},
            cache_path=cache_path,
        )
        self.model_name = self.client.model
        self.base_url = base_url
        self.concurrency = max(1, int(concurrency))
        self.max_new_tokens = self.client.max_tokens
        self.temperature = self.client.temperature
        self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="policy")

    @property
    def stats(self) -> dict[str, Any]:
        return self.client.stats.as_dict()

    def describe(self) -> dict[str, Any]:
        return {"policy": self.name, "model": self.model_name, "base_url": self.base_url,
                "max_new_tokens": self.max_new_tokens, "temperature": self.temperature}

    def _reply_to(self, conversation: list[Message]) -> str | NoReply:
        """The endpoint's reply to one conversation (run `concurrency` at a time by `generate`)."""
        try:
            return self.client.chat(conversation).text.strip()
        except LLMError as e:
            # a reply that cannot be had ends the episode (counted), it does not stop the evaluation
            log.warning("policy: no reply (%s)", e)
            return NoReply("no_reply", str(e))

    def generate(self, conversations: list[list[Message]]) -> list[str | NoReply]:
        return list(self._pool.map(self._reply_to, conversations))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.client.close()
