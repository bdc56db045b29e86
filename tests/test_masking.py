"""Loss masks for critical steps: exact token spans from the model's own chat template.

What the trainer relies on, checked on real AgentTraj-L trajectories with the real SmolLM2 tokenizer
(ChatML) and a Llama-3.1-style template:

* `input_ids` are exactly `apply_chat_template(messages, tokenize=True)`;
* the labels of a selected step are exactly its content tokens plus the end-of-turn token
  (`<|im_end|>` / `<|eot_id|>`), never the role header, never the newline after `<|im_end|>`;
* unselected steps, user turns and the non-trainable "OK." assistant turn carry no label;
* truncation keeps the beginning and counts the selected tokens it cut;
* `supervise=thought|action`: a step's Thought part and its Action part (with the end-of-turn token) tile
  its supervised span exactly, split where its "Action:" line starts;
* a template without per-turn spans (prefix property broken, no end-of-turn token, a span boundary
  inside a token) is refused with a `TemplateError` naming where.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from atlas_exp.data.trajectory import Message, Trajectory, number_steps
from atlas_exp.errors import DataError, TemplateError
from atlas_exp.selectors.base import Selection, StepChoice
from atlas_exp.train.chat_template import get_template_info
from atlas_exp.train.masking import IGNORE_INDEX, build_example, build_examples
from atlas_exp.train.turn_spans import step_part_spans, tokenize_trajectory

ROLE = {"human": "user", "gpt": "assistant"}

# A Llama-3.1-style template: begin_of_text, an always-present system block, `content | trim`, and
# <|eot_id|> with no newline after it (unlike ChatML).
LLAMA3_TEMPLATE = r"""{{- '<|begin_of_text|>' }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system_message = '' %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}
{{- 'Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n' }}
{{- system_message }}
{{- '<|eot_id|>' }}
{%- for message in loop_messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}"""
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

# Breaks the prefix property: the last message ends with <|endoftext|>, every other one with <|im_end|>.
LOOP_LAST_TEMPLATE = r"""{%- for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] }}
{%- if loop.last %}{{ '<|endoftext|>' }}{% else %}{{ '<|im_end|>\n' }}{% endif %}{%- endfor %}"""

# Breaks the prefix property like Qwen3: reasoning is dropped from assistant turns before the last user turn.
STRIP_THINKING_TEMPLATE = r"""{%- set ns = namespace(last_user=-1) %}
{%- for m in messages %}{%- if m['role'] == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}
{%- for m in messages %}
    {%- set content = m['content'] %}
    {%- if m['role'] == 'assistant' and loop.index0 < ns.last_user and '</think>' in content %}
        {%- set content = content.split('</think>')[-1] | trim %}
    {%- endif %}
    {{- '<|im_start|>' + m['role'] + '\n' + content + '<|im_end|>\n' }}
{%- endfor %}"""

# No special token after an assistant turn: a model could never learn to stop.
PLAIN_TEMPLATE = r"""{%- for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n\n' }}{%- endfor %}"""

# Role header ends with a space: " Thought" / " OK" is one BPE token, so the content start is inside it.
SPACE_HEADER_TEMPLATE = r"""{%- for m in messages %}{{ '<|im_start|>' + m['role'] + ' ' + m['content'] + '<|im_end|>\n' }}{%- endfor %}"""


# ------------------------------------------------------------------------------------------------ helpers


def _to_trajectory(record: dict) -> Trajectory:
    """AgentTraj-L ShareGPT -> Trajectory (human->user, gpt->assistant, loss false -> not trainable)."""
    turns = [(ROLE[c["from"]], c["value"], c.get("loss") is not False, None) for c in record["conversations"]]
    return Trajectory(
        id=record["item_id"],
        env=record["env"],
        messages=number_steps(turns, source=record["item_id"]),
        source="agenttraj_l",
    )


def _load(agenttraj_dir: Path, env: str, ids: list[str] | None = None, n: int = 2) -> list[Trajectory]:
    out = []
    with open(agenttraj_dir / f"{env}.jsonl") as f:
        for line in f:
            rec = json.loads(line)
            if ids is None or rec["item_id"] in ids:
                out.append(_to_trajectory(rec))
            if len(out) == (len(ids) if ids else n):
                break
    return out


def _select(traj: Trajectory, steps: set[int]) -> Selection:
    return Selection(
        id=traj.id,
        selector="test",
        ratio=0.5,
        steps=[StepChoice(step=i, score=float(i in steps), selected=i in steps) for i in range(traj.n_steps)],
    )


def _chat(traj: Trajectory) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in traj.messages]


