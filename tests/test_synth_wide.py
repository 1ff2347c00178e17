"""The wide tool-use conversations: their format, their three kinds, and that every call is right."""

import json

import pytest

from lfm2.train.synth_wide import ARCHETYPES, arithmetic, convert_units, wide_conversations

N = 2000
JSON_TYPES = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,)}


@pytest.fixture(scope="module")
def convs():
    return wide_conversations(N, seed=0)


def _kind(conv):
    if any(m.get("tool_calls") for m in conv["messages"]):
        return "call"
    return "listed" if "tools" in conv else "none"


def _calls(conv):
    return [c["function"] for m in conv["messages"] for c in m.get("tool_calls") or []]


def test_deterministic_per_seed():
    assert wide_conversations(60, seed=5) == wide_conversations(60, seed=5)
    assert wide_conversations(60, seed=5) != wide_conversations(60, seed=6)


def test_catalogue_is_wide():
    assert len(ARCHETYPES) >= 40
    assert len({a.domain for a in ARCHETYPES}) >= 35
    for a in ARCHETYPES:
        assert len(a.names) >= 4, a.key
        assert len(a.asks) >= 3, a.key


def test_kinds_in_stated_fractions(convs):
    kinds = [_kind(c) for c in convs]
    for kind, share in (("call", 0.6), ("listed", 0.2), ("none", 0.2)):
        assert abs(kinds.count(kind) / N - share) <= 0.07, (kind, kinds.count(kind))


def test_format_matches_synth(convs):
    for conv in convs:
        msgs = conv["messages"]
        assert msgs[-1]["role"] == "assistant" and msgs[-1]["content"].strip()
        assert any(m["role"] == "user" for m in msgs)
        for t in conv.get("tools", []):
            assert t["type"] == "function"
            params = t["function"]["parameters"]
            assert params["type"] == "object" and set(params["required"]) <= set(params["properties"])
        if _kind(conv) == "call":
            call_msg = next(m for m in msgs if m.get("tool_calls"))
            tool_msg = msgs[msgs.index(call_msg) + 1]
            assert tool_msg["role"] == "tool" and tool_msg["tool_call_id"] == call_msg["tool_calls"][0]["id"]
            json.loads(tool_msg["content"])
            fn = call_msg["tool_calls"][0]["function"]
            assert conv["expected"] == {"name": fn["name"], "arguments": json.loads(fn["arguments"])}


def test_every_call_fits_its_listed_tool(convs):
    for conv in convs:
        tools = {t["function"]["name"]: t["function"]["parameters"] for t in conv.get("tools", [])}
        assert len(tools) == len(conv.get("tools", [])), "tool names repeat in one list"
        assert 0 <= len(tools) <= 5
        for fn in _calls(conv):
            assert fn["name"] in tools, (fn["name"], list(tools))
            params, args = tools[fn["name"]], json.loads(fn["arguments"])
            assert set(args) <= set(params["properties"]), (fn, params)
            assert set(params["required"]) <= set(args), (fn, params)
            for key, value in args.items():
                spec = params["properties"][key]
                assert isinstance(value, JSON_TYPES[spec["type"]]), (key, value, spec)
                if spec["type"] in ("integer", "number"):
                    assert not isinstance(value, bool), (key, value)
                if "enum" in spec:
                    assert value in spec["enum"], (key, value, spec)


def test_string_values_are_copied_from_the_request(convs):
    for conv in convs:
        user = " ".join(m["content"] for m in conv["messages"] if m["role"] == "user").lower()
        tools = {t["function"]["name"]: t["function"]["parameters"]["properties"] for t in conv.get("tools", [])}
        for fn in _calls(conv):
            for key, value in json.loads(fn["arguments"]).items():
                if isinstance(value, str) and "enum" not in tools[fn["name"]][key]:
                    assert value.lower() in user, (key, value, user)
                elif isinstance(value, (int, float)) and not isinstance(value, bool):
                    assert str(value) in user, (key, value, user)


def test_no_tool_calls_without_tools(convs):
    plain = [c for c in convs if "tools" not in c]
    assert plain
    for conv in plain:
        assert not _calls(conv)
        assert all("tool_call" not in m["content"] for m in conv["messages"])
    unlisted = [c for c in convs if _kind(c) == "listed"]
    assert sum("don't have a tool" in c["messages"][-1]["content"].lower() or "none of my tools" in
               c["messages"][-1]["content"].lower() or "tools i have" in c["messages"][-1]["content"].lower()
               for c in unlisted) >= 0.15 * len(unlisted)


def test_distinct_names(convs):
    names = {t["function"]["name"] for c in convs for t in c.get("tools", [])}
    first = {next(iter(t["function"]["parameters"]["properties"]), None) for c in convs for t in c.get("tools", [])}
    called = {fn["name"] for c in convs for fn in _calls(c)}
    assert len(names) >= 150, len(names)
    assert len(first - {None}) >= 40, len(first)
    assert len(called) >= 150, len(called)


def test_right_tool_position_and_distractors_vary(convs):
    calls = [c for c in convs if _kind(c) == "call"]
    positions = {[t["function"]["name"] for t in c["tools"]].index(c["expected"]["name"]) for c in calls}
    assert positions >= {0, 1, 2}
    assert {len(c["tools"]) for c in calls} >= {1, 2, 3, 4}


def test_renders_and_fits_with_bundled_tokenizer(convs):
    from lfm2.bundled import default_model_path
    from lfm2.tokenizer import Tokenizer
    from lfm2.tools import render_chat
    from lfm2.train.data import assistant_mask

    tok = Tokenizer.from_dir(default_model_path())
    lengths = []
    for conv in convs:
        text = render_chat(tok, conv["messages"], conv.get("tools"))
        assert text.count("<|tool_call_start|>") == len(_calls(conv))
        ids, mask = assistant_mask(tok, conv["messages"], conv.get("tools"))
        assert sum(mask) > 0
        lengths.append(len(ids))
    assert sum(n <= 512 for n in lengths) >= 0.97 * len(lengths)


def test_helpers():
    assert arithmetic("(12 + 8) * 3") == 60
    assert arithmetic("7.5 + 2") == 9.5
    with pytest.raises(ValueError):
        arithmetic("__import__('os')")
    assert convert_units(100, "celsius", "fahrenheit") == 212
    assert convert_units(10, "km", "miles") == 6.21
