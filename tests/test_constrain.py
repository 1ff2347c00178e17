"""Constrained tool calls: the grammar byte by byte, the token masks, and generation through it."""

from __future__ import annotations

import json
import warnings

import pytest

import lfm2
from lfm2.constrain import MAX_NUMBER_DIGITS, ToolCallGrammar, tool_call_constraint, wants_constraint
from lfm2.errors import ToolError
from lfm2.tools import parse_tool_calls, render_tool_calls
from tests.test_chat import Script

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "required": ["city"],
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}, "unit": {"enum": ["c", "f", "°C"]},
                       "detailed": {"type": "boolean"}, "ratio": {"type": ["number", "null"]},
                       "tags": {"type": "array"}, "where": {"type": "object"}}}}},
    {"type": "function", "function": {"name": "get_weather_map", "parameters": {"type": "object", "properties": {}}}},
    {"type": "function", "function": {"name": "log", "parameters": {}}},  # no "properties": any parameters
]
# For the model tests (the test checkpoint's context is 512 tokens of a 600-token vocabulary).
SMALL = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "required": ["city"],
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}, "unit": {"enum": ["c", "f"]}}}}},
    {"type": "function", "function": {"name": "get_weather_map", "parameters": {"type": "object", "properties": {}}}}]


def accepts(text: str, tools=TOOLS) -> bool:
    grammar = ToolCallGrammar(tools)
    return grammar.feed(grammar.initial(), text.encode()) == ("end",)


@pytest.mark.parametrize("args", [
    {"city": "Paris", "days": 0, "ratio": -0.5},
    {"city": "It's \"quoted\" \\ and | <|tool_call_end|>", "days": -3},
    {"city": "Zürich 東京", "unit": "f", "detailed": False, "ratio": None},
    {"city": "Oslo", "unit": "°C"},
    {"city": "Oslo", "ratio": 0.25, "tags": ["a", "b]", [1, 2]], "where": {"lat": 1.5, "name": "x}"}},
])
def test_rendered_calls_are_accepted(args):
    calls = [{"function": {"name": "get_weather", "arguments": args}}, {"function": {"name": "get_weather_map",
                                                                                     "arguments": {}}}]
    rendered = render_tool_calls(calls)
    body = rendered.removeprefix("<|tool_call_start|>").removesuffix("<|tool_call_end|>")
    assert accepts(body), body
    assert parse_tool_calls(rendered, TOOLS)[1][0]["function"]["arguments"] == json.dumps(args, ensure_ascii=False)


@pytest.mark.parametrize("text", [
    "[get_wether(city='Paris')]",  # no such tool
    "[get_weather(town='Paris')]",  # no such parameter
    "[get_weather(city='Paris', city='Rome')]",  # a parameter twice
    "[get_weather(days=3)]",  # the required city missing
    "[get_weather(city=Paris)]",  # a bare word where a string belongs
    "[get_weather(city='Paris', days='three')]",  # a string where an integer belongs
    "[get_weather(city='Paris', days=2.5)]",  # a float where an integer belongs
    "[get_weather(city='Paris', unit='kelvin')]",  # not one of the enum's values
    "[get_weather(city='Paris', detailed=yes)]",
    "[get_weather(city='Pa\nris')]",  # a raw newline inside a string
    "[get_weather(city='Paris', tags=[1, 2)]",  # unbalanced brackets
    "[get_weather_map(x=1)]",  # a tool without parameters
    "[get_weather(city='Paris')",  # the list never closed
    "get_weather(city='Paris')",  # no list
    f"[get_weather(city='Paris', days={'9' * (MAX_NUMBER_DIGITS + 1)})]",  # a runaway number
    "[get_weather(city='Paris', days=07)]",  # a leading zero (Python refuses it)
    "[get_weather(city='Paris', ratio=1.)]",  # a dot without a digit after it
])
def test_invalid_calls_are_rejected(text):
    assert not accepts(text)


def test_free_parameters_and_several_calls():
    assert accepts("[log(level='info', n=[1, {'a': 2}], ok=True), get_weather(city='Rome'),get_weather_map()]")
    assert not accepts("[log(1bad=2)]")


def test_bad_tools_and_forced_text_are_refused():
    with pytest.raises(ToolError, match="at least one tool"):
        ToolCallGrammar([])
    with pytest.raises(ToolError, match="no 'name'"):
        ToolCallGrammar([{"type": "function", "function": {"description": "nameless"}}])


def test_wants_constraint():
    assert not wants_constraint(TOOLS, None, None) and not wants_constraint(TOOLS, "auto", None)
    assert wants_constraint(TOOLS, "required", None) and wants_constraint(TOOLS, {"function": {"name": "log"}}, None)
    strict = [{"type": "function", "function": {"name": "f", "strict": True}}]
    assert wants_constraint(strict, None, None) and not wants_constraint(strict, None, False)
    assert wants_constraint(TOOLS, None, True)


@pytest.fixture
def llm(chat_checkpoint):
    return lfm2.load(chat_checkpoint)


