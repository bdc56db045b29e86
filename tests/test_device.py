"""One device/dtype resolver (atlas_exp.device) for the scorer, the policy and training: `auto` is a GPU
when visible and bf16 where it has it; each caller's option name and message are kept."""

from __future__ import annotations

import doctest

import pytest
import torch

import atlas_exp.device
from atlas_exp.device import bf16_supported, get_device, get_dtype, get_precision
from atlas_exp.errors import ConfigError

GPU = torch.cuda.is_available()
BF16 = GPU and torch.cuda.is_bf16_supported()


def test_the_module_example_holds():
    assert doctest.testmod(atlas_exp.device).failed == 0


def test_device_auto_is_a_gpu_when_visible_and_any_other_value_as_given():
    for auto in ("auto", None, ""):
        assert get_device(auto) == ("cuda" if GPU else "cpu")
    assert get_device("cpu") == "cpu" and get_device("cuda:1") == "cuda:1"


def test_dtype_names_short_and_torch():
    for names, dtype in ((("bf16", "bfloat16"), torch.bfloat16), (("fp16", "float16"), torch.float16),
                         (("fp32", "float32"), torch.float32)):
        for name in names:
            assert get_dtype(name, "cpu") is dtype
    assert get_dtype(torch.float16) is torch.float16


def test_dtype_auto_is_bf16_only_on_a_gpu_that_has_it():
    assert not bf16_supported("cpu")
    for auto in ("auto", None, ""):
        assert get_dtype(auto, "cpu") is torch.float32
    assert get_dtype("auto", "cuda") is (torch.bfloat16 if BF16 else torch.float32)


def test_dtype_errors_keep_each_callers_option_and_message():
    with pytest.raises(ConfigError, match=r"^selector.dtype must be auto, bf16, fp16 or fp32, got 'int8'$"):
        get_dtype("int8", "cpu", option="selector.dtype")
    with pytest.raises(ConfigError, match=r"^selector.dtype must be auto, bf16, fp16 or fp32, got 'cuda'$"):
        get_dtype("cuda", "cpu", option="selector.dtype")  # a torch attribute, not a dtype


def test_the_scorer_and_the_policy_refuse_a_bad_dtype_with_their_own_message():
    from atlas_exp.eval.policy import HFPolicy
    from atlas_exp.selectors.perplexity import PerplexitySelector

    with pytest.raises(ConfigError, match=r"^selector.dtype must be auto, bf16, fp16 or fp32, got 'bogus'$"):
        PerplexitySelector(model="/m", device="cpu", dtype="bogus")
    sel = PerplexitySelector(model="/m", device="cpu", dtype="bfloat16")
    assert (sel.device, sel.dtype) == ("cpu", torch.bfloat16)
    assert PerplexitySelector(model="/m", device="auto").dtype is (torch.bfloat16 if BF16 else torch.float32)
    # the policy checks its dtype before it loads anything
    with pytest.raises(ConfigError, match=r"^policy.dtype='bogus' is not a torch dtype \(auto \| bfloat16 \| float16 \| float32\)$"):
        HFPolicy(context=None, dtype="bogus")


def test_training_precision():
    assert get_precision("fp32") == "fp32"
    assert get_precision("auto") == ("bf16" if BF16 else "fp32")
    with pytest.raises(ConfigError, match=r"^train.precision='fp8'; choose auto, bf16, fp16 or fp32$"):
        get_precision("fp8")
    if not GPU:
        for p in ("bf16", "fp16"):
            with pytest.raises(ConfigError, match=rf"^train.precision={p} needs a GPU; use train.precision=fp32 \(or auto\) on CPU$"):
                get_precision(p)
