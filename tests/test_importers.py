"""Importers and sources, on real AgentTraj-L and ALFWorld records from ../shared/data.

Read as the spec: every public format becomes the same canonical Trajectory, every supported container
(jsonl, json, parquet, folders, a `datasets` folder) reads the same records the same way, and every kind
of bad record is a DataError whose message names the file, the line (or record number) and the field.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from atlas_exp.data.importers import convert_record, env_from_filename, env_from_id
from atlas_exp.data.sources import HubDataset, LocalFiles, load_trajectories
from atlas_exp.errors import ConfigError, DataError

ENVS = ["babyai", "maze", "movie", "sciworld", "sqlgym", "textcraft", "todo", "weather", "webshop", "wordle"]


def raw_records(path: Path, n: int | None = None) -> list[dict]:
    """The first n records of a real JSONL file, as plain dicts."""
    out = []
    with path.open() as f:
        for line in f:
            out.append(json.loads(line))
            if n is not None and len(out) >= n:
                break
    return out


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def load(path, **kw):
    return load_trajectories(LocalFiles(str(path), **kw), progress=False).trajectories


def messages(trajs):
    return [[m.to_dict() for m in t.messages] for t in trajs]


@pytest.fixture(scope="module")
def agenttraj(agenttraj_dir):
    """Every AgentTraj-L file imported whole, once: {env: [Trajectory]}."""
    res = load_trajectories([LocalFiles(str(agenttraj_dir / f"{env}.jsonl")) for env in ENVS], progress=False)
    assert res.skipped == []
    out: dict[str, list] = {env: [] for env in ENVS}
    for t in res.trajectories:
        out[Path(t.source.rsplit(":", 1)[0]).stem].append(t)
    return out


@pytest.fixture(scope="module")
def stats(agenttraj_dir):
    return json.loads((agenttraj_dir / "stats.json").read_text())


# --- AgentGym / AgentTraj-L ----------------------------------------------------------------------------


@pytest.mark.parametrize("env", ENVS)
def test_every_agenttraj_file_imports_fully_with_its_step_counts(agenttraj, stats, env):
    trajs = agenttraj[env]
    assert len(trajs) == stats[env]["n"]
    n_steps = [t.n_steps for t in trajs]
    # stats.json counts the gpt turns with loss=true: exactly our steps
    assert round(sum(n_steps) / len(n_steps), 1) == stats[env]["mean_loss_gpt_turns"]
    assert max(n_steps) == stats[env]["max_loss_gpt_turns"]
    assert {t.env for t in trajs} == {env}


def test_the_ok_turn_is_kept_but_is_not_a_step(agenttraj, agenttraj_dir):
    for env, trajs in agenttraj.items():
        raws = raw_records(agenttraj_dir / f"{env}.jsonl", 20)
        for t, raw in zip(trajs, raws):
            ok = t.messages[1]
            assert ok.role == "assistant" and not ok.trainable and ok.step is None
            assert ok.content.startswith(("OK. I'll follow", "Ok."))
            # every other gpt turn is a step, numbered in order, with the text unchanged
            gpt = [c["value"] for c in raw["conversations"] if c["from"] == "gpt"]
            assert [m.content for m in t.steps] == gpt[1:]
            assert [m.step for m in t.steps] == list(range(len(gpt) - 1))
            assert t.messages[0].role == "user" and len(t.messages) == len(raw["conversations"])


def test_source_is_file_and_line_and_extra_fields_go_to_meta(agenttraj, agenttraj_dir):
    t = agenttraj["webshop"][9]
    assert t.source == f"{agenttraj_dir / 'webshop.jsonl'}:10"
    raw = raw_records(agenttraj_dir / "webshop.jsonl", 10)[9]
    assert t.id == raw["item_id"] and t.meta["sources"] == raw["sources"]


def test_ids_name_their_env_so_records_without_env_still_import(agenttraj, agenttraj_dir, tmp_path):
    # the documented rule `<env>_<n>` / `lmrlgym_<env>_<n>` holds for every AgentTraj-L id
    for env, trajs in agenttraj.items():
        assert {env_from_id(t.id) for t in trajs} == {env}
    rows = []
    for env in ENVS:
        for r in raw_records(agenttraj_dir / f"{env}.jsonl", 3):
            del r["env"]
            rows.append(r)
    # the id decides even though the file name ("mixed") would suggest another env
    trajs = load(write_jsonl(tmp_path / "mixed.jsonl", rows))
    assert [t.env for t in trajs] == [e for e in ENVS for _ in range(3)]


def test_env_from_filename_rule():
    assert env_from_filename("x/maze.jsonl") == "maze"
    assert env_from_filename("alfworld_train_expert_gt.jsonl") == "alfworld"
    assert env_from_filename("data/train-00000-of-00001.parquet") is None
    assert env_from_filename("data.json") is None


def test_alfworld_expert_file_without_loss_or_env(shared_data):
    path = shared_data / "alfworld" / "alfworld_train_expert_gt.jsonl"
    raws = raw_records(path, 200)
    trajs = load(path, limit=200)
    assert len(trajs) == 200
    for t, raw in zip(trajs, raws):
        # no `loss` field: every gpt turn is an expert action, hence a step
        assert t.n_steps == sum(c["from"] == "gpt" for c in raw["conversations"])
        assert t.env == "alfworld"  # from the file name
        assert t.id == raw["id"]
        assert t.meta == {"game_file": raw["game_file"], "task_type": raw["task_type"]}
        assert t.messages[-1].role == "user"  # the last observation is kept
    # a source-level env wins over the file name for records that name none
    assert {t.env for t in load(path, limit=5, env="alfworld_gt")} == {"alfworld_gt"}


# --- OpenAI chat, canonical and generic role/content ---------------------------------------------------


def to_openai(raw: dict) -> dict:
    role = {"human": "user", "gpt": "assistant"}
    msgs = []
    for c in raw["conversations"]:
        m = {"role": role[c["from"]], "content": c["value"]}
        if c["loss"] is False:
            m["weight"] = 0
        elif c["from"] == "gpt":
            m["weight"] = 1
        msgs.append(m)
    return {"id": raw["item_id"], "env": raw["env"], "messages": msgs}


def test_openai_records_import_like_their_agentgym_originals(agenttraj_dir, tmp_path):
    raws = raw_records(agenttraj_dir / "maze.jsonl", 15) + raw_records(agenttraj_dir / "sciworld.jsonl", 15)
    rows = [to_openai(r) for r in raws]
    rows[0]["messages"][3]["weight"] = 0.5  # another weight is that step's weight
    got = load(write_jsonl(tmp_path / "chat.jsonl", rows))
    want = load(write_jsonl(tmp_path / "orig.jsonl", raws))
    assert [(t.id, t.env) for t in got] == [(t.id, t.env) for t in want]
    assert got[0].messages[3].weight == 0.5 and got[0].messages[3].step == 0
    assert got[1].messages[3].weight == 1.0
    for g, w in zip(got, want):
        assert [(m.role, m.content, m.step) for m in g.messages] == [(m.role, m.content, m.step) for m in w.messages]


def test_openai_records_without_id_or_env_take_them_from_the_file(agenttraj_dir, tmp_path):
    rows = [{"messages": to_openai(r)["messages"]} for r in raw_records(agenttraj_dir / "webshop.jsonl", 4)]
    trajs = load(write_jsonl(tmp_path / "webshop_chat.jsonl", rows))
    assert [t.id for t in trajs] == [f"webshop_chat_{i}" for i in range(1, 5)]
    assert {t.env for t in trajs} == {"webshop"}


def test_canonical_trajectories_read_back_unchanged(agenttraj, tmp_path):
    trajs = agenttraj["textcraft"][:20] + agenttraj["wordle"][:20]
    back = load(write_jsonl(tmp_path / "trajectories.jsonl", [t.to_dict() for t in trajs]))
    for a, b in zip(trajs, back):
        da, db = a.to_dict(), b.to_dict()
        da.pop("source"), db.pop("source")
        assert da == db


def test_generic_lists_of_role_content_messages(agenttraj_dir, tmp_path):
    raws = raw_records(agenttraj_dir / "textcraft.jsonl", 5)
    rows = [[{"role": c["from"], "content": c["value"]} for c in r["conversations"]] for r in raws]
    trajs = load(write_jsonl(tmp_path / "textcraft_lists.jsonl", rows))
    assert [t.id for t in trajs] == [f"textcraft_lists_{i}" for i in range(1, 6)]
    assert {t.env for t in trajs} == {"textcraft"}
    # without loss marks every assistant turn is a step, the "OK." one included
    assert [t.n_steps for t in trajs] == [sum(c["from"] == "gpt" for c in r["conversations"]) for r in raws]

    # a .json file that is one such list is one record
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "textcraft_single.json").write_text(json.dumps(rows[0]))
    (single,) = load(tmp_path / "one" / "textcraft_single.json")
    assert messages([single]) == messages(trajs[:1])


def test_generic_records_under_a_configured_key(agenttraj_dir, tmp_path):
    raws = raw_records(agenttraj_dir / "todo.jsonl", 3)
    rows = [{"uid": r["item_id"], "env": r["env"], "dialog": to_openai(r)["messages"]} for r in raws]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    for fmt in ("auto", "generic"):
        trajs = load(path, format=fmt, messages_key="dialog")
        assert [t.n_steps for t in trajs] == [sum(c["loss"] is True for c in r["conversations"]) for r in raws]
        assert {t.env for t in trajs} == {"todo"} and trajs[0].meta == {"uid": raws[0]["item_id"]}
    with pytest.raises(DataError, match="cannot tell the record's format"):
        load(path)  # without messages_key the records are not recognisable


# --- containers: json, parquet, folders, `datasets` ------------------------------------------------------


def test_json_array_and_single_object_files(agenttraj_dir, tmp_path):
    raws = raw_records(agenttraj_dir / "movie.jsonl", 6)
    (tmp_path / "movie_all.json").write_text(json.dumps(raws))
    (tmp_path / "movie_one.json").write_text(json.dumps(raws[2], indent=2))
    many = load(tmp_path / "movie_all.json")
    (one,) = load(tmp_path / "movie_one.json")
    assert [t.source for t in many] == [f"{tmp_path / 'movie_all.json'}#{i}" for i in range(1, 7)]
    assert messages([one]) == messages(many[2:3]) and one.id == raws[2]["item_id"]


def test_parquet_files_read_like_jsonl(agenttraj_dir, tmp_path):
    raws = raw_records(agenttraj_dir / "babyai.jsonl", 30)
    pq.write_table(pa.Table.from_pylist(raws), tmp_path / "babyai.parquet")
    got = load(tmp_path / "babyai.parquet")
    want = load(write_jsonl(tmp_path / "babyai.jsonl", raws))
    assert messages(got) == messages(want) and [t.id for t in got] == [t.id for t in want]
    assert got[4].source == f"{tmp_path / 'babyai.parquet'}#5"


def test_folders_are_read_recursively_in_a_fixed_order(agenttraj_dir, tmp_path, caplog):
    root = tmp_path / "data"
    write_jsonl(root / "b" / "weather.jsonl", raw_records(agenttraj_dir / "weather.jsonl", 2))
    (root / "a").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(raw_records(agenttraj_dir / "todo.jsonl", 2)), root / "a" / "todo.parquet")
    (root / "a" / "movie.json").write_text(json.dumps(raw_records(agenttraj_dir / "movie.jsonl", 2)))
    (root / "a" / "notes.txt").write_text("not data")
    write_jsonl(root / ".cache" / "x.jsonl", raw_records(agenttraj_dir / "maze.jsonl", 2))
    (root / "stats.json").write_text(json.dumps({"weather": {"n": 2}}))

    src = LocalFiles(str(root))
    assert [f.relative_to(root).as_posix() for f in src.files()] == [
        "a/movie.json", "a/todo.parquet", "b/weather.jsonl", "stats.json"]
    with caplog.at_level(logging.WARNING):
        res = load_trajectories(src, progress=False)
    assert [t.env for t in res.trajectories] == ["movie", "movie", "todo", "todo", "weather", "weather"]
    # the metadata file next to the data is not read, and the user is told
    assert res.per_source[0]["ignored_files"] == [str(root / "stats.json")]
    assert "ignoring" in caplog.text and "stats.json" in caplog.text
    # named explicitly it is read, and it is not a record
    with pytest.raises(DataError, match=r"stats\.json#1: cannot tell the record's format"):
        load(root / "stats.json")


def test_glob_patterns_and_hydra_list_configs(agenttraj_dir):
    from hydra.utils import instantiate

    src = instantiate({"_target_": "atlas_exp.data.sources.LocalFiles",
                       "paths": [str(agenttraj_dir / "m*.jsonl"), str(agenttraj_dir / "todo.jsonl")],
                       "format": "agentgym", "limit": 3})
    assert [f.name for f in src.files()] == ["maze.jsonl", "movie.jsonl", "todo.jsonl"]
    res = load_trajectories([src], progress=False)
    assert [t.env for t in res.trajectories] == ["maze"] * 3 + ["movie"] * 3 + ["todo"] * 3


def test_hub_dataset_loads_a_local_folder_in_hub_layout(agenttraj_dir, tmp_path):
    train = raw_records(agenttraj_dir / "maze.jsonl", 20) + raw_records(agenttraj_dir / "webshop.jsonl", 20)
    test = raw_records(agenttraj_dir / "wordle.jsonl", 5)
    hub = tmp_path / "AgentTraj-L"
    (hub / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(train), hub / "data" / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(test), hub / "data" / "test-00000-of-00001.parquet")
    cache = str(tmp_path / "hf_cache")

    res = load_trajectories(HubDataset(str(hub), format="agentgym", cache_dir=cache), progress=False)
    want = load(write_jsonl(tmp_path / "train.jsonl", train))
    assert messages(res.trajectories) == messages(want)
    assert [(t.id, t.env) for t in res.trajectories] == [(t.id, t.env) for t in want]
    assert res.trajectories[3].source == f"{hub}[train]#4"

    tst = load_trajectories(HubDataset(str(hub), split="test", cache_dir=cache, limit=2), progress=False)
    assert [t.id for t in tst.trajectories] == [r["item_id"] for r in test[:2]]
    with pytest.raises(ConfigError, match="could not load"):
        load_trajectories(HubDataset(str(hub), split="validation", cache_dir=cache), progress=False)


def test_hub_dataset_typed_columns_with_nulls(agenttraj_dir, shared_data, tmp_path):
    """`datasets` gives every row every column: ALFWorld rows get loss/env/item_id null next to AgentGym's."""
    gym = raw_records(agenttraj_dir / "sqlgym.jsonl", 3)
    alf = raw_records(shared_data / "alfworld" / "alfworld_train_expert_gt.jsonl", 3)
    hub = tmp_path / "mixed"
    write_jsonl(hub / "data" / "train.jsonl", gym + alf)
    cache = str(tmp_path / "hf_cache")

    # ALFWorld rows name no env and their ids are not <env>_<n>: a Hub source has no file name to go by
    res = load_trajectories(HubDataset(str(hub), cache_dir=cache), on_error="skip", progress=False)
    assert [t.env for t in res.trajectories] == ["sqlgym"] * 3
    assert [(s.where, s.field) for s in res.skipped] == [(f"{hub}[train]#{i}", "env") for i in (4, 5, 6)]

    res = load_trajectories(HubDataset(str(hub), cache_dir=cache, env="alfworld"), progress=False)
    assert [t.env for t in res.trajectories] == ["sqlgym"] * 3 + ["alfworld"] * 3
    assert [t.n_steps for t in res.trajectories] == [1, 1, 1] + [
        sum(c["from"] == "gpt" for c in r["conversations"]) for r in alf]
    assert [t.id for t in res.trajectories[3:]] == [r["id"] for r in alf]


