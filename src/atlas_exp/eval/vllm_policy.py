"""The agent on vLLM, in process: the fast path for GPU users (`policy=vllm`).

vLLM schedules every episode's turn together (continuous batching) and keeps each conversation's keys/values
between turns by itself (`enable_prefix_caching`), so an evaluation of an 8B model over hundreds of episodes
is bounded by the GPU, not by Python. The policy feeds vLLM the exact prompt tokens the HF policy would
(same chat template, same end-of-turn stop tokens), so the two policies score the same conversations.

The run's LoRA adapter is served as a vLLM LoRA request over the base model (no merge, no copy); full
finetuned weights are loaded directly. vLLM is not a dependency of atlas_exp (it needs a CUDA machine):
`pip install vllm` where it runs. On a machine without it this policy says so by name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from atlas_exp.errors import ConfigError
from atlas_exp.eval.model_source import ModelSource, encode_chat, stop_token_ids
from atlas_exp.eval.policy_base import Message, NoReply, PolicyContext


class VLLMPolicy:
    """A vLLM engine as the agent: `model` is run | base | a path, as for `policy=hf`."""

    name = "vllm"
    reply_neutral = ("gpu_memory_utilization", "tensor_parallel_size", "enable_prefix_caching")
    loads_base_model = True

    def __init__(
        self,
        *,
        context: PolicyContext,
        model: str = "run",
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_context: int = 4096,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.85,
        tensor_parallel_size: int = 1,
        enable_prefix_caching: bool = True,
        engine_kwargs: dict[str, Any] | None = None,
    ):
        try:
            import vllm
        except ImportError:
            raise ConfigError(
                "policy=vllm needs the vllm package (a CUDA machine: pip install vllm); use policy=hf, or serve the "
                "model with `vllm serve` and evaluate it with policy=openai"
            ) from None
        if max_new_tokens < 1:
            raise ConfigError(f"policy.max_new_tokens must be >= 1, got {max_new_tokens}")
        self.max_new_tokens = int(max_new_tokens)
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.max_context = int(max_context)
        src = ModelSource.resolve(context, model)
        self.source = src.describe()
        self.tokenizer = src.tokenizer()
        kwargs: dict[str, Any] = {
            "dtype": dtype,
            "max_model_len": self.max_context,
            "gpu_memory_utilization": float(gpu_memory_utilization),
            "tensor_parallel_size": int(tensor_parallel_size),
            "enable_prefix_caching": bool(enable_prefix_caching),
            "seed": int(context.seed),
        }
        self.lora_request = None
        if src.adapter is not None:
            rank = int(json.loads((Path(src.adapter) / "adapter_config.json").read_text()).get("r", 16))
            kwargs.update(enable_lora=True, max_lora_rank=max(8, rank), max_loras=1)
            from vllm.lora.request import LoRARequest

            self.lora_request = LoRARequest("run", 1, src.adapter)
            path = src.base_path
        else:
            path = src.weights or src.base_path
        kwargs.update(engine_kwargs or {})
        # the tokenizer goes in as a folder too: the run's own (its chat template) when it saved one
        self.llm = vllm.LLM(model=path, tokenizer=src.tokenizer_dir or src.base_path, **kwargs)
        self.stop_ids = stop_token_ids(self.tokenizer)
        self.sampling = vllm.SamplingParams(
            temperature=self.temperature, top_p=self.top_p if self.temperature > 0 else 1.0,
            max_tokens=self.max_new_tokens, stop_token_ids=self.stop_ids, seed=int(context.seed),
            skip_special_tokens=True,
        )
        self.stats = {"calls": 0, "replies": 0, "prompt_tokens": 0, "completion_tokens": 0, "context_limit": 0}

    def describe(self) -> dict[str, Any]:
        return {"policy": self.name, **self.source, "max_new_tokens": self.max_new_tokens,
                "temperature": self.temperature, "top_p": self.top_p, "max_context": self.max_context}

    def generate(self, conversations: list[list[Message]]) -> list[str | NoReply]:
        out: list[str | NoReply] = [NoReply("context_limit", f"prompt + {self.max_new_tokens} new tokens > {self.max_context}")] * len(conversations)
        prompts = [(i, encode_chat(self.tokenizer, c)) for i, c in enumerate(conversations)]
        fits = [(i, ids) for i, ids in prompts if len(ids) + self.max_new_tokens <= self.max_context]
        self.stats["context_limit"] += len(prompts) - len(fits)
        if not fits:
            return out
        results = self.llm.generate([{"prompt_token_ids": ids} for _, ids in fits], self.sampling,
                                    use_tqdm=False, lora_request=self.lora_request)
        self.stats["calls"] += 1
        for (i, ids), r in zip(fits, results):
            completion = r.outputs[0]
            out[i] = completion.text.strip()
            self.stats["replies"] += 1
            self.stats["prompt_tokens"] += len(ids)
            self.stats["completion_tokens"] += sum(t not in self.stop_ids for t in completion.token_ids)
        return out

    def close(self) -> None:
        self.llm = None
