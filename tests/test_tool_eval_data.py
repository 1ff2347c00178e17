"""Integrity checks for benchmarks/data/tool_eval.json, the independent tool-call evaluation set."""

import json
import re
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "tool_eval.json"
MATCH_MODES = {"exact", "casefold", "contains"}
JSON_TYPES = {"string", "integer", "number", "boolean"}
ROLES = {"system", "user", "assistant"}


@pytest.fixture(scope="module")
def data():
    with DATA.open(encoding="utf-8") as f:
        return json.load(f)


def type_ok(value, typ):
    if typ == "string":
        return isinstance(value, str)
    if typ == "boolean":
        return isinstance(value, bool)
    if typ == "integer":
        return not isinstance(value, bool) and (
            isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        )
    if typ == "number":
        return not isinstance(value, bool) and isinstance(value, (int, float))
    raise AssertionError(f"unknown JSON type {typ!r}")


def test_top_level(data):
    assert set(data) == {"description", "tools", "items"}
    desc = data["description"].lower()
    assert "never" in desc and "training" in desc


def test_tools(data):
    tools = data["tools"]
    assert len(tools) >= 30
    names = [spec["function"]["name"] for spec in tools.values()]
    assert len(names) == len(set(names))
    for key, spec in tools.items():
        assert spec["type"] == "function"
        fn = spec["function"]
        assert fn["name"] == key
        assert re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", key), key
        assert isinstance(fn["description"], str) and fn["description"].strip()
        params = fn["parameters"]
        assert params["type"] == "object"
        props = params["properties"]
        assert 1 <= len(props) <= 4, key
        assert set(params["required"]) <= set(props), key
        assert len(params["required"]) == len(set(params["required"])), key
        for pname, p in props.items():
            assert p["type"] in JSON_TYPES, (key, pname)
            assert isinstance(p.get("description"), str) and p["description"].strip(), (key, pname)
            if "enum" in p:
                assert p["enum"] and len(p["enum"]) == len(set(p["enum"])), (key, pname)
                assert all(type_ok(v, p["type"]) for v in p["enum"]), (key, pname)


def test_tool_descriptions_unique(data):
    descs = [spec["function"]["description"] for spec in data["tools"].values()]
    assert len(descs) == len(set(descs))


def test_item_count_and_ids(data):
    items = data["items"]
    assert len(items) >= 120
    ids = [item["id"] for item in items]
    assert len(ids) == len(set(ids))
    assert all(re.fullmatch(r"t\d{3,}", i) for i in ids)


def test_every_tool_is_expected_somewhere(data):
    expected = {item["expected"]["name"] for item in data["items"]}
    assert expected == set(data["tools"])


def test_items(data):
    tools = data["tools"]
    for item in data["items"]:
        iid = item["id"]
        assert set(item) <= {"id", "tools", "messages", "expected", "match"}, iid
        offered = item["tools"]
        assert 2 <= len(offered) <= 5, iid
        assert len(offered) == len(set(offered)), iid
        assert all(name in tools for name in offered), iid
        expected = item["expected"]
        assert set(expected) == {"name", "arguments"}, iid
        assert expected["name"] in offered, iid

        params = tools[expected["name"]]["function"]["parameters"]
        props = params["properties"]
        args = expected["arguments"]
        assert set(args) <= set(props), (iid, set(args) - set(props))
        assert set(params["required"]) <= set(args), (iid, set(params["required"]) - set(args))
        for name, value in args.items():
            p = props[name]
            assert type_ok(value, p["type"]), (iid, name, value)
            if "enum" in p:
                assert value in p["enum"], (iid, name, value)
            if isinstance(value, str):
                assert value.strip(), (iid, name)

        match = item.get("match", {})
        assert set(match) <= set(args), (iid, set(match) - set(args))
        for name, mode in match.items():
            assert mode in MATCH_MODES, (iid, name, mode)
            if mode != "exact":
                assert isinstance(args[name], str), (iid, name)


def test_messages(data):
    for item in data["items"]:
        iid = item["id"]
        msgs = item["messages"]
        assert msgs and msgs[-1]["role"] == "user", iid
        for i, m in enumerate(msgs):
            assert set(m) == {"role", "content"}, iid
            assert m["role"] in ROLES, iid
            assert isinstance(m["content"], str) and m["content"].strip(), iid
            if m["role"] == "system":
                assert i == 0, iid
        # roles alternate after an optional leading system message
        convo = [m["role"] for m in msgs if m["role"] != "system"]
        assert convo[::2] == ["user"] * len(convo[::2]), iid
        assert convo[1::2] == ["assistant"] * len(convo[1::2]), iid


def test_some_multi_turn_and_system_items(data):
    longer = [item for item in data["items"] if len(item["messages"]) > 1]
    assert len(longer) >= 8
    assert any(item["messages"][0]["role"] == "system" for item in longer)
    assert any(any(m["role"] == "assistant" for m in item["messages"]) for item in longer)


def test_no_duplicated_item_text(data):
    finals = [item["messages"][-1]["content"] for item in data["items"]]
    assert len(finals) == len(set(finals))
    whole = [json.dumps(item["messages"], sort_keys=True) for item in data["items"]]
    assert len(whole) == len(set(whole))


def test_correct_tool_position_varies(data):
    positions = {item["tools"].index(item["expected"]["name"]) for item in data["items"]}
    assert {0, 1, 2} <= positions
    sizes = {len(item["tools"]) for item in data["items"]}
    assert {2, 3, 4, 5} <= sizes


def test_literal_values_appear_in_request(data):
    # free-text string values (not enum choices) are copied from the conversation, so they must occur in it
    tools = data["tools"]
    for item in data["items"]:
        text = " ".join(m["content"] for m in item["messages"]).casefold()
        props = tools[item["expected"]["name"]]["function"]["parameters"]["properties"]
        for name, value in item["expected"]["arguments"].items():
            if isinstance(value, str) and "enum" not in props[name]:
                assert value.casefold() in text, (item["id"], name, value)
