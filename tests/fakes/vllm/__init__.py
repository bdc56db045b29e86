"""A stand-in for the `vllm` package in tests: vLLM needs CUDA and cannot be installed on CI.

It implements the part of vLLM's offline API that `atlas_exp.eval.vllm_policy` uses (`LLM(...)`,
`LLM.generate(token prompts, SamplingParams, lora_request=...)`, `SamplingParams`, `LoRARequest`) with the
real model through transformers, greedy, one prompt at a time, and records what it was given. Tests check the
policy's side of the contract with it: which weights and adapter it loads, which tokens it sends, which stop
tokens it sets, what it does with the outputs. It says nothing about vLLM itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: every LLM built, for tests to inspect
INSTANCES: list["LLM"] = []


class SamplingParams:
    def __init__(self, **kwargs: Any):
        self.kwargs = kwargs
        self.max_tokens = kwargs.get("max_tokens", 16)
        self.stop_token_ids = list(kwargs.get("stop_token_ids") or [])
        self.temperature = kwargs.get("temperature", 1.0)


@dataclass
class CompletionOutput:
    text: str
    token_ids: list[int]


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)


class LLM:
    def __init__(self, model: str, tokenizer: str | None = None, **kwargs: Any):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_path = model
        self.tokenizer_path = tokenizer
        self.kwargs = kwargs
        self.model = AutoModelForCausalLM.from_pretrained(model).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or model)
        self.requests: list[dict[str, Any]] = []
        self._adapters: dict[str, Any] = {}
        INSTANCES.append(self)

    def _model_for(self, lora_request: Any):
        if lora_request is None:
            return self.model
        if not self.kwargs.get("enable_lora"):
            raise ValueError("LoRA is not enabled (enable_lora=False)")
        if lora_request.lora_path not in self._adapters:
            from peft import PeftModel

            self._adapters[lora_request.lora_path] = PeftModel.from_pretrained(self.model, lora_request.lora_path).eval()
        return self._adapters[lora_request.lora_path]

    def generate(self, prompts: list[dict[str, Any]], sampling_params: SamplingParams, *, use_tqdm: bool = True,
                 lora_request: Any = None) -> list[RequestOutput]:
        import torch

        model = self._model_for(lora_request)
        outs = []
        for p in prompts:
            ids = list(p["prompt_token_ids"])
            self.requests.append({"prompt_token_ids": ids, "lora": getattr(lora_request, "lora_path", None)})
            with torch.inference_mode():
                gen = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                     max_new_tokens=sampling_params.max_tokens, do_sample=False,
                                     eos_token_id=sampling_params.stop_token_ids or None,
                                     pad_token_id=self.tokenizer.pad_token_id or 0, temperature=None, top_p=None, top_k=None)
            new = gen[0, len(ids):].tolist()
            for k, t in enumerate(new):
                if t in sampling_params.stop_token_ids:
                    new = new[:k + 1]  # vLLM's token_ids include the stop token, its text does not
                    break
            text = self.tokenizer.decode([t for t in new if t not in sampling_params.stop_token_ids], skip_special_tokens=True)
            outs.append(RequestOutput(ids, [CompletionOutput(text, new)]))
        return outs
