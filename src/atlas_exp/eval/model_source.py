"""The local weights a policy plays with, shared by `HFPolicy` and `VLLMPolicy`: which model `policy.model`
names (`run`: the run's trained adapter or weights, `base`, or a folder / Hub name), its tokenizer with a
chat template, and the chat encoding and end-of-turn tokens the training stage used."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atlas_exp.errors import ConfigError
from atlas_exp.eval.policy_base import Message, PolicyContext


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
    for eos in (tokenizer.eos_token_id, gen_eos):
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(token) for token in eos)
    vocab = tokenizer.get_vocab()
    for tok in ("<|im_end|>", "<|eot_id|>", "<|end|>", "</s>"):
        if tok in vocab:
            ids.add(int(vocab[tok]))
    return sorted(ids)