# --- bad input -----------------------------------------------------------------------------------------


def _mutate(rec: dict, how: str) -> object:
    r = copy.deepcopy(rec)
    c = r["conversations"]
    if how == "missing role":
        del c[2]["from"]
    elif how == "unknown role":
        c[2]["from"] = "observer"
    elif how == "two assistant turns":
        c[2]["from"] = "gpt"
    elif how == "empty content":
        c[3]["value"] = "  \n"
    elif how == "content not a string":
        c[3]["value"] = 42
    elif how == "loss not a bool":
        c[3]["loss"] = "yes"
    elif how == "loss on a user turn":
        c[2]["loss"] = True
    elif how == "conversations not a list":
        r["conversations"] = "Thought: ..."
    elif how == "no steps":
        for t in c:
            if t["from"] == "gpt":
                t["loss"] = False
    elif how == "env not a string":
        r["env"] = 5
    elif how == "id not a string":
        r["item_id"] = ["maze", 1]
    elif how == "turn not an object":
        c[4] = "move up"
    elif how == "openai weight not a number":
        r = to_openai(rec)
        r["messages"][3]["weight"] = "high"
    elif how == "openai image part":
        r = to_openai(rec)
        r["messages"][2]["content"] = [{"type": "text", "text": "look:"}, {"type": "image_url", "image_url": {"url": "x"}}]
    elif how == "openai bad tool arguments":
        r = to_openai(rec)
        r["messages"][3] = {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "move", "arguments": "{direction: up"}}]}
    elif how == "tool calls on a user turn":
        r = to_openai(rec)
        r["messages"][2]["tool_calls"] = [{"type": "function", "function": {"name": "move", "arguments": "{}"}}]
    elif how == "openai weight on a user turn":
        r = to_openai(rec)
        r["messages"][0]["weight"] = 0
    elif how == "openai empty messages":
        r = {"id": "x_1", "messages": []}
    return r


