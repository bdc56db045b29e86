"""policy=vllm: the in-process vLLM policy sends the HF policy's exact prompts and serves the run's adapter.

vLLM needs CUDA, so CI cannot install it. These tests run the policy against `tests/fakes/vllm`, a stand-in
for the slice of vLLM's offline API the policy uses, backed by the real SmolLM2 model through transformers:
they check the policy's side of the contract (weights, adapter, prompt tokens, stop tokens, context limit,
outputs), not vLLM.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import TEST_CACHE
from test_app import app

from atlas_exp.envs.textcraft import TextCraftEnv
from atlas_exp.errors import ConfigError
from atlas_exp.eval.policy import HFPolicy
from atlas_exp.eval.policy_base import NoReply, PolicyContext

FAKES = Path(__file__).parent / "fakes"


@pytest.fixture
def fake_vllm(monkeypatch):
    monkeypatch.syspath_prepend(str(FAKES))
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        monkeypatch.delitem(sys.modules, name)
    import vllm

    assert vllm.__file__.startswith(str(FAKES))
    vllm.INSTANCES.clear()
    yield vllm
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        monkeypatch.delitem(sys.modules, name)


def _ctx(smollm2_dir, run_model_dir=Path("/nonexistent")) -> PolicyContext:
    return PolicyContext(model_cfg={"name": "s", "name_or_path": str(smollm2_dir), "gguf_file": None},
                         run_model_dir=Path(run_model_dir), cache_dir=str(TEST_CACHE))


def _convs() -> list[list[dict[str, str]]]:
    env = TextCraftEnv()
    return [[{"role": "user", "content": env.instruction()}, {"role": "assistant", "content": env.ack},
             {"role": "user", "content": env.reset(s)}] for s in (1, 2)]


def test_without_vllm_installed_the_error_names_the_package(monkeypatch, smollm2_dir):
    from atlas_exp.eval.vllm_policy import VLLMPolicy

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(ConfigError, match="policy=vllm needs the vllm package"):
        VLLMPolicy(context=_ctx(smollm2_dir), model="base")


def test_vllm_policy_sends_the_hf_policys_prompts_and_gets_its_replies(fake_vllm, smollm2_dir):
    from atlas_exp.eval.vllm_policy import VLLMPolicy

    hf = HFPolicy(context=_ctx(smollm2_dir), model="base", max_new_tokens=24, max_context=1024)
    pol = VLLMPolicy(context=_ctx(smollm2_dir), model="base", max_new_tokens=24, max_context=1024)
    (llm,) = fake_vllm.INSTANCES
    assert llm.model_path == str(smollm2_dir) and llm.kwargs["max_model_len"] == 1024
    assert llm.kwargs["enable_prefix_caching"] is True and not llm.kwargs.get("enable_lora")
    assert pol.sampling.stop_token_ids == hf.stop_ids and pol.sampling.temperature == 0.0
    convs = _convs()
    too_long = [{"role": "user", "content": "word " * 1200}]
    out = pol.generate(convs + [too_long])
    assert isinstance(out[2], NoReply) and out[2].reason == "context_limit"
    assert [r["prompt_token_ids"] for r in llm.requests] == [hf.encode(c) for c in convs]  # nothing sent for it
    assert out[:2] == hf.generate(convs)
    assert pol.stats["replies"] == 2 and pol.stats["context_limit"] == 1
    assert pol.describe()["policy"] == "vllm" and pol.describe()["model"] == "base"


def test_vllm_policy_serves_the_runs_lora_adapter_over_the_base_model(fake_vllm, smollm2_dir, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from atlas_exp.eval.vllm_policy import VLLMPolicy

    # a real adapter with non-zero weights, saved where the train stage puts it
    torch.manual_seed(0)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(smollm2_dir),
                          LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    run_model = tmp_path / "model"
    peft.save_pretrained(str(run_model))
    assert json.loads((run_model / "adapter_config.json").read_text())["r"] == 8

    pol = VLLMPolicy(context=_ctx(smollm2_dir, run_model), model="run", max_new_tokens=24, max_context=1024)
    (llm,) = fake_vllm.INSTANCES
    assert llm.model_path == str(smollm2_dir)  # the base weights; the adapter goes with each request
    assert llm.kwargs["enable_lora"] is True and llm.kwargs["max_lora_rank"] >= 8
    assert pol.describe()["adapter"] == str(run_model)
    convs = _convs()
    out = pol.generate(convs)
    assert {r["lora"] for r in llm.requests} == {str(run_model)}
    # the HF policy merges the same adapter: same replies, and not the base model's
    assert out == HFPolicy(context=_ctx(smollm2_dir, run_model), model="run", max_new_tokens=24).generate(convs)
    assert out != HFPolicy(context=_ctx(smollm2_dir), model="base", max_new_tokens=24).generate(convs)


def test_eval_stage_runs_with_policy_vllm(monkeypatch, tmp_path, smollm2_dir):
    monkeypatch.setenv("PYTHONPATH", str(FAKES))
    rd = tmp_path / "run"
    p = app(f"run_dir={rd}", "stage=eval", "policy=vllm", "policy.model=base", "logger=none", "eval=smoke",
            "policy.max_new_tokens=16", "eval.tasks.textcraft.episodes.count=1", "eval.tasks.textcraft.max_turns=2",
            "eval.tasks.babyai.episodes.count=1", "eval.tasks.babyai.max_turns=1",
            "eval.tasks.sciworld.episodes.limit=1", "eval.tasks.sciworld.max_turns=1")
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((rd / "eval" / "results.json").read_text())
    assert res["policy"]["policy"] == "vllm" and res["tasks"]["textcraft"]["n"] == 1