@pytest.mark.parametrize("tools, text", [
    (SMALL, "[get_weather(city='Lyon', days=12, unit=\"c\"), get_weather_map()]"),
    (TOOLS, "[get_weather(city='a\\'b\"', tags=['x', {\"k\": (1, 2)}], where={'a': \"]\"}), log(z=None)]"),
])
def test_masks_follow_the_grammar_token_by_token(llm, tools, text):
    """Every token of a valid call is allowed where it comes; the masks hold exactly the tokens whose
    bytes the grammar accepts (checked against a brute-force pass over the vocabulary; in strings the
    masks are built from the tokens of plain characters plus a walk over the rest)."""
    tok = llm.tokenizer
    c = tool_call_constraint(tok, tools)
    assert c.mask() is None  # outside a call block nothing is constrained
    c.advance(tok.token_to_id("<|tool_call_start|>"))
    ids = tok.encode(text)
    token_bytes = tok.token_bytes()
    for i in ids:
        mask = c.mask()
        assert mask is not None and mask[i]
        brute = {t for t, b in enumerate(token_bytes) if b and c.grammar.feed(c.state, b) is not None}
        assert set(mask.nonzero().flatten().tolist()) == brute
        c.advance(i)
    end = tok.token_to_id("<|tool_call_end|>")
    assert c.mask().nonzero().flatten().tolist() == [end]  # after `]`, only the end marker
    c.advance(end)
    assert c.mask() is None


def test_token_bytes_decode_like_the_tokenizer(llm):
    tok = llm.tokenizer
    token_bytes = tok.token_bytes()
    assert token_bytes[tok.token_to_id("<|tool_call_start|>")] is None
    text = "Zürich 東京 <naïve> 'x'\n"
    assert b"".join(token_bytes[i] for i in tok.encode(text)) == text.encode()


def valid_prefix(text: str, tools: list[dict]) -> bool:
    """Whether `text` (a reply starting with the start marker) is a prefix of valid calls to `tools`."""
    grammar = ToolCallGrammar(tools)
    body = text.removeprefix("<|tool_call_start|>").removesuffix("<|tool_call_end|>")
    return text.startswith("<|tool_call_start|>") and grammar.feed(grammar.initial(), body.encode()) is not None


def test_strict_tools_keep_a_bad_call_valid(llm):
    """The model is scripted to call a misspelt tool with a string for an integer and an unknown
    parameter: unconstrained, that is what comes out; with strict tools, every token keeps the block
    a valid call (this random model then goes on calling tools, so the block stays open)."""
    bad = "<|tool_call_start|>[get_weathr(city='Paris', days='three', colour='red')]<|tool_call_end|>"
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    s = Script(llm, [bad, bad, bad])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            free = llm.chat(messages, tools=SMALL, temperature=0, max_new_tokens=60)
            strict = llm.chat(messages, tools=SMALL, temperature=0, max_new_tokens=60, strict_tools=True)
            streamed = list(llm.chat_stream(messages, tools=SMALL, temperature=0, max_new_tokens=60,
                                            strict_tools=True))
    finally:
        s.close()
    assert free["tool_calls"][0]["function"]["name"] == "get_weathr"
    assert not strict.get("tool_calls") and strict["content"].startswith("<|tool_call_start|>[get_weather")
    assert valid_prefix(strict["content"], SMALL) and not valid_prefix(bad, SMALL)
    assert "".join(d.get("content", "") for d in streamed) == strict["content"]


def test_strict_tools_leave_a_valid_call_alone(llm):
    good = "Sure.<|tool_call_start|>[get_weather(city='Rome, Italy', days=3, unit='f')]<|tool_call_end|>"
    messages = [{"role": "user", "content": "Rome?"}]
    s = Script(llm, [good, good])
    try:
        free = llm.chat(messages, tools=SMALL, temperature=0)
        strict = llm.chat(messages, tools=SMALL, temperature=0, strict_tools=True)
    finally:
        s.close()
    assert strict["content"] == free["content"] == "Sure."
    assert strict["tool_calls"][0]["function"] == free["tool_calls"][0]["function"]
    assert json.loads(strict["tool_calls"][0]["function"]["arguments"]) == {"city": "Rome, Italy", "days": 3,
                                                                            "unit": "f"}


@pytest.mark.parametrize("seed", range(4))
def test_sampled_calls_under_tool_choice_are_always_valid(llm, seed):
    """A random model sampling at temperature 1 inside a forced call: whatever it writes keeps the
    block a valid prefix, and any call it finishes parses against the schema."""
    reply = llm.chat([{"role": "user", "content": "go"}], tools=SMALL, tool_choice="required", temperature=1.0,
                     seed=seed, max_new_tokens=60)
    for call in reply.get("tool_calls") or []:
        assert call["function"]["name"] in {"get_weather", "get_weather_map"}
        if call["function"]["name"] == "get_weather":
            assert "city" in json.loads(call["function"]["arguments"])
    if not reply.get("tool_calls"):  # ran out of tokens inside the block
        assert valid_prefix(reply["content"], SMALL), reply["content"]
