"""perplexity_delta and perplexity on the real SmolLM2 model and real AgentTraj-L TextCraft trajectories.

Every reference below is computed independently of the selector: a plain forward pass of the model with
full logits and a hand-written cross-entropy over the step's supervised span (as masking.py defines it).

CPU budget: SmolLM2-135M scores a few hundred tokens/s on a busy 2-core machine, so the trajectories are
real TextCraft records cut to their task message and first steps (the generic instruction turn and the
"OK" reply in front of every record are dropped): about 140 tokens each.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, TEST_CACHE
from helpers import read_agentgym

from atlas_exp.data.trajectory import Message, Trajectory
from atlas_exp.errors import ConfigError
from atlas_exp.selectors.base import n_to_select, top_k
from atlas_exp.selectors.perplexity import PerplexitySelector
from atlas_exp.selectors.span_scorer import ScoredSeq, SpanScorer
from atlas_exp.selectors.step_scores import select_global
from atlas_exp.train.turn_spans import tokenize_trajectory


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread while this module runs (restored after). On a 2-core machine shared with other
    jobs, two intra-op threads wait on each other at every op: a 140-token SmolLM2 forward took 8 s with 2
    threads and 0.55 s with 1 when another process held a core. Results do not depend on it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def app(*overrides: str) -> subprocess.CompletedProcess:
    """`python -m atlas_exp ...` as a user runs it (as in test_app.py)."""
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}  # see one_thread
    return subprocess.run(
        [sys.executable, "-m", "atlas_exp", f"cache_dir={TEST_CACHE}", "logger=none", *overrides],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=600,
    )


def trimmed_records(path: Path, n: int, steps: int) -> list[dict]:
    """The n shortest records of an AgentTraj-L file, without their two leading boilerplate turns
    (generic instructions, "OK") and cut right after their `steps`-th action: still real records."""
    out = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        conv, k = [], 0
        for c in rec["conversations"][2:]:
            conv.append(c)
            if c["from"] == "gpt":
                k += 1
                if k == steps:
                    break
        if k == steps:
            out.append({**rec, "conversations": conv})
    out.sort(key=lambda r: (sum(len(c["value"]) for c in r["conversations"]), r["item_id"]))
    return out[:n]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def as_trajectories(tmp_path: Path, records: list[dict]) -> list[Trajectory]:
    return read_agentgym(write_jsonl(tmp_path / "records.jsonl", records))


def reference_loss(model, ids: list[int], span: tuple[int, int]) -> float:
    """Mean CE over span of ONE unpadded sequence, full logits, no shortcut."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    a, b = span
    logp = torch.log_softmax(logits[a - 1 : b - 1], dim=-1)
    tgt = torch.tensor(ids[a:b])
    return float(-logp[torch.arange(b - a), tgt].mean())


@pytest.fixture(scope="module")
def trajs(agenttraj_dir, tmp_path_factory):
    return as_trajectories(tmp_path_factory.mktemp("ppl"), trimmed_records(agenttraj_dir / "textcraft.jsonl", 2, 2))


@pytest.fixture(scope="module")
def delta(smollm2_spec, smollm2_dir):
    sel = PerplexitySelector(ratio=0.5, model=smollm2_spec, cache_dir=str(TEST_CACHE), progress=False, score_cache=False)
    yield sel
    sel.close()


@pytest.fixture(scope="module")
def delta_out(delta, trajs):
    return list(delta.select(trajs))


def test_conditioned_losses_of_the_one_pass_equal_separate_passes_per_step(delta, delta_out, trajs):
    # one forward over the whole trajectory (batched with the other trajectories and the alone sequences)
    # == one forward per step over the history truncated right after that step
    t, sel = trajs[0], delta_out[0]
    tt = tokenize_trajectory(delta.tokenizer, t)
    for k, (a, b) in enumerate(tt.step_spans):
        assert tt.input_ids[b - 1] == delta.tokenizer.convert_tokens_to_ids("<|im_end|>")  # span ends at end-of-turn
        ref = reference_loss(delta.model, tt.input_ids[:b], (a, b))
        assert sel.meta["loss_cond"][k] == pytest.approx(ref, abs=1e-4)


