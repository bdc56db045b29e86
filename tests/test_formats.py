"""Bringing your own trajectories: field and role mapping for any list of messages, OpenAI tool calling,
ReAct text transcripts, input/output pairs, and the file-level rough edges (byte-order marks, files a
folder does not read, empty sources, suspicious trajectories).

The transcripts here are written for these tests in the two layouts public agent datasets use (ReAct's
numbered `Thought n:/Action n:/Observation n:` lines, and ALFWorld-style `> action` lines), each after a
few-shot prefix as they are stored.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from hydra.utils import instantiate

from atlas_exp.config import compose
from atlas_exp.data.sources import LocalFiles, load_trajectories
from atlas_exp.data.trajectory import Trajectory
from atlas_exp.errors import ConfigError, DataError


def write_jsonl(path: Path, rows: list, *, bom: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return path


def load(path, **kw):
    return load_trajectories(LocalFiles(str(path), **kw), progress=False).trajectories


def turns(t: Trajectory) -> list[tuple]:
    return [(m.role, m.content, m.step) for m in t.messages]


# --- field and role mapping ----------------------------------------------------------------------------

# a role/content/loss file under `conversations`, as some converters write AgentGym data
ROLE_CONTENT_LOSS = {
    "id": "webshop_7",
    "conversations": [
        {"role": "user", "content": "You are web shopping. Instruction: find a red mug under $10.", "loss": None},
        {"role": "assistant", "content": "OK.", "loss": False},
        {"role": "user", "content": "Observation: [Search]", "loss": None},
        {"role": "assistant", "content": "Thought: search first.\nAction: search[red mug]", "loss": True},
        {"role": "user", "content": "Observation: [Back to Search] [B01] Red Mug $8.99", "loss": None},
        {"role": "assistant", "content": "Action: click[B01]", "loss": True},
    ],
}


def test_role_content_loss_under_conversations_needs_no_option(tmp_path):
    (t,) = load(write_jsonl(tmp_path / "d.jsonl", [ROLE_CONTENT_LOSS]))
    assert [m.role for m in t.messages] == ["user", "assistant", "user", "assistant", "user", "assistant"]
    assert not t.messages[1].trainable and t.n_steps == 2 and t.env == "webshop"


@pytest.mark.parametrize("fmt", ["generic", "openai", "agentgym", "auto"])
def test_loss_false_is_honoured_in_every_format(tmp_path, fmt):
    rec = {"id": "maze_1", "messages" if fmt != "agentgym" else "conversations": [
        {"role" if fmt != "agentgym" else "from": r, "content" if fmt != "agentgym" else "value": c, **extra}
        for r, c, extra in [("user", "go", {}), ("assistant", "OK.", {"loss": False}), ("user", "obs 1", {}),
                            ("assistant", "move up", {"loss": True}), ("user", "obs 2", {}),
                            ("assistant", "move left", {"weight": 0}), ("user", "obs 3", {}),
                            ("assistant", "move down", {"trainable": False}), ("user", "obs 4", {}),
                            ("assistant", "stop", {})]]}
    (t,) = load(write_jsonl(tmp_path / "d.jsonl", [rec]), format=fmt)
    assert [m.content for m in t.steps] == ["move up", "stop"]


def test_custom_keys_and_role_names(tmp_path):
    rec = {"episode": "babyai_3", "dialog": [
        {"speaker": "env", "text": "Your goal: go to the red ball."},
        {"speaker": "agent", "text": "Thought: it is ahead.\nAction: move forward", "train": True},
        {"speaker": "env", "text": "You see a red ball."},
        {"speaker": "agent", "text": "Action: done", "train": False},
    ]}
    path = write_jsonl(tmp_path / "babyai_custom.jsonl", [rec])
    opts = dict(messages_key="dialog", role_key="speaker", content_key="text", loss_key="train",
                roles={"user": ["env"], "assistant": "agent"})
    (t,) = load(path, **opts)
    assert turns(t) == [("user", rec["dialog"][0]["text"], None), ("assistant", rec["dialog"][1]["text"], 0),
                        ("user", "You see a red ball.", None), ("assistant", "Action: done", None)]
    assert t.env == "babyai" and t.meta == {"episode": "babyai_3"}

    # without the mapping the errors name what to set
    with pytest.raises(DataError, match=r"cannot tell the record's format.*Set data.messages_key"):
        load(path)
    with pytest.raises(DataError, match=r"\[dialog\[0\]\.role\]: missing role; .*set data.role_key"):
        load(path, messages_key="dialog")
    with pytest.raises(DataError, match=r"\[dialog\[0\]\.speaker\]: unknown role 'env'.*data.roles"):
        load(path, messages_key="dialog", role_key="speaker")
    with pytest.raises(DataError, match=r"\[dialog\[0\]\.content\]: missing content; .*set data.content_key"):
        load(path, messages_key="dialog", role_key="speaker", roles={"user": ["env"], "assistant": ["agent"]})


def test_mapping_options_are_checked():
    with pytest.raises(ConfigError, match="'bot' is not a role"):
        LocalFiles("x.jsonl", roles={"bot": ["gpt"]})
    with pytest.raises(ConfigError, match="transcript: unknown option"):
        LocalFiles("x.jsonl", transcript={"marker": "Act"})
    with pytest.raises(ConfigError, match="both an agent and an observation marker"):
        LocalFiles("x.jsonl", transcript={"agent_markers": ["Action"], "observation_markers": ["Action"]})


def test_data_local_passes_the_mapping_options_to_its_source(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"id": "a_1", "turns": [{"who": "q", "say": "hi"}, {"who": "a", "say": "yo"}]}])
    cfg = compose(["data=local", f"data.path={path}", "data.messages_key=turns", "data.role_key=who",
                   "data.content_key=say", "data.roles={user: [q], assistant: [a]}", "data.env=chat"])
    (t,) = load_trajectories(instantiate(cfg.data.sources[0]), progress=False).trajectories
    assert turns(t) == [("user", "hi", None), ("assistant", "yo", 0)] and t.env == "chat"


# --- OpenAI tool calling -------------------------------------------------------------------------------

TOOLS = [{"type": "function", "function": {
    "name": "search_flights", "description": "Search flights between two airports on a date",
    "parameters": {"type": "object", "properties": {"origin": {"type": "string"}, "dest": {"type": "string"},
                                                    "date": {"type": "string"}}, "required": ["origin", "dest"]}}}]

TOOL_RECORD = {
    "id": "travel_1",
    "tools": TOOLS,
    "messages": [
        {"role": "system", "content": "You book travel."},
        {"role": "user", "content": [{"type": "text", "text": "Find me a flight"}, {"type": "text", "text": "SFO to JFK on May 3."}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_a", "type": "function",
             "function": {"name": "search_flights", "arguments": "{\"origin\": \"SFO\", \"dest\": \"JFK\", \"date\": \"05-03\"}"}}]},
        {"role": "tool", "tool_call_id": "call_a", "content": "[{\"flight\": \"UA 12\", \"price\": 320}]"},
        {"role": "assistant", "content": "UA 12 leaves at 8:05 for $320.", "weight": 1},
    ],
}


def test_openai_tool_calls_are_steps_and_tool_results_observations(tmp_path):
    (t,) = load(write_jsonl(tmp_path / "travel.jsonl", [TOOL_RECORD]))
    assert [m.role for m in t.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert t.messages[1].content == "Find me a flight\nSFO to JFK on May 3."  # text parts joined
    call = t.messages[2]
    assert call.step == 0 and call.raw_content is None
    assert call.tool_calls == ({"id": "call_a", "type": "function", "function": {
        "name": "search_flights", "arguments": {"origin": "SFO", "dest": "JFK", "date": "05-03"}}},)
    # what selectors and reports read: the call in text form
    assert call.content == '<tool_call>\n{"name": "search_flights", "arguments": {"origin": "SFO", "dest": "JFK", "date": "05-03"}}\n</tool_call>'
    assert t.messages[3].tool_call_id == "call_a" and t.messages[4].step == 1
    assert t.tools == TOOLS

    # the canonical file keeps OpenAI's layout and reads back to the same trajectory
    d = t.to_dict()
    assert d["messages"][2]["content"] is None and d["messages"][2]["tool_calls"][0]["function"]["name"] == "search_flights"
    (back,) = load(write_jsonl(tmp_path / "trajectories.jsonl", [d]))
    assert back.to_dict() | {"source": ""} == d | {"source": ""}
    assert Trajectory.from_dict(json.loads(json.dumps(d))).to_dict() == d


def test_legacy_function_call_and_llama_factory_function_call_turns(tmp_path):
    legacy = {"id": "t_1", "functions": [TOOLS[0]["function"]], "messages": [
        {"role": "user", "content": "flights SFO-JFK"},
        {"role": "assistant", "content": "Searching.", "function_call": {"name": "search_flights", "arguments": "{\"origin\": \"SFO\", \"dest\": \"JFK\"}"}},
        {"role": "function", "name": "search_flights", "content": "none found"},
        {"role": "assistant", "content": "No flights."}]}
    lf = {"id": "t_2", "tools": json.dumps(TOOLS), "conversations": [
        {"from": "human", "value": "flights SFO-JFK"},
        {"from": "function_call", "value": "{\"name\": \"search_flights\", \"arguments\": {\"origin\": \"SFO\", \"dest\": \"JFK\"}}"},
        {"from": "observation", "value": "none found"},
        {"from": "gpt", "value": "No flights."}]}
    a, b = load(write_jsonl(tmp_path / "x.jsonl", [legacy, lf]), env="travel")
    assert a.messages[1].raw_content == "Searching." and a.messages[1].content.startswith("Searching.\n<tool_call>")
    assert a.messages[2].role == "tool" and a.messages[2].name == "search_flights"
    assert a.tools == TOOLS == b.tools
    assert a.messages[1].tool_calls == b.messages[1].tool_calls
    assert [m.role for m in b.messages] == ["user", "assistant", "tool", "assistant"] and b.n_steps == 2


# --- ReAct transcripts ---------------------------------------------------------------------------------

REACT_FEW_SHOT = """Answer a question with interleaved Thought, Action and Observation steps. Actions are \
Search[entity], Lookup[keyword] and Finish[answer].
Question: Which city hosted the first modern Olympic Games?
Thought 1: I should search for the first modern Olympics.
Action 1: Search[1896 Summer Olympics]
Observation 1: The 1896 Summer Olympics were held in Athens, Greece.
Thought 2: They were held in Athens.
Action 2: Finish[Athens]
"""

REACT_TASK = """Question: Is the Danube longer than the Rhine?
Thought 1: I need the length of both rivers. I will start with the Danube.
Action 1: Search[Danube]
Observation 1: The Danube flows 2,850 km from the Black Forest to the Black Sea.
Thought 2: Now the Rhine.
Action 2: Search[Rhine]
Observation 2: Could not find [Rhine]. Similar: ['Rhine', 'Rhine (disambiguation)'].
Thought 3: The search needs the exact title. I will try again.
Action 3: Search[Rhine river]
Observation 3: The Rhine is a river of about 1,230 km that rises in the Swiss Alps.
Thought 4: 2,850 km is more than 1,230 km, so the Danube is longer.
Action 4: Finish[yes]"""


def test_react_transcript_with_a_few_shot_prefix(tmp_path):
    rec = {"id": "hotpotqa_12", "text": REACT_FEW_SHOT + REACT_TASK, "answer": "yes"}
    path = write_jsonl(tmp_path / "hotpot.jsonl", [rec])
    (t,) = load(path, format="transcript", transcript={"start_marker": "Question:"})
    assert [m.role for m in t.messages] == ["user"] + ["assistant", "user"] * 3 + ["assistant"]
    assert t.messages[0].content == "Question: Is the Danube longer than the Rhine?"
    assert t.messages[1].content == ("Thought 1: I need the length of both rivers. I will start with the Danube.\n"
                                     "Action 1: Search[Danube]")
    assert t.messages[4].content.startswith("Observation 2: Could not find [Rhine].")
    assert t.steps[-1].content == ("Thought 4: 2,850 km is more than 1,230 km, so the Danube is longer.\n"
                                   "Action 4: Finish[yes]")
    assert t.n_steps == 4 and t.env == "hotpotqa" and t.meta == {"answer": "yes"}

    # keep_prefix keeps the few-shot example in the task
    (kept,) = load(path, format="transcript", transcript={"start_marker": "Question:", "keep_prefix": True})
    assert kept.messages[0].content == REACT_FEW_SHOT.strip() + "\n\n" + "Question: Is the Danube longer than the Rhine?"
    # without start_marker the example's steps become steps, and the real question lands inside one of them
    (whole,) = load(path, format="transcript")
    assert whole.n_steps == 5 and "Question: Is the Danube" in whole.steps[1].content


def test_react_transcript_with_a_prompt_field_and_custom_markers(tmp_path):
    text = """Think: the key is probably in the drawer.
