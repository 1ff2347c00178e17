"""The independent tool-call evaluation's scoring (`lfm2.train.tool_eval`), on hand-made replies."""

from __future__ import annotations

import json

import pytest

from lfm2.train.tool_eval import Item, load_items, score_call, value_matches

TOOL = {"type": "function", "function": {"name": "convert", "description": "Convert money.", "parameters": {
    "type": "object", "properties": {"amount": {"type": "number"}, "to": {"type": "string"},
                                     "note": {"type": "string"}}, "required": ["amount", "to"]}}}
OTHER = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}}}
ITEM = Item("x", [{"role": "user", "content": "250 USD to yen"}], [OTHER, TOOL],
            {"name": "convert", "arguments": {"amount": 250, "to": "JPY"}}, {"to": "casefold"})


def call(name, **args):
    return [{"type": "function", "function": {"name": name, "arguments": json.dumps(args)}}]


@pytest.mark.parametrize(("calls", "expected"), [
    (call("convert", amount=250, to="JPY"), (True, True)),
    (call("convert", amount=250.0, to=" jpy "), (True, True)),   # 250 == 250.0; casefold ignores case and spaces
    (call("convert", amount=250, to="JPY", note="x"), (True, True)),  # an unscored optional argument
    (call("convert", amount=25, to="JPY"), (True, False)),
    (call("convert", amount=250), (True, False)),  # a required argument missing
    (call("convert", amount=250, to="JPY", rate=1), (True, False)),  # an argument the tool does not have
    (call("convert", amount="250", to="JPY"), (True, False)),  # a string is not the number
    (call("weather"), (False, False)),
    ([], (False, False)),
    ([{"function": {"name": "convert", "arguments": "{not json"}}], (True, False)),
])
def test_score_call(calls, expected):
    assert score_call(calls, ITEM) == expected


def test_value_matches_modes():
    assert value_matches(True, True) and not value_matches(1, True) and not value_matches(True, 1)
    assert value_matches("Running late!", "running LATE", "contains")
    assert not value_matches("late", "running", "contains")
    assert value_matches("São Paulo", "são paulo", "casefold") and not value_matches("Paulo", "São Paulo", "casefold")
    with pytest.raises(ValueError, match="unknown match mode"):
        value_matches("a", "a", "fuzzy")


def test_items_load_with_their_tools_in_order():
    items = load_items()
    assert len(items) >= 120
    for item in items:
        names = [t["function"]["name"] for t in item.tools]
        assert item.expected["name"] in names and len(set(names)) == len(names)