def test_alone_losses_batched_with_padding_equal_one_at_a_time(delta, delta_out, trajs):
    tok = delta.tokenizer
    for t, sel in zip(trajs, delta_out):
        for k, m in enumerate(t.steps):
            alone = Trajectory(id="x", env="textcraft", messages=[Message("assistant", m.content, step=0)])
            tt = tokenize_trajectory(tok, alone)
            # "step alone": the step as the only message, template preamble (SmolLM2's default system prompt) kept
            assert tt.text == tok.apply_chat_template([{"role": "assistant", "content": m.content}], tokenize=False)
            assert tt.text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
            ref = reference_loss(delta.model, tt.input_ids, tt.step_spans[0])
            assert sel.meta["loss_alone"][k] == pytest.approx(ref, abs=1e-4)
            assert sel.steps[k].score == pytest.approx(sel.meta["loss_cond"][k] / sel.meta["loss_alone"][k], rel=1e-9)


def test_span_scorer_pads_without_leaking(delta):
    # sequences of different lengths in one padded batch vs one at a time, spans at both ends
    seqs = [ScoredSeq(list(range(100, 100 + n)), [(1, 4), (n - 5, n)], [(n, 0), (n, 1)]) for n in (9, 23, 40)]
    delta.load()  # the model loads lazily on the first select(): this test must not depend on an earlier one
    one = SpanScorer(delta.model, batch_size=1).score(seqs)
    batched = SpanScorer(delta.model, batch_size=8, max_batch_tokens=10_000).score(seqs)
    assert one.keys() == batched.keys()
    for key in one:
        assert batched[key] == pytest.approx(one[key], abs=1e-4)
    ref = reference_loss(delta.model, seqs[2].ids, (35, 40))
    assert batched[(40, 1)] == pytest.approx(ref, abs=1e-4)


def test_selects_the_top_ratio_per_trajectory_with_finite_scores(delta, delta_out, trajs):
    for t, sel in zip(trajs, delta_out):
        assert sel.id == t.id and sel.selector == "perplexity_delta" and sel.n_steps == t.n_steps
        scores = [s.score for s in sel.steps]
        assert all(math.isfinite(s) and s > 0 for s in scores)
        assert set(sel.selected_steps) == top_k(scores, n_to_select(t.n_steps, 0.5))
        assert len(sel.meta["loss_cond"]) == len(sel.meta["loss_alone"]) == t.n_steps
    # deterministic: the same call twice gives the same record, bit for bit
    assert [s.to_dict() for s in delta.select(trajs[:1])] == [s.to_dict() for s in delta.select(trajs[:1])]


def test_batching_and_global_scope(delta, delta_out, trajs, smollm2_spec):
    # one sequence per forward pass gives the scores of the batched run (and so the same choice)
    sel = PerplexitySelector(
        ratio=0.7, scope="global", model=smollm2_spec, cache_dir=str(TEST_CACHE), batch_size=1, progress=False, score_cache=False
    )
    try:
        out = list(sel.select(trajs))
    finally:
        sel.close()
    for a, b in zip(delta_out, out):
        for sa, sb in zip(a.steps, b.steps):
            assert sb.score == pytest.approx(sa.score, abs=1e-4)
        assert set(a.selected_steps) == top_k([s.score for s in b.steps], n_to_select(b.n_steps, 0.5))
    # global rule: the best step of every trajectory, then the best remaining steps of the dataset,
    # max(K, T) in all with K = n_to_select(total steps, ratio)
    total = sum(t.n_steps for t in trajs)
    K = n_to_select(total, 0.7)
    assert K > len(trajs)  # the rule's two parts are both exercised
    assert sum(len(s.selected_steps) for s in out) == K
    for s in out:
        best = max(range(s.n_steps), key=lambda i: (s.steps[i].score, -i))
        assert best in s.selected_steps
    extra = [(-c.score, ti, c.step) for ti, s in enumerate(out) for c in s.steps]
    firsts = {(ti, max(range(s.n_steps), key=lambda i: (s.steps[i].score, -i))) for ti, s in enumerate(out)}
    rest = sorted(x for x in extra if (x[1], x[2]) not in firsts)[: K - len(trajs)]
    want = firsts | {(ti, k) for _, ti, k in rest}
    assert {(ti, k) for ti, s in enumerate(out) for k in s.selected_steps} == want