def _act_ids(tok, msgs) -> list[int]:
    return list(tok.apply_chat_template(msgs, tokenize=True, return_dict=False))


def _decode(tok, ids) -> str:
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def trajs(agenttraj_dir) -> list[Trajectory]:
    """Real trajectories of three envs, plus movie_118 whose first action starts with a newline."""
    out = []
    out += _load(agenttraj_dir, "textcraft", n=2)
    out += _load(agenttraj_dir, "babyai", n=2)
    out += _load(agenttraj_dir, "sciworld", n=2)
    out += _load(agenttraj_dir, "movie", ids=["movie_118"])
    assert {t.env for t in out} == {"textcraft", "babyai", "sciworld", "movie"}
    return out


@pytest.fixture(scope="module")
def sciworld(trajs) -> Trajectory:
    t = max((t for t in trajs if t.env == "sciworld"), key=lambda t: t.n_steps)
    assert t.n_steps >= 6
    return t


def _fresh_tokenizer(smollm2_dir: str, template: str, specials: list[str] | None = None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    if specials:
        tok.add_tokens(specials, special_tokens=True)
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def llama3_tokenizer(smollm2_dir):
    """The SmolLM2 vocabulary with Llama-3's header/eot special tokens and a Llama-3.1-style template."""
    return _fresh_tokenizer(smollm2_dir, LLAMA3_TEMPLATE, LLAMA3_SPECIALS)


# Per template family: what surrounds an assistant content, as an independent oracle for the spans.
FAMILIES = {
    "chatml": dict(eot="<|im_end|>", after_eot="\n", header="<|im_start|>assistant\n", trim=False),
    "llama3": dict(eot="<|eot_id|>", after_eot="", header="<|start_header_id|>assistant<|end_header_id|>\n\n", trim=True),
}


@pytest.fixture(params=sorted(FAMILIES))
def family(request, smollm2_tokenizer, llama3_tokenizer):
    tok = smollm2_tokenizer if request.param == "chatml" else llama3_tokenizer
    return request.param, tok, FAMILIES[request.param]


# ------------------------------------------------------------------------------------------------ spans


def test_template_analysis_finds_end_of_turn(smollm2_tokenizer, llama3_tokenizer):
    chatml = get_template_info(smollm2_tokenizer)
    assert (chatml.turn_suffix, chatml.eot_text, chatml.eot_token) == ("<|im_end|>\n", "<|im_end|>", "<|im_end|>")
    assert chatml.eot_token_id == smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")
    llama = get_template_info(llama3_tokenizer)
    assert (llama.turn_suffix, llama.eot_text, llama.eot_token) == ("<|eot_id|>", "<|eot_id|>", "<|eot_id|>")
    # cached per tokenizer
    assert get_template_info(smollm2_tokenizer) is chatml


def test_input_ids_are_exactly_apply_chat_template(family, trajs):
    _, tok, _ = family
    for t in trajs:
        tt = tokenize_trajectory(tok, t)
        assert tt.input_ids == _act_ids(tok, _chat(t)), t.id
        assert tt.text == tok.apply_chat_template(_chat(t), tokenize=False)
        ex = build_example(tok, t, _select(t, set(range(t.n_steps))), max_length=None)
        assert ex.input_ids == tt.input_ids and ex.n_tokens == len(tt.input_ids)


def test_message_spans_tile_the_sequence(family, trajs):
    _, tok, _ = family
    for t in trajs:
        tt = tokenize_trajectory(tok, t)
        assert tt.message_spans[0][0] == 0 and tt.message_spans[-1][1] == len(tt.input_ids)
        for (_, e), (s, _) in zip(tt.message_spans, tt.message_spans[1:]):
            assert e == s
        # each message's tokens are exactly the tokens of render(messages[:i+1]) past render(messages[:i])
        for i in (0, 1, 2, len(t.messages) - 1):
            s, e = tt.message_spans[i]
            assert tt.input_ids[:e] == _act_ids(tok, _chat(t)[: i + 1]), (t.id, i)
        for i, (m, sup) in enumerate(zip(t.messages, tt.supervised_spans)):
            assert (sup is not None) == (m.role == "assistant")
            if sup is not None:
                s, e = tt.message_spans[i]
                assert s < sup[0] < sup[1] <= e


def test_supervised_span_is_content_plus_end_of_turn(family, trajs):
    """Oracle independent of the implementation: the message ends where apply_chat_template(messages[:i+1],
    tokenize=True) ends, minus the family's text after the end-of-turn token; its content tokens precede."""
    name, tok, fam = family
    eot_id = tok.convert_tokens_to_ids(fam["eot"])
    after = tok.encode(fam["after_eot"], add_special_tokens=False) if fam["after_eot"] else []
    for t in trajs:
        tt = tokenize_trajectory(tok, t)
        chat = _chat(t)
        for i, m in enumerate(t.messages):
            if m.role != "assistant":
                continue
            content = m.content.strip() if fam["trim"] else m.content
            content_ids = tok.encode(content, add_special_tokens=False)
            end = len(_act_ids(tok, chat[: i + 1])) - len(after)
            start = end - 1 - len(content_ids)
            assert tt.supervised_spans[i] == (start, end), (name, t.id, i)
            assert tt.input_ids[start:end] == content_ids + [eot_id]
            assert tt.input_ids[end : tt.message_spans[i][1]] == after  # the newline after <|im_end|> is not supervised
            assert _decode(tok, tt.input_ids[start:end]) == content + fam["eot"]
            # the role header sits right before, outside the span (compared as text: "\n\n" alone is one token)
            assert _decode(tok, tt.input_ids[tt.message_spans[i][0] : start]).endswith(fam["header"])
        assert tt.step_spans == [tt.supervised_spans[i] for i in t.step_message_index()]


def test_leading_newline_in_an_action_is_supervised(smollm2_tokenizer, llama3_tokenizer, trajs):
    """movie_118's last action starts with "\\n": under ChatML the header's "\\n" and the content's "\\n" stay
    separate tokens and the content one is supervised; under Llama-3 (`| trim`) it is not rendered at all,
    and the header's "\\n\\n" must not be mistaken for content."""
    t = next(t for t in trajs if t.id == "movie_118")
    k = next(s.step for s in t.steps if s.content.startswith("\n"))
    for tok, rendered, eot in (
        (smollm2_tokenizer, t.steps[k].content, "<|im_end|>"),
        (llama3_tokenizer, t.steps[k].content.strip(), "<|eot_id|>"),
    ):
        tt = tokenize_trajectory(tok, t)
        a, b = tt.step_spans[k]
        assert _decode(tok, tt.input_ids[a:b]) == rendered + eot


# ------------------------------------------------------------------------------------------------ labels


@pytest.mark.parametrize("which", ["first", "last", "middle_pair", "all"])
def test_labels_cover_exactly_the_selected_steps(family, trajs, which):
    name, tok, fam = family
    for t in trajs:
        n = t.n_steps
        chosen = {"first": {0}, "last": {n - 1}, "middle_pair": {n // 2, n // 2 + 1} & set(range(n)), "all": set(range(n))}[which]
        ex = build_example(tok, t, _select(t, chosen), max_length=None)
        tt = tokenize_trajectory(tok, t)
        want = [IGNORE_INDEX] * len(tt.input_ids)
        for k in chosen:
            a, b = tt.step_spans[k]
            want[a:b] = tt.input_ids[a:b]
        assert ex.labels == want, (name, t.id, which)
        assert ex.n_supervised == sum(b - a for k, (a, b) in enumerate(tt.step_spans) if k in chosen)
        assert ex.n_supervised == sum(x != IGNORE_INDEX for x in ex.labels)
        assert ex.n_assistant_tokens == sum(b - a for a, b in tt.step_spans)
        assert ex.step_spans == tt.step_spans
        assert ex.n_selected_tokens_lost == 0 and ex.traj_id == t.id
        # the decoded labels of each selected step are its content and the end-of-turn token, nothing else
        for k in chosen:
            a, b = ex.step_spans[k]
            content = t.steps[k].content.strip() if fam["trim"] else t.steps[k].content
            assert _decode(tok, ex.labels[a:b]) == content + fam["eot"]


def test_ok_turn_is_never_supervised(family, trajs):
    _, tok, _ = family
    for t in trajs:
        ok = next(i for i, m in enumerate(t.messages) if m.role == "assistant" and not m.trainable)
        assert t.messages[ok].content.lower().startswith("ok")  # "OK. I'll follow..." / "Ok."
        ex = build_example(tok, t, _select(t, set(range(t.n_steps))), max_length=None)
        s, e = tokenize_trajectory(tok, t).message_spans[ok]
        assert all(x == IGNORE_INDEX for x in ex.labels[s:e])
        # and nothing outside assistant steps is labelled: user turns and headers stay context
        labelled = {j for j, x in enumerate(ex.labels) if x != IGNORE_INDEX}
        assert labelled == {j for a, b in ex.step_spans for j in range(a, b)}


def test_selection_must_match_the_trajectory(smollm2_tokenizer, trajs):
    t, other = trajs[0], trajs[1]
    with pytest.raises(DataError, match="steps"):
        build_example(smollm2_tokenizer, t, Selection(id=t.id, selector="x", ratio=0.5, steps=[]), 100)
    with pytest.raises(DataError, match=other.id):
        build_example(smollm2_tokenizer, t, _select(other, {0}), 100)


# ------------------------------------------------------------------------------------------------ truncation


def test_truncation_keeps_the_beginning_and_counts_lost_selected_tokens(family, sciworld):
    _, tok, _ = family
    t = sciworld
    chosen = {1, 3, t.n_steps - 1}
    full = build_example(tok, t, _select(t, chosen), max_length=None)
    a, b = full.step_spans[3]
    cut = (a + b) // 2  # inside selected step 3
    ex = build_example(tok, t, _select(t, chosen), max_length=cut)
    assert ex.input_ids == full.input_ids[:cut] and ex.labels == full.labels[:cut]
    assert ex.n_tokens == cut and ex.n_tokens_full == len(full.input_ids)
    lost = (b - cut) + (full.step_spans[-1][1] - full.step_spans[-1][0])
    assert ex.n_selected_tokens_lost == lost
    assert ex.n_supervised == full.n_supervised - lost
    assert ex.n_assistant_tokens == full.n_assistant_tokens  # counted before truncation
    assert ex.step_spans == full.step_spans


def test_nothing_left_to_supervise_raises_or_skips(family, sciworld):
    _, tok, _ = family
    t = sciworld
    last = t.n_steps - 1
    sel = _select(t, {last})
    start = tokenize_trajectory(tok, t).step_spans[last][0]
    with pytest.raises(DataError, match=t.id) as err:
        build_example(tok, t, sel, max_length=start)
    assert "max_length" in str(err.value)
    assert build_example(tok, t, sel, max_length=start, on_empty="skip") is None
    # one token more and the first token of the step is trained
    assert build_example(tok, t, sel, max_length=start + 1).n_supervised == 1
    # a selection that marks nothing is just as empty
    with pytest.raises(DataError, match="marks no step"):
        build_example(tok, t, _select(t, set()), max_length=None)


def test_truncate_after_last_selected_drops_exactly_the_tail(family, sciworld):
    _, tok, _ = family
    t = sciworld
    sel = _select(t, {1, 2})
    full = build_example(tok, t, sel, max_length=None)
    assert full.n_tokens == full.n_tokens_full  # off by default
    end = full.step_spans[2][1]
    ex = build_example(tok, t, sel, max_length=None, truncate_after_last_selected=True)
    assert ex.input_ids == full.input_ids[:end] and ex.labels == full.labels[:end]
    assert ex.n_supervised == full.n_supervised and ex.n_selected_tokens_lost == 0
    assert ex.labels[-1] == tok.convert_tokens_to_ids(FAMILIES[family[0]]["eot"])
    # with a tighter max_length, max_length wins and the loss is counted
    cut = full.step_spans[2][0] + 2
    ex2 = build_example(tok, t, sel, max_length=cut, truncate_after_last_selected=True)
    assert ex2.n_tokens == cut and ex2.n_selected_tokens_lost == end - cut


def test_build_examples_counts_skipped_and_tokens(smollm2_tokenizer, trajs, sciworld):
    tok = smollm2_tokenizer
    last = sciworld.n_steps - 1
    cut = tokenize_trajectory(tok, sciworld).step_spans[last][0]
    sels = [_select(t, {t.n_steps - 1} if t is sciworld else {0}) for t in trajs]
    exs, stats = build_examples(tok, trajs, sels, max_length=cut, on_empty="skip", progress=False)
    assert stats["n_trajectories"] == len(trajs)
    assert stats["n_skipped_empty"] >= 1 and sciworld.id not in {e.traj_id for e in exs}
    assert stats["n_examples"] == len(exs) == len(trajs) - stats["n_skipped_empty"]
    assert stats["n_tokens"] == sum(e.n_tokens for e in exs)
    assert stats["n_supervised_tokens"] == sum(e.n_supervised for e in exs)
    assert stats["n_selected_tokens_lost"] >= tokenize_trajectory(tok, sciworld).step_spans[last][1] - cut
    assert stats["supervised_share"] == pytest.approx(stats["n_supervised_tokens"] / stats["n_tokens"])
    assert all(e.n_tokens <= cut for e in exs)
    with pytest.raises(DataError, match=sciworld.id):
        build_examples(tok, trajs, sels, max_length=cut, on_empty="error", progress=False)
    with pytest.raises(DataError, match="aligned"):
        build_examples(tok, trajs, sels[:-1], max_length=cut, progress=False)


# ------------------------------------------------------------------------------------------------ bad templates


def test_loop_last_template_breaks_prefix_property(smollm2_dir, trajs):
    """Caught on the probe conversation already, before any trajectory is touched."""
    tok = _fresh_tokenizer(smollm2_dir, LOOP_LAST_TEMPLATE)
    t = trajs[0]
    with pytest.raises(TemplateError) as err:
        build_example(tok, t, _select(t, {0}), max_length=None)
    msg = str(err.value)
    assert "prefix property" in msg and "adding message 1 (assistant)" in msg and "message 0 (user)" in msg
    assert "'endoftext|>' becomes 'im_end|>" in msg and "chat template sha1:" in msg


def test_template_stripping_old_reasoning_breaks_prefix_property(smollm2_dir):
    tok = _fresh_tokenizer(smollm2_dir, STRIP_THINKING_TEMPLATE)
    turns = [
        ("user", "Task: open the door.", True, None),
        ("assistant", "<think>look first</think>\nAction: look", True, None),
        ("user", "You see a door.", True, None),
        ("assistant", "<think>open it</think>\nAction: open door", True, None),
    ]
    t = Trajectory(id="think-1", env="synthetic", messages=number_steps(turns, source="think-1"))
    with pytest.raises(TemplateError) as err:
        tokenize_trajectory(tok, t)
    msg = str(err.value)
    assert "prefix property" in msg and "trajectory 'think-1'" in msg
    assert "adding message 2 (user)" in msg and "message 1 (assistant)" in msg


def test_template_without_end_of_turn_token_is_refused(smollm2_dir, trajs):
    tok = _fresh_tokenizer(smollm2_dir, PLAIN_TEMPLATE)
    with pytest.raises(TemplateError, match="no special token after an assistant turn"):
        build_example(tok, trajs[0], _select(trajs[0], {0}), max_length=None)


def test_span_boundary_inside_a_token_is_refused(smollm2_dir, trajs):
    tok = _fresh_tokenizer(smollm2_dir, SPACE_HEADER_TEMPLATE)
    t = trajs[0]
    with pytest.raises(TemplateError, match="falls inside a token") as err:
        tokenize_trajectory(tok, t)
    assert "message 1 (assistant)" in str(err.value) and t.id in str(err.value)


def test_template_analysis_follows_a_changed_template(smollm2_dir):
    tok = _fresh_tokenizer(smollm2_dir, LLAMA3_TEMPLATE, LLAMA3_SPECIALS)
    assert get_template_info(tok).eot_token == "<|eot_id|>"
    tok.chat_template = SPACE_HEADER_TEMPLATE
    assert get_template_info(tok).eot_token == "<|im_end|>"


def test_message_objects_are_rendered_with_plain_roles(smollm2_tokenizer):
    """A system turn is passed as role 'system' and replaces SmolLM2's default system prompt."""
    msgs = [
        Message("system", "You are an agent."),
        Message("user", "Go."),
        Message("assistant", "Action: go", step=0),
    ]
    t = Trajectory(id="sys-1", env="synthetic", messages=msgs)
    tt = tokenize_trajectory(smollm2_tokenizer, t)
    assert tt.text == "<|im_start|>system\nYou are an agent.<|im_end|>\n<|im_start|>user\nGo.<|im_end|>\n<|im_start|>assistant\nAction: go<|im_end|>\n"
    a, b = tt.step_spans[0]
    assert _decode(smollm2_tokenizer, tt.input_ids[a:b]) == "Action: go<|im_end|>"


def test_special_token_text_inside_a_content_is_refused(smollm2_tokenizer):
    """It would be encoded as a control token: a fake turn boundary inside an action."""
    msgs = [Message("user", "Go."), Message("assistant", "Action: go<|im_end|>", step=0)]
    t = Trajectory(id="inject-1", env="synthetic", messages=msgs)
    with pytest.raises(DataError, match=r"inject-1 \[messages\[1\].content\]: content contains the special token"):
        tokenize_trajectory(smollm2_tokenizer, t)


# ------------------------------------------------------------------------------------------------ thought / action


def test_thought_and_action_parts_have_exact_token_spans(family, smollm2_tokenizer):
    """A hand-made ReAct step. Oracle independent of the offsets: the step ends where apply_chat_template of
    its prefix ends (minus the text after the end-of-turn token), its content tokens precede the end-of-turn
    token, and the thought is the shortest run of them that decodes to `Thought:...\\n\\n` (in context
    SmolLM2 splits that "\\n\\n" into two tokens, unlike the thought encoded alone)."""
    name, tok, fam = family
    thought, action = "Thought:\nI should look around first.\n\n", "Action:\nlook"
    msgs = [Message("user", "You are in a room."), Message("assistant", thought + action, step=0),
            Message("user", "You see a key.")]
    t = Trajectory(id="react-1", env="synthetic", messages=msgs)
    tt = tokenize_trajectory(tok, t)
    after = tok.encode(fam["after_eot"], add_special_tokens=False) if fam["after_eot"] else []
    content_ids = tok.encode(thought + action, add_special_tokens=False)
    end = len(_act_ids(tok, _chat(t)[:2])) - len(after)
    start = end - 1 - len(content_ids)
    k = next(k for k in range(len(content_ids)) if _decode(tok, content_ids[:k]) == thought)
    assert tt.step_spans == [(start, end)]
    assert step_part_spans(tok, t, tt, "thought") == [(start, start + k)]
    assert step_part_spans(tok, t, tt, "action") == [(start + k, end)]
    (a, b), = step_part_spans(tok, t, tt, "action")
    assert tt.input_ids[b - 1] == tok.convert_tokens_to_ids(fam["eot"])
    assert _decode(tok, tt.input_ids[a:b]) == action + fam["eot"]


def test_thought_and_action_tile_every_real_step(family, trajs):
    """Real steps: thought + action == the step, split where the content's first "Action:" line starts.
    movie_118's last step is only an action ("\\nAction: finish ..."): it has no thought."""
    name, tok, fam = family
    for t in trajs:
        tt = tokenize_trajectory(tok, t)
        thoughts = step_part_spans(tok, t, tt, "thought", on_missing="skip")
        actions = step_part_spans(tok, t, tt, "action")
        for k, ((s, e), th, (as_, ae)) in enumerate(zip(tt.step_spans, thoughts, actions)):
            content = t.steps[k].content.strip() if fam["trim"] else t.steps[k].content
            j = 0 if content.startswith("Action:") else content.index("\nAction:") + 1
            assert ae == e and _decode(tok, tt.input_ids[as_:ae]) == content[j:] + fam["eot"], (name, t.id, k)
            if not content[:j].strip():
                assert th is None and (t.id, k) == ("movie_118", t.n_steps - 1)
                continue
            assert th == (s, as_) and s < as_ < e, (name, t.id, k)
            assert _decode(tok, tt.input_ids[s:as_]) == content[:j], (name, t.id, k)
    assert any(t.id == "movie_118" for t in trajs)


def test_action_labels_only_the_action_part(family, trajs):
    name, tok, fam = family
    t = trajs[0]
    sel = _select(t, {0, t.n_steps - 1})
    ex = build_example(tok, t, sel, max_length=None, supervise="action")
    tt = tokenize_trajectory(tok, t)
    actions = step_part_spans(tok, t, tt, "action")
    want = [IGNORE_INDEX] * len(tt.input_ids)
    for k in (0, t.n_steps - 1):
        a, b = actions[k]
        want[a:b] = tt.input_ids[a:b]
    assert ex.labels == want and ex.weights is None
    assert ex.n_supervised == sum(actions[k][1] - actions[k][0] for k in (0, t.n_steps - 1))


def test_a_step_without_the_part_asked_for_is_an_error_naming_it(smollm2_tokenizer):
    msgs = [Message("user", "Go."), Message("assistant", "Thought:\nfine.\n\nAction:\ngo", step=0),
            Message("user", "Ok."), Message("assistant", "I will just go north.", step=1)]
    t = Trajectory(id="noact-7", env="synthetic", messages=msgs)
    tt = tokenize_trajectory(smollm2_tokenizer, t)
    for part in ("thought", "action"):
        with pytest.raises(DataError, match=r"noact-7 \[messages\[3\] \(step 1\)\]: train.supervise=" + part):
            step_part_spans(smollm2_tokenizer, t, tt, part)
    only_action = Trajectory(id="bare-2", env="synthetic", messages=[Message("user", "Go."),
                                                                     Message("assistant", "Action:\ngo", step=0)])
    tt = tokenize_trajectory(smollm2_tokenizer, only_action)
    assert step_part_spans(smollm2_tokenizer, only_action, tt, "action") == tt.step_spans
    with pytest.raises(DataError, match="no thought before its 'Action:' line"):
        step_part_spans(smollm2_tokenizer, only_action, tt, "thought")
    # on_missing_part=skip: that step is not supervised, and counted
    sel = Selection(id="bare-2", selector="t", ratio=1.0, steps=[StepChoice(step=0, score=1.0, selected=True)])
    assert build_example(smollm2_tokenizer, only_action, sel, None, on_empty="skip", supervise="thought",
                         on_missing_part="skip") is None
    sel = _select(t, {0, 1})
    ex = build_example(smollm2_tokenizer, t, sel, None, supervise="action", on_missing_part="skip")
    assert ex.n_steps_missing_part == 1 and ex.n_supervised == ex.n_selected_tokens
    with pytest.raises(DataError, match="noact-7"):
        build_example(smollm2_tokenizer, t, sel, None, supervise="action")