BAD = [
    ("missing role", "conversations[2].from", "missing role"),
    ("unknown role", "conversations[2].from", "unknown role 'observer'"),
    ("two assistant turns", "conversations[2]", "two assistant turns in a row"),
    ("empty content", "conversations[3].value", "empty content"),
    ("content not a string", "conversations[3].value", "expected a string, got int"),
    ("loss not a bool", "conversations[3].loss", "expected true, false or null"),
    ("loss on a user turn", "conversations[2].loss", "only assistant turns can be trained"),
    ("conversations not a list", "conversations", "expected a list of messages, got str"),
    ("no steps", "conversations", "no trainable assistant turn"),
    ("env not a string", "env", "expected a non-empty string"),
    ("id not a string", "item_id", "expected a non-empty string or an integer"),
    ("turn not an object", "conversations[4]", "expected an object, got str"),
    ("openai weight not a number", "messages[3].weight", "weight must be a finite number"),
    ("openai image part", "messages[2].content[1].type", "content part of type 'image_url' is not text"),
    ("openai bad tool arguments", "messages[3].tool_calls[0].function.arguments", "arguments are not valid JSON"),
    ("tool calls on a user turn", "messages[2].tool_calls", "only assistant turns make tool calls"),
    ("openai weight on a user turn", "messages[0].weight", "only allowed on assistant turns"),
    ("openai empty messages", "messages", "no messages"),
]