def test_selectors_scoring_with_one_model_share_one_loaded_copy(smollm2_spec, smollm2_dir):
    from atlas_exp.selectors.model_pool import SCORING_MODELS

    before = SCORING_MODELS.loaded()  # the module's `delta` fixture may hold this model already
    a = PerplexitySelector(metric="loss", model=smollm2_spec, cache_dir=str(TEST_CACHE), progress=False)
    b = PerplexitySelector(metric="ratio", model=smollm2_spec, cache_dir=str(TEST_CACHE), progress=False)
    a.load()
    b.load()
    key = a._key
    assert a.model is b.model and SCORING_MODELS.loaded()[key] == before.get(key, 0) + 2
    a.close()
    b.close()
    assert SCORING_MODELS.loaded().get(key, 0) == before.get(key, 0)  # the last user frees it


def test_global_rule_when_there_are_more_trajectories_than_slots():
    chosen = select_global([[0.1, 0.9], [0.5, 0.2], [0.3, 0.3]], 0.3)  # K = 2 < 3 trajectories
    assert chosen == [{1}, {0}, {0}]


def test_long_trajectories_are_scored_in_windows_of_the_shortened_conversation(agenttraj_dir, tmp_path, smollm2_spec):
    (t,) = as_trajectories(tmp_path, trimmed_records(agenttraj_dir / "textcraft.jsonl", 1, 3))
    probe = PerplexitySelector(ratio=0.5, metric="loss", model=smollm2_spec, cache_dir=str(TEST_CACHE), progress=False, score_cache=False)
    probe.load()
    try:
        tok, model = probe.tokenizer, probe.model
        tt = tokenize_trajectory(tok, t)
        b1 = tt.step_spans[1][1]
        assert tt.step_spans[2][1] > b1 + 2
        sel = PerplexitySelector(
            ratio=0.5, metric="loss", max_length=b1 + 2, model=smollm2_spec, cache_dir=str(TEST_CACHE), progress=False, score_cache=False
        )
        try:
            (out,) = list(sel.select([t]))
        finally:
            sel.close()
        cond = out.meta["loss_cond"]
        # steps inside max_length keep their full history
        for k in (0, 1):
            assert cond[k] == pytest.approx(reference_loss(model, tt.input_ids[: tt.step_spans[k][1]], tt.step_spans[k]), abs=1e-4)
        # the last step: the prompt plus the most recent whole messages that fit
        (k, dropped), = out.meta["history_dropped"]
        assert k == 2 and dropped > 0 and "window" in out.steps[2].reason
        msg_start = [s for s, _ in tt.message_spans]
        head = msg_start[t.step_message_index()[0]]
        first_kept = msg_start.index(head + dropped)
        i0, i2 = t.step_message_index()[0], t.step_message_index()[2]
        msgs, n = [], 0
        for m in t.messages[:i0] + t.messages[first_kept : i2 + 1]:
            msgs.append(Message("assistant", m.content, step=n) if m.is_step else m)
            n += m.is_step
        short = Trajectory(id="short", env=t.env, messages=msgs)
        st = tokenize_trajectory(tok, short)
        span = st.step_spans[-1]
        # token for token the shortened conversation as the chat template renders it
        assert st.input_ids[: span[1]] == tt.input_ids[:head] + tt.input_ids[head + dropped : tt.step_spans[2][1]]
        assert span[1] <= b1 + 2  # it fits in max_length
        assert cond[2] == pytest.approx(reference_loss(model, st.input_ids[: span[1]], span), abs=1e-4)
        assert all(math.isfinite(c.score) for c in out.steps)
    finally:
        probe.close()


def test_bad_options_are_config_errors_naming_the_option(smollm2_spec):
    with pytest.raises(ConfigError, match="metric"):
        PerplexitySelector(metric="entropy", model=smollm2_spec)
    with pytest.raises(ConfigError, match="scope"):
        PerplexitySelector(scope="dataset", model=smollm2_spec)
    with pytest.raises(ConfigError, match="max_length"):
        PerplexitySelector(max_length=0, model=smollm2_spec)
    with pytest.raises(ConfigError, match="dtype"):
        PerplexitySelector(dtype="int3", model=smollm2_spec)


# ------------------------------------------------------------------------------------------------
# through the app


