"""Tool-calling trajectories through the chat template: calls in the template's own syntax where it has
one (a ChatML template with tool syntax written for these tests), their text form where it has none
(SmolLM2's own template), tool results and tool definitions where the template puts them, and exact
supervised spans in both cases."""

from __future__ import annotations

import copy
import json

import pytest

from atlas_exp.data.importers import convert_record
from atlas_exp.selectors.base import Selection, StepChoice
from atlas_exp.train.chat_template import get_template_info
from atlas_exp.train.masking import IGNORE_INDEX, build_example
from atlas_exp.train.turn_spans import tokenize_trajectory

# ChatML with tools in the system turn, calls as <call>name(args)</call>, and consecutive tool results
# grouped into one user turn (as several public templates do with parallel calls)
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n"
    "{% if messages[0].role == 'system' %}{{ messages[0].content }}\n{% endif %}"
    "Functions:{% for t in tools %}\n{{ t.function | tojson }}{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'system' and tools %}"
    "{% elif m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n"
    "{% if m.content %}{{ m.content }}\n{% endif %}"
    "{% for c in m.tool_calls %}<call>{{ c.function.name }}({{ c.function.arguments | tojson }})</call>{% endfor %}"
    "<|im_end|>\n"
    "{% elif m.role == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1].role != 'tool' %}<|im_start|>user\n{% endif %}"
    "<result>{{ m.content }}</result>"
    "{% if loop.last or messages[loop.index0 + 1].role != 'tool' %}<|im_end|>\n{% endif %}"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def call(i: str, city: str) -> dict:
    return {"id": i, "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}


RECORD = {
    "id": "weather_1",
    "tools": TOOLS,
    "messages": [
        {"role": "system", "content": "You answer weather questions."},
        {"role": "user", "content": "Is it warmer in Paris or in Lyon?"},
        {"role": "assistant", "content": "I will look both up.", "tool_calls": [call("c1", "Paris"), call("c2", "Lyon")]},
        {"role": "tool", "tool_call_id": "c1", "content": "Paris: 14C, rain"},
        {"role": "tool", "tool_call_id": "c2", "content": "Lyon: 19C, sun"},
        {"role": "assistant", "content": "Lyon is warmer (19C against 14C)."},
    ],
}


@pytest.fixture(scope="module")
def tool_tokenizer(smollm2_tokenizer):
    tok = copy.deepcopy(smollm2_tokenizer)
    tok.chat_template = TOOL_TEMPLATE
    return tok


def test_templates_are_probed_for_tool_support(smollm2_tokenizer, tool_tokenizer):
    plain = get_template_info(smollm2_tokenizer)
    assert (plain.tool_calls, plain.tools) == (False, False)
    assert plain.tool_role  # SmolLM2 writes any role name: <|im_start|>tool
    tools = get_template_info(tool_tokenizer)
    assert (tools.tool_calls, tools.tool_role, tools.tools) == (True, True, True)


def test_tool_calls_render_in_the_templates_syntax_with_exact_spans(tool_tokenizer):
    traj = convert_record(RECORD, where="weather.jsonl:1")
    tt = tokenize_trajectory(tool_tokenizer, traj)
    want = tool_tokenizer.apply_chat_template(
        [{"role": "system", "content": "You answer weather questions."},
         {"role": "user", "content": "Is it warmer in Paris or in Lyon?"},
         {"role": "assistant", "content": "I will look both up.", "tool_calls": [
             {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
             {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Lyon"}}}]},
         {"role": "tool", "tool_call_id": "c1", "content": "Paris: 14C, rain"},
         {"role": "tool", "tool_call_id": "c2", "content": "Lyon: 19C, sun"},
         {"role": "assistant", "content": "Lyon is warmer (19C against 14C)."}],
        tools=TOOLS, tokenize=False)
    assert tt.text == want
    # the definitions where the template writes them (its system turn)
    assert tt.text.startswith('<|im_start|>system\nYou answer weather questions.\nFunctions:{"name": "get_weather"')
    assert "<|im_start|>user\n<result>Paris: 14C, rain</result><result>Lyon: 19C, sun</result><|im_end|>" in tt.text
    got = [tool_tokenizer.decode(tt.input_ids[a:b]) for a, b in tt.step_spans]
    assert got == ['I will look both up.\n<call>get_weather({"city": "Paris"})</call><call>get_weather({"city": "Lyon"})</call><|im_end|>',
                   "Lyon is warmer (19C against 14C).<|im_end|>"]
    # the two tool results are one block in this template: the first one's span is empty, the second owns it
    (a3, b3), (a4, b4) = tt.message_char_spans[3], tt.message_char_spans[4]
    assert a3 == b3 == a4 and tt.text[a4:b4].startswith("<|im_start|>user\n<result>Paris")

    sel = Selection(id=traj.id, selector="t", ratio=0.5, steps=[StepChoice(0, 1.0, True), StepChoice(1, 0.0, False)])
    ex = build_example(tool_tokenizer, traj, sel, max_length=None)
    sup = [t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE_INDEX]
    assert tool_tokenizer.decode(sup) == got[0]


def test_without_tool_syntax_the_calls_render_as_text(smollm2_tokenizer):
    rec = {**RECORD, "messages": [m for m in RECORD["messages"] if m["role"] != "system"]}
    traj = convert_record(rec, where="weather.jsonl:2")
    tt = tokenize_trajectory(smollm2_tokenizer, traj)
    # the definitions are written at the start of the first turn, the calls in their text form
    assert "<|im_start|>user\nAvailable tools:\n{\"name\": \"get_weather\"" in tt.text
    got = [smollm2_tokenizer.decode(tt.input_ids[a:b]) for a, b in tt.step_spans]
    assert got[0] == ('I will look both up.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
                      '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lyon"}}\n</tool_call><|im_end|>')
    assert "<|im_start|>tool\nParis: 14C, rain<|im_end|>" in tt.text