@pytest.mark.parametrize("how,field,reason", BAD, ids=[b[0] for b in BAD])
def test_bad_records_name_file_line_and_field(agenttraj_dir, tmp_path, how, field, reason):
    good = raw_records(agenttraj_dir / "maze.jsonl", 3)
    path = write_jsonl(tmp_path / "maze.jsonl", good[:2] + [_mutate(good[2], how)])
    with pytest.raises(DataError) as e:
        load(path)
    assert str(e.value).startswith(f"{path}:3 [{field}]: ")
    assert reason in str(e.value)
    assert (e.value.source, e.value.field) == (f"{path}:3", field)


@pytest.mark.parametrize("line,reason", [
    ('{"item_id": "maze_1", "conversations": [', "invalid JSON"),
    ('"just text"', "expected a JSON object or a list of messages, got str"),
    ('{"item_id": "maze_1", "env": "maze"}', "cannot tell the record's format"),
])
def test_undecodable_records_name_file_and_line(agenttraj_dir, tmp_path, line, reason):
    good = raw_records(agenttraj_dir / "maze.jsonl", 2)
    path = tmp_path / "maze.jsonl"
    path.write_text(json.dumps(good[0]) + "\n\n" + line + "\n" + json.dumps(good[1]) + "\n")
    with pytest.raises(DataError, match=rf"^{path}:3: .*{reason}"):
        load(path)


