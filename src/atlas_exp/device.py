"""Which device and dtype a model runs in: one resolver for the three places that load one, the perplexity
scorer (`selector.device`, `selector.dtype`), the evaluated policy (`policy.dtype`) and training
(`train.precision`). After torchtune's `get_device`/`get_dtype`: `auto` is a GPU when one is visible, and
bf16 where that GPU has it, else fp32 (CPUs compute in fp32). torch is imported on first call only.

>>> get_device("cpu"), get_dtype("bf16", "cpu"), get_dtype("auto", "cpu"), get_dtype("float16")
('cpu', torch.bfloat16, torch.float32, torch.float16)
"""

from __future__ import annotations

from typing import Any

from atlas_exp.errors import ConfigError

#: the short precision names and the torch dtypes they stand for
PRECISIONS = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def get_device(device: str | None = "auto") -> str:
    """`auto` (or unset): `cuda` when a GPU is visible, else `cpu`; any other value as given (`cuda:1`)."""
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def bf16_supported(device: str) -> bool:
    """Whether `device` is a CUDA device that computes in bf16 (a CPU is given fp32)."""
    import torch

    return str(device).startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def get_dtype(dtype: Any = "auto", device: str = "cpu", *, option: str = "dtype",
              invalid: str = "{option} must be auto, bf16, fp16 or fp32, got {value!r}") -> Any:
    """The torch dtype of `dtype` on `device`: `auto` (or unset) is bf16 where `bf16_supported(device)`,
    else fp32; a short name (`bf16`, `fp16`, `fp32`) or the name of a torch floating-point dtype
    (`bfloat16`, `float16`, `float32`, ...) that dtype. Anything else: ConfigError(`invalid`, formatted with
    `option` and `value`), so each caller keeps its own message."""
    import torch

    if dtype in (None, "", "auto"):
        return torch.bfloat16 if bf16_supported(device) else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    found = getattr(torch, PRECISIONS.get(str(dtype), str(dtype)), None)
    if isinstance(found, torch.dtype) and found.is_floating_point:
        return found
    raise ConfigError(invalid.format(option=option, value=dtype))


def get_precision(precision: Any = "auto", *, option: str = "train.precision") -> str:
    """Training's precision as the Trainer takes it, `bf16`, `fp16` or `fp32`: `auto` is bf16 on a GPU that
    has it, else fp32; bf16 and fp16 need a GPU."""
    precision = str(precision)
    device = get_device()
    if precision == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    if precision not in PRECISIONS:
        raise ConfigError(f"{option}={precision!r}; choose auto, bf16, fp16 or fp32")
    if precision in ("bf16", "fp16") and device == "cpu":
        raise ConfigError(f"{option}={precision} needs a GPU; use {option}=fp32 (or auto) on CPU")
    return precision
