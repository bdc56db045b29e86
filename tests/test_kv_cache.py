"""The in-place KV cache (eval/kv_cache.py) holds exactly what transformers' DynamicCache holds, without
copying the cache per generated token, and the HF policy's replies do not change with it."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import TEST_CACHE
from transformers import DynamicCache

from atlas_exp.eval.kv_cache import GrowingCache, GrowingLayer


def _kv(b: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, n, 8, generator=g), torch.randn(b, 3, n, 4, generator=g)


def test_appends_in_place_and_holds_what_concatenation_would():
    layer = GrowingLayer(capacity=10)
    ref_k, ref_v = [], []
    buffers = set()
    for step, n in enumerate([6, 1, 1, 1, 1]):  # a prompt, then one token at a time, up to the capacity
        k, v = _kv(2, n, step)
        keys, values = layer.update(k, v)
        ref_k.append(k)
        ref_v.append(v)
        assert torch.equal(keys, torch.cat(ref_k, -2)) and torch.equal(values, torch.cat(ref_v, -2))
        buffers.add(layer._k.data_ptr())
        assert keys.data_ptr() == layer._k.data_ptr()  # a view of the buffer, not a copy
    assert len(buffers) == 1 and layer.get_seq_length() == 10

    # past the capacity it grows (doubling) and keeps the content
    k, v = _kv(2, 3, 99)
    keys, _ = layer.update(k, v)
    assert layer._k.shape[-2] == 20 and torch.equal(keys, torch.cat([*ref_k, k], -2))


def test_follows_when_generation_replaces_the_cache_content():
    """crop / batch selection / beam reordering assign `keys` directly; the next update continues from those."""
    layer = GrowingLayer(capacity=16)
    k, v = _kv(3, 5, 1)
    layer.update(k, v)
    layer.batch_select_indices(torch.tensor([0, 2]))
    layer.crop(-2)
    k2, v2 = _kv(2, 1, 2)
    keys, values = layer.update(k2, v2)
    assert torch.equal(keys, torch.cat([k[[0, 2], :, :3], k2], -2))
    assert torch.equal(values, torch.cat([v[[0, 2], :, :3], v2], -2))


def test_a_cache_filled_from_kept_layers_continues_like_a_dynamic_cache():
    kept = [_kv(2, 4, i) for i in range(3)]
    grow, dyn = GrowingCache(8, kept), DynamicCache(kept)
    assert grow.get_seq_length() == dyn.get_seq_length() == 4
    for i in range(3):
        k, v = _kv(2, 1, 10 + i)
        a, b = grow.update(k, v, i), dyn.update(k, v, i)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_hf_policy_replies_are_the_same_with_and_without_the_in_place_cache(smollm2_dir):
    """Two rounds of TextCraft episodes in one batch (the second continues the first from the kept cache)."""
    from atlas_exp.envs.textcraft import TextCraftEnv
    from atlas_exp.eval.policy import HFPolicy
    from atlas_exp.eval.policy_base import PolicyContext

    ctx = PolicyContext(model_cfg={"name": "s", "name_or_path": str(smollm2_dir), "gguf_file": None},
                        run_model_dir=Path("/nonexistent"), cache_dir=str(TEST_CACHE))
    env = TextCraftEnv()
    convs = [[{"role": "user", "content": env.instruction()}, {"role": "assistant", "content": env.ack},
              {"role": "user", "content": env.reset(s)}] for s in (1, 2, 3)]
    obs = {"role": "user", "content": "Observation: Crafted 1 minecraft:stick"}
    out = {}
    for pre in (True, False):
        policy = HFPolicy(context=ctx, model="base", max_new_tokens=20, batch_size=8, preallocate_kv_cache=pre)
        assert policy.preallocate_kv_cache is pre
        first = policy.generate(convs)
        second = policy.generate([c + [{"role": "assistant", "content": r}, obs] for c, r in zip(convs, first)])
        out[pre] = (first, second, policy.stats["reused_tokens"])
        policy.close()
    assert out[True] == out[False]
    assert out[True][2] > 0  # the second round did continue from the first's keys/values