def test_convert_record_errors_without_a_file_name_the_given_location(agenttraj_dir):
    rec = _mutate(raw_records(agenttraj_dir / "maze.jsonl", 1)[0], "empty content")
    with pytest.raises(DataError, match=r"^hub\[train\]#7 \[conversations\[3\]\.value\]: empty content"):
        convert_record(rec, where="hub[train]#7")


def test_on_error_skip_counts_lists_and_warns(agenttraj_dir, tmp_path, caplog):
    good = raw_records(agenttraj_dir / "wordle.jsonl", 5)
    rows = [good[0], _mutate(good[1], "empty content"), good[2], _mutate(good[3], "unknown role"), good[4]]
    path = write_jsonl(tmp_path / "wordle.jsonl", rows)
    with path.open("a") as f:
        f.write("{not json\n")

    with caplog.at_level(logging.WARNING, logger="atlas_exp.data.sources"):
        res = load_trajectories(LocalFiles(str(path)), on_error="skip", progress=False)
    assert res.n_read == 6 and len(res.trajectories) == 3 and res.n_skipped == 3
    assert [t.id for t in res.trajectories] == [good[i]["item_id"] for i in (0, 2, 4)]
    assert [(s.where, s.field) for s in res.skipped] == [
        (f"{path}:2", "conversations[3].value"), (f"{path}:4", "conversations[2].from"), (f"{path}:6", None)]
    assert res.skipped[0].reason == "empty content"
    assert res.summary()["n_skipped"] == 3 and res.per_source[0]["n_loaded"] == 3
    assert "skipped 3 of 6 records" in caplog.text and f"{path}:2 [conversations[3].value]: empty content" in caplog.text

    with pytest.raises(DataError, match=rf"^{path}:2 "):
        load_trajectories(LocalFiles(str(path)), on_error="error", progress=False)


def test_config_errors_name_the_option_or_path(agenttraj_dir, tmp_path):
    with pytest.raises(ConfigError, match="data.on_error='ignore'"):
        load_trajectories(LocalFiles(str(agenttraj_dir / "todo.jsonl")), on_error="ignore")
    with pytest.raises(ConfigError, match="format='xml'"):
        LocalFiles(str(agenttraj_dir), format="xml")
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "nope.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no"):
        load(tmp_path / "empty")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ConfigError, match="unsupported type '.csv'"):
        load(tmp_path / "x.csv")
    with pytest.raises(ConfigError, match="matches no"):
        load(tmp_path / "*.parquet")