Act: open drawer
Env: The drawer is open. You see a key.
Act: take key
Env: You take the key."""
    rec = {"task": "Find the key and take it.", "log": text}
    path = write_jsonl(tmp_path / "rooms.jsonl", [rec])
    opts = {"text_key": "log", "prompt_key": "task", "agent_markers": ["Think", "Act"], "observation_markers": ["Env"]}
    (t,) = load(path, format="transcript", transcript=opts)
    assert turns(t) == [("user", "Find the key and take it.", None),
                        ("assistant", "Think: the key is probably in the drawer.\nAct: open drawer", 0),
                        ("user", "Env: The drawer is open. You see a key.", None), ("assistant", "Act: take key", 1),
                        ("user", "Env: You take the key.", None)]
    with pytest.raises(DataError, match=r"rooms.jsonl:1 \[log\]: no agent turn: no line starts with an agent marker"):
        load(path, format="transcript", transcript={"text_key": "log"})


ALFWORLD_STYLE = """Interact with a household to solve a task. Here is an example.
You are in the middle of a room. Looking quickly around you, you see a drawer 1, a shelf 1, and a sinkbasin 1.
Your task is to: put a clean cup on shelf.
> go to sinkbasin 1
On the sinkbasin 1, you see a cup 2.
> take cup 2 from sinkbasin 1
You pick up the cup 2 from the sinkbasin 1.
> clean cup 2 with sinkbasin 1
You clean the cup 2 using the sinkbasin 1.
> go to shelf 1
On the shelf 1, you see nothing.
> put cup 2 in/on shelf 1
You put the cup 2 in/on the shelf 1.

