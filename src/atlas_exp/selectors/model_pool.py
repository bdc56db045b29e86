"""Scoring models of the selectors: how a selector option names one, and one loaded copy per process.

`model_spec` turns what a user writes for `selector.model` (or `selector.reference`) into a `ModelSpec`:
a model config (`conf/model/*.yaml`, the default `${model}` is the model being trained), a local folder, or
a Hub name.

`SCORING_MODELS` shares loaded models between the selectors of one process. Several selectors may score
with the same model in one run: `selector=hybrid` of `perplexity` and `perplexity_delta`, the two passes
of `excess_loss` next to a `perplexity` child, `non_critical` over a scoring base. Each would otherwise
load its own copy, and two copies of a 7B model do not fit where one does. So a selector `acquire`s a
model when it first needs it and `release`s it in `close()`; the last release frees it (and the CUDA
cache).

Why a process-wide pool and not one handed to each selector: selectors are built by Hydra from their
configs, each on its own (a combined selector's children are built from config nodes), so there is no
owner that exists before them to pass one in, and a pool object does not belong in a config. The pool is
an explicit object with a name and counts, not a bare dict, so tests can see what is loaded
(`SCORING_MODELS.loaded()`) and a leak (a selector never closed) shows as a count that stays above zero.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atlas_exp.artifacts import file_fingerprint, fingerprint
from atlas_exp.errors import ConfigError
from atlas_exp.models import ModelSpec, load_model, load_tokenizer, materialize

log = logging.getLogger(__name__)


def model_spec(model: Any, option: str = "selector.model") -> ModelSpec:
    """A ModelSpec from a selector's model option: a ModelSpec, a model config mapping, or a path/Hub name."""
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, str):
        return ModelSpec(name=os.path.basename(model.rstrip("/")) or model, name_or_path=model)
    if model is None:
        raise ConfigError(f"{option} is required (default: ${{model}}, the model being trained)")
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(model, DictConfig):
            model = OmegaConf.to_container(model, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if not isinstance(model, Mapping):
        raise ConfigError(f"{option} must be a model config (conf/model/*.yaml) or a path, got {type(model).__name__}")
    d = dict(model)
    d.setdefault("name", os.path.basename(str(d.get("name_or_path", "")).rstrip("/")) or "model")
    return ModelSpec.from_cfg(d)


def is_adapter_dir(path: Any) -> bool:
    """Whether `path` is a PEFT (LoRA) adapter folder, as the train stage saves in `<run_dir>/model`."""
    return isinstance(path, (str, os.PathLike)) and (Path(path).expanduser() / "adapter_config.json").is_file()


def adapter_identity(path: str) -> str:
    """A hash of an adapter folder's config and weights: what a score computed with it depends on (the
    folder's path alone does not say whether the run that wrote it was retrained since)."""
    folder = Path(path).expanduser()
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.name.startswith(("adapter_config", "adapter_model")))
    return fingerprint([(f.name, file_fingerprint(f)) for f in files])


def _warn_if_other_base(adapter: str, base_path: str) -> None:
    """An adapter merged over another base than the one it was trained on gives wrong scores without failing
    when the shapes agree; warn (not refuse: a run dir or the model cache may have moved since)."""
    import json

    try:
        recorded = json.loads((Path(adapter) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError):
        return
    if recorded and os.path.realpath(os.path.expanduser(recorded)) != os.path.realpath(os.path.expanduser(base_path)):
        log.warning("adapter %s was trained on %s, and is merged over %s (the selector's model): check that they are "
                    "the same model", adapter, recorded, base_path)


@dataclass
class _Loaded:
    model: Any
    tokenizer: Any
    users: int = 0


class ModelPool:
    """Loaded (model, tokenizer) pairs keyed by what determines their outputs, with a count of users."""

    def __init__(self) -> None:
        self._models: dict[tuple, _Loaded] = {}

    def acquire(self, spec: ModelSpec, cache_dir: str, device: str, dtype: Any, adapter: str | None = None) -> tuple[tuple, Any, Any]:
        """(key, model, tokenizer) of `spec` on `device` in `dtype`, loaded on first use; `adapter`: a LoRA
        adapter folder merged into a private copy of the base (so the shared base itself stays untouched).
        Hand the key back to `release` when done."""
        path = materialize(spec, cache_dir)
        adapter = None if adapter is None else os.path.realpath(os.path.expanduser(adapter))
        key = (path, spec.revision, spec.chat_template, spec.attn_implementation, device, str(dtype), adapter)
        hit = self._models.get(key)
        if hit is None:
            log.info("scoring model %s%s on %s (%s)", spec.name, f" + adapter {adapter}" if adapter else "", device, dtype)
            tok = load_tokenizer(spec, cache_dir)
            model = load_model(spec, cache_dir, dtype=dtype)
            if adapter is not None:
                from peft import PeftModel

                _warn_if_other_base(adapter, path)

                # merged once: scoring then runs at the base model's speed
                model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
            model = model.to(device)
            model.eval()
            hit = self._models[key] = _Loaded(model, tok)
        hit.users += 1
        return key, hit.model, hit.tokenizer

    def release(self, key: tuple) -> None:
        """One user fewer; the last one frees the model (and the CUDA cache)."""
        hit = self._models.get(key)
        if hit is None:
            return
        hit.users -= 1
        if hit.users <= 0:
            del self._models[key]
            try:
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            except Exception:  # pragma: no cover
                pass

    def loaded(self) -> dict[tuple, int]:
        """{key: number of users} of every model held now."""
        return {k: v.users for k, v in self._models.items()}


#: the one pool of this process (see the module docstring for why it is process-wide)
SCORING_MODELS = ModelPool()