@pytest.fixture(scope="module")
def run_dir(agenttraj_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ppl_app")
    data = write_jsonl(tmp / "textcraft.jsonl", trimmed_records(agenttraj_dir / "textcraft.jsonl", 4, 2))
    rd = tmp / "run"
    p = app(f"run_dir={rd}", "stage=data", "data=local", f"data.path={data}")
    assert p.returncode == 0, p.stderr
    return rd


def _read(rd: Path):
    sels = [json.loads(line) for line in (rd / "selection.jsonl").read_text().splitlines()]
    return sels, json.loads((rd / "selection_summary.json").read_text())


def test_app_select_stage_perplexity_delta(run_dir):
    p = app(f"run_dir={run_dir}", "stage=select", "selector=perplexity_delta", "ratio=0.5")
    assert p.returncode == 0, p.stderr
    sels, summary = _read(run_dir)
    assert len(sels) == 4 and summary["selector"] == "perplexity_delta"
    for s in sels:
        scores = [c["score"] for c in s["steps"]]
        assert all(math.isfinite(x) for x in scores)
        assert sum(c["selected"] for c in s["steps"]) == n_to_select(s["n_steps"], 0.5)
        for c, lc, la in zip(s["steps"], s["meta"]["loss_cond"], s["meta"]["loss_alone"]):
            assert c["score"] == pytest.approx(lc / la)
    assert summary["achieved_ratio"] == pytest.approx(sum(n_to_select(s["n_steps"], 0.5) for s in sels) / summary["n_steps"])


def test_app_select_stage_perplexity_global(run_dir):
    p = app(f"run_dir={run_dir}", "stage=select", "selector=perplexity", "selector.scope=global", "ratio=0.75")
    assert p.returncode == 0, p.stderr
    sels, summary = _read(run_dir)
    assert summary["selector"] == "perplexity"
    total = sum(s["n_steps"] for s in sels)
    assert summary["n_selected"] == max(n_to_select(total, 0.75), len(sels))
    assert summary["achieved_ratio"] == pytest.approx(summary["n_selected"] / total)
    for s in sels:
        assert "loss_alone" not in s["meta"]
        assert [c["score"] for c in s["steps"]] == s["meta"]["loss_cond"]  # the plain conditioned loss
        assert any(c["selected"] for c in s["steps"])


def test_templates_that_refuse_a_leading_assistant_turn_need_alone_prompt(smollm2_spec, smollm2_dir):
    from dataclasses import replace

    from atlas_exp.models import load_tokenizer

    strict = (
        "{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
        "{% endfor %}"
    )
    spec = replace(smollm2_spec, chat_template=strict)
    tok = load_tokenizer(spec, TEST_CACHE)  # only the tokenizer: the "alone" rendering needs no model
    for prompt in (None, "Continue."):
        sel = PerplexitySelector(model=spec, cache_dir=str(TEST_CACHE), alone_prompt=prompt)
        sel.tokenizer = tok
        if prompt is None:
            with pytest.raises(ConfigError, match="alone_prompt"):
                sel._alone("Thought:\nx\n\nAction:\ninventory")
        else:
            ids, (a, b), cut = sel._alone("Thought:\nx\n\nAction:\ninventory")
            assert not cut and tok.decode(ids[a:b]) == "Thought:\nx\n\nAction:\ninventory<|im_end|>"
            assert tok.decode(ids[:a]) == "<|im_start|>user\nContinue.<|im_end|>\n<|im_start|>assistant\n"


def test_scores_are_cached_across_ratios(trajs, smollm2_spec, tmp_path, delta_out):
    """A sweep over ratios scores each trajectory once: the second ratio reads the scores from the cache and
    chooses exactly what a fresh computation at that ratio chooses."""
    cache = str(tmp_path / "cache")
    (Path(cache) / "gguf").parent.mkdir(parents=True, exist_ok=True)
    (Path(cache) / "gguf").symlink_to((TEST_CACHE / "gguf").resolve())  # the converted model, not scores
    first = PerplexitySelector(ratio=0.3, model=smollm2_spec, cache_dir=cache, progress=False)
    try:
        a = list(first.select(trajs))
    finally:
        first.close()
    assert first.stats() == {"trajectories_scored": len(trajs), "score_cache_hits": 0}
    second = PerplexitySelector(ratio=0.5, model=smollm2_spec, cache_dir=cache, progress=False)
    try:
        b = list(second.select(trajs))
        assert second.model is None  # the scoring model was never loaded
    finally:
        second.close()
    assert second.stats() == {"trajectories_scored": 0, "score_cache_hits": len(trajs)}
    for x, y, fresh in zip(a, b, delta_out):  # delta_out: ratio 0.5, computed without the cache
        assert [s.score for s in x.steps] == [s.score for s in y.steps]
        assert y.selected_steps == fresh.selected_steps
        assert y.meta == fresh.meta or y.meta["loss_cond"] == pytest.approx(fresh.meta["loss_cond"], abs=1e-6)