Here is the task.
You are in the middle of a room. Looking quickly around you, you see a countertop 1, a fridge 1, and a cabinet 1.
Your task is to: put a cool apple in cabinet.
> think: First I need an apple. The countertop is the likeliest place.
OK.
> go to countertop 1
On the countertop 1, you see an apple 1, and a knife 1.
> take apple 1 from countertop 1
You pick up the apple 1 from the countertop 1.
> cool apple 1 with fridge 1
You cool the apple 1 using the fridge 1.
> go to cabinet 1
The cabinet 1 is closed.
> open cabinet 1
You open the cabinet 1. The cabinet 1 is open. In it, you see nothing.
> put apple 1 in/on cabinet 1
You put the apple 1 in/on the cabinet 1.
"""


def test_prompt_line_transcripts(tmp_path):
    path = write_jsonl(tmp_path / "alfworld_react.jsonl", [{"id": "cool-apple-3", "trajectory": ALFWORLD_STYLE}])
    opts = {"action_prefix": "> ", "start_marker": "You are in the middle of a room"}
    (t,) = load(path, format="transcript", transcript=opts)
    assert t.messages[0].content == ("You are in the middle of a room. Looking quickly around you, you see a countertop 1, "
                                     "a fridge 1, and a cabinet 1.\nYour task is to: put a cool apple in cabinet.")
    assert [m.content for m in t.steps] == [
        "think: First I need an apple. The countertop is the likeliest place.", "go to countertop 1",
        "take apple 1 from countertop 1", "cool apple 1 with fridge 1", "go to cabinet 1", "open cabinet 1",
        "put apple 1 in/on cabinet 1"]
    assert t.messages[2].content == "OK." and t.messages[-1].content == "You put the apple 1 in/on the cabinet 1."
    assert t.env == "alfworld"
    # the prefix kept on request
    (raw,) = load(path, format="transcript", transcript={**opts, "strip_prefix": False})
    assert raw.steps[1].content == "> go to countertop 1"


# --- input/output pairs --------------------------------------------------------------------------------


def test_pairs(tmp_path):
    rows = [
        {"instruction": "You are in a maze. Reply with one move.", "input": "Wall to the north, open to the east.",
         "output": "Thought: north is blocked.\nAction: move east", "env": "maze"},
        {"prompt": "Inventory: 3 iron ingots. Goal: iron bars.", "completion": "Action: craft iron bars using 3 iron ingot",
         "system": "You play a crafting game."},
        {"question": "2+2?", "answer": "4", "id": "math_1"},
    ]
    a, b, c = load(write_jsonl(tmp_path / "textcraft_pairs.jsonl", rows))  # auto detects pairs
    assert turns(a) == [("user", "You are in a maze. Reply with one move.\n\nWall to the north, open to the east.", None),
                        ("assistant", rows[0]["output"], 0)]
    assert turns(b) == [("system", "You play a crafting game.", None), ("user", rows[1]["prompt"], None),
                        ("assistant", rows[1]["completion"], 0)]
    assert (a.env, b.env, c.env) == ("maze", "textcraft", "math") and c.n_steps == 1
    (d,) = load(write_jsonl(tmp_path / "q.jsonl", [{"q": "hi", "a": "hello", "env": "chat"}]), format="pairs",
                pairs={"input_key": "q", "output_key": "a"})
    assert turns(d) == [("user", "hi", None), ("assistant", "hello", 0)]
    with pytest.raises(DataError, match=r"q.jsonl:1: no input field.*Set data.pairs.input_key"):
        load(tmp_path / "q.jsonl", format="pairs")


# --- files ---------------------------------------------------------------------------------------------


def test_utf8_bom_is_accepted(tmp_path):
    rows = [ROLE_CONTENT_LOSS, {**ROLE_CONTENT_LOSS, "id": "webshop_8"}]
    jsonl = write_jsonl(tmp_path / "bom.jsonl", rows, bom=True)
    res = load_trajectories(LocalFiles(str(jsonl)), on_error="skip", progress=False)
    assert [t.id for t in res.trajectories] == ["webshop_7", "webshop_8"] and res.n_skipped == 0
    js = tmp_path / "bom.json"
    js.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows).encode())
    assert [t.id for t in load(js)] == ["webshop_7", "webshop_8"]


def test_files_a_folder_does_not_read_are_listed(tmp_path, caplog):
    root = tmp_path / "data"
    write_jsonl(root / "webshop.jsonl", [ROLE_CONTENT_LOSS])
    write_jsonl(root / "MORE.JSONL", [ROLE_CONTENT_LOSS])
    (root / "notes.txt").write_text("about this data")
    (root / "empty.jsonl").write_text("")
    (root / "blank.json").write_text("\n  \n")
    with caplog.at_level(logging.WARNING, logger="atlas_exp.data.sources"):
        res = load_trajectories(LocalFiles(str(root)), progress=False)
    assert len(res.trajectories) == 1
    unread = res.per_source[0]["unread_files"]
    assert sorted(Path(u).name for u in unread) == ["MORE.JSONL", "blank.json", "empty.jsonl", "notes.txt"]
    assert "not reading 4 file(s)" in caplog.text and "MORE.JSONL (not .jsonl/.json/.parquet)" in caplog.text
    assert "empty.jsonl (empty)" in caplog.text


def test_an_empty_source_says_which_and_why(tmp_path):
    root = tmp_path / "data"
    (root).mkdir()
    (root / "a.jsonl").write_text("")
    with pytest.raises(ConfigError, match=rf"data source LocalFiles\({root}\) gave no trajectory: it holds no record.*a.jsonl"):
        load(root)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"id": "x_1", "messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(ConfigError, match=r"all 1 of its records are bad and were skipped.*no trainable assistant turn"):
        load_trajectories(LocalFiles(str(bad)), on_error="skip", progress=False)
    (tmp_path / "arr.json").write_text("[]")
    with pytest.raises(ConfigError, match="arr.json\\) gave no trajectory"):
        load(tmp_path / "arr.json")


def test_long_turns_and_assistant_first_trajectories_are_warned_about(tmp_path, caplog):
    long = {"id": "sciworld_1", "messages": [{"role": "user", "content": "x" * 100_001}, {"role": "assistant", "content": "look"}]}
    first = {"id": "sciworld_2", "messages": [{"role": "assistant", "content": "look around"},
                                              {"role": "user", "content": "a room"}, {"role": "assistant", "content": "go"}]}
    path = write_jsonl(tmp_path / "s.jsonl", [long, first])
    with caplog.at_level(logging.WARNING, logger="atlas_exp.data.sources"):
        res = load_trajectories(LocalFiles(str(path)), progress=False)
    assert len(res.trajectories) == 2
    assert res.warnings == {"long_turns": [f"{path}:1 (turn 0: 100,001 characters)"], "assistant_first": [f"{path}:2"]}
    assert "1 trajectories have a turn longer than 100,000 characters" in caplog.text and f"{path}:1" in caplog.text
    assert "first turn by the assistant" in caplog.text and f"{path}:2" in caplog.text
    assert res.summary()["warnings"]["assistant_first"] == {"n": 1, "first": [f"{path}:2"]}
