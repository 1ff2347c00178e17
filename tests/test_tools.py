"""Tests for lfm2.tools: Pythonic tool calls parsed without evaluation, streamed, rendered and run.

The table of model outputs drives both the whole-text parser and the stream parser, so every
tricky case is also checked under every two-piece split and random many-piece splits.
"""

from __future__ import annotations

import builtins
import json
import keyword
import os
import random
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from enum import Enum
from typing import Literal, Optional
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lfm2.errors import GenerationError, LFM2Error, ToolError
from lfm2.tools import (
    TOOL_CALL_END,
    TOOL_CALL_START,
    ToolCallStreamParser,
    parse_tool_calls,
    prepare_messages,
    render_tool_calls,
    run_tool_calls,
    template_tools,
    tool_schema,
)
from tests.conftest import reference_file

S, E = TOOL_CALL_START, TOOL_CALL_END


def ok(text: str, content: str, *calls: tuple[str, dict], warns: bool = False) -> tuple[str, str, list, bool]:
    """A case that parses: expected content and (name, arguments) pairs; a warning only if `warns`."""
    return (text, content, list(calls), warns)


def bad(text: str) -> tuple[str, str, list, bool]:
    """A malformed case: the whole text comes back as content, with a warning, and no calls."""
    return (text, text, [], True)


CASES = [
    ok("Hello world", "Hello world"),
    ok("", ""),
    ok(f"{S}[f()]{E}", "", ("f", {})),
    ok(f"{S}[get_weather(city='Paris')]{E}", "", ("get_weather", {"city": "Paris"})),
    ok(f'{S}[f(a="x")]{E}', "", ("f", {"a": "x"})),
    ok(f"""{S}[f(a='it\\'s', b="say \\"hi\\"")]{E}""", "", ("f", {"a": "it's", "b": 'say "hi"'})),
    ok(f"""{S}[f(a="it's", b='say "hi"')]{E}""", "", ("f", {"a": "it's", "b": 'say "hi"'})),
    ok(f"""{S}[f(q='a, b), [c]', r="])}}", s='(,')]{E}""", "", ("f", {"q": "a, b), [c]", "r": "])}", "s": "(,"})),
    ok(f"{S}[f(a='line1\\nline2\\t!')]{E}", "", ("f", {"a": "line1\nline2\t!"})),
    ok(f"{S}[f(a='''x\ny''')]{E}", "", ("f", {"a": "x\ny"})),
    ok(
        f"{S}[f(city='Zürich', emoji='🌍', cjk=\"東京\")]{E}",
        "",
        ("f", {"city": "Zürich", "emoji": "🌍", "cjk": "東京"}),
    ),
    ok(f"{S}[f(город='Москва')]{E}", "", ("f", {"город": "Москва"})),
    ok(f"{S}[a.b.c(x=1)]{E}", "", ("a.b.c", {"x": 1})),
    ok(f"{S}[f(a=True, b=False, c=None)]{E}", "", ("f", {"a": True, "b": False, "c": None})),
    ok(f"{S}[f(a=true, b=false, c=null)]{E}", "", ("f", {"a": True, "b": False, "c": None})),
    ok(
        f"{S}[f(a=-3, b=2.5, c=-0.5, d=1e3, e=+4, g=0x10)]{E}",
        "",
        ("f", {"a": -3, "b": 2.5, "c": -0.5, "d": 1000.0, "e": 4, "g": 16}),
    ),
    ok(f"{S}[f(a=12345678901234567890)]{E}", "", ("f", {"a": 12345678901234567890})),
    ok(
        f"{S}[f(a=[1, [2, [3]]], b={{'k': {{'n': [1, {{'m': None}}]}}}})]{E}",
        "",
        ("f", {"a": [1, [2, [3]]], "b": {"k": {"n": [1, {"m": None}]}}}),
    ),
    ok(f'{S}[f(a={{"x": true, "y": [null, 1.5]}})]{E}', "", ("f", {"a": {"x": True, "y": [None, 1.5]}})),
    ok(f"{S}[f(a=(1, 2), b={{3}}, c=())]{E}", "", ("f", {"a": [1, 2], "b": [3], "c": []})),
    ok(f"{S}[f(a={{1: 'x'}})]{E}", "", ("f", {"a": {"1": "x"}})),
    ok(f"{S}[f(a=1), g(b='2'), h()]{E}", "", ("f", {"a": 1}), ("g", {"b": "2"}), ("h", {})),
    ok(f"{S}f(a=1){E}", "", ("f", {"a": 1})),
    ok(f"{S} f(a=1), g() {E}", "", ("f", {"a": 1}), ("g", {})),
    ok(f"{S}[]{E}", ""),
    ok(f"{S}[f(1, 'two', b=3)]{E}", "", ("f", {"arg0": 1, "arg1": "two", "b": 3})),
    ok(f"Let me check.\n{S}[f()]{E}", "Let me check.", ("f", {})),
    ok(f"{S}[f()]{E}Checking now.", "Checking now.", ("f", {})),
    ok(f"A {S}[f()]{E} B", "A\nB", ("f", {})),
    ok(f"A{S}[f()]{E}B", "A\nB", ("f", {})),
    ok(f"{S}[f()]{E} then {S}[g()]{E} done", "then\ndone", ("f", {}), ("g", {})),
    ok(f"{S}[f()]{E}{S}[g(x=2)]{E}", "", ("f", {}), ("g", {"x": 2})),
    ok(f"  \n {S}[f()]{E} \n ", "", ("f", {})),
    ok(f"  Hi {S}[f()]{E}", "  Hi", ("f", {})),
    ok(f"{S}[f()]{E} ok \n", "ok \n", ("f", {})),
    ok(f"{S}\n[f(a=1)]\n{E}", "", ("f", {"a": 1})),
    ok(f"{S}[\n  f(a=1),\n  g(b=2),\n]{E}", "", ("f", {"a": 1}), ("g", {"b": 2})),
    ok(f"{S}[f(a=1)  # a comment\n]{E}", "", ("f", {"a": 1})),
    ok(f"{S}[f(a='x' 'y')]{E}", "", ("f", {"a": "xy"})),
    ok(f"{S}[f(p=r'C:\\path')]{E}", "", ("f", {"p": "C:\\path"})),
    ok(f"{S}[true(), match(case=1)]{E}", "", ("true", {}), ("match", {"case": 1})),
    ok(f"{S}[f()]{E} {S}[g(x=y)]{E}", f"{S}[g(x=y)]{E}", ("f", {}), warns=True),
    ok(f"{S}[bad(]{E} {S}[f()]{E}", f"{S}[bad(]{E}", ("f", {}), warns=True),
    ok("a <|tool_call text", "a <|tool_call text"),
    ok("<|tool_call_start", "<|tool_call_start"),
    ok("ends with <|", "ends with <|"),
    ok("say f(a=1) without markers", "say f(a=1) without markers"),
    bad(f"oops {E} trailing"),
    bad(f"x {S}[f(a=1)]"),
    bad(f"x {S}[f(a=1)] and more"),
    bad(f"{S}[f(a=]{E}"),
    bad(f"{S}[f(a='unterminated)]{E}"),
    bad(f"{S}[f(x=os.system('rm -rf /'))]{E}"),
    bad(f"{S}[f(x=__import__('os').system('rm'))]{E}"),
    # Just a name: it parses, and only run_tool_calls' own table could ever give it meaning.
    ok(f"{S}[__import__('os')]{E}", "", ("__import__", {"arg0": "os"})),
    bad(f"{S}[(lambda: 1)()]{E}"),
    bad(f"{S}[f().g()]{E}"),
    bad(f"{S}[f()()]{E}"),
    bad(f"{S}[a[0]()]{E}"),
    bad(f"{S}[f(x=y)]{E}"),
    bad(f"{S}[f(x=1+2)]{E}"),
    bad(f"{S}[f(x=-'a')]{E}"),
    bad(f"{S}[f(x=f'{{y}}')]{E}"),
    bad(f"{S}[f(*a)]{E}"),
    bad(f"{S}[f(**a)]{E}"),
    bad(f"{S}[f(x={{**a}})]{E}"),
    bad(f"{S}[f(), 3]{E}"),
    bad(f"{S}[f]{E}"),
    bad(f"{S}[f(x=b'a')]{E}"),
    bad(f"{S}[f(x=1j)]{E}"),
    bad(f"{S}[f(x=...)]{E}"),
    bad(f"{S}[f(x=1e999)]{E}"),
    bad(f"{S}[f(x=[1, g()])]{E}"),
    bad(f"{S}[f(a=1, a=2)]{E}"),
    bad(f"{S}[f(1, arg0=2)]{E}"),
    bad(f"{S}[f(x:=1)]{E}"),
    bad(f"{S}[x = 1]{E}"),
    bad(f"{S}[f(); g()]{E}"),
    bad(f"{S} {E}"),
    bad(f"{S}[f(a='{E}')]{E}"),
    bad(f"{S}[f()] {S}[g()]{E}"),
]


def _summary(calls: list[dict]) -> list[tuple[str, dict]]:
    """Names and decoded arguments of OpenAI tool calls, after checking their shape."""
    out = []
    for call in calls:
        assert call["type"] == "function"
        assert re.fullmatch(r"call_[A-Za-z0-9]{24}", call["id"])
        assert isinstance(call["function"]["arguments"], str)
        out.append((call["function"]["name"], json.loads(call["function"]["arguments"])))
    return out


def _strict(value: object) -> str:
    """JSON text, so that True and 1 (equal in Python) compare as different."""
    return json.dumps(value, sort_keys=True)


def _parse_quietly(text: str, **kwargs) -> tuple[str, list]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return parse_tool_calls(text, **kwargs)


def _stream(pieces: list[str], **kwargs) -> tuple[str, list]:
    parser = ToolCallStreamParser(**kwargs)
    events = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for piece in pieces:
            events += parser.feed(piece)
        events += parser.finish()
    content = "".join(value for kind, value in events if kind == "content")
    calls = [call for kind, value in events if kind == "tool_calls" for call in value]
    assert all(kind in ("content", "tool_calls") for kind, _ in events)
    return content, calls


def test_table_has_enough_cases():
    assert len(CASES) >= 50
    assert len({text for text, *_ in CASES}) == len(CASES)


@pytest.mark.parametrize(("text", "content", "calls", "warns"), CASES)
def test_parse_tool_calls(text, content, calls, warns):
    def forbidden(*args, **kwargs):
        raise AssertionError("model text was executed")

    with (
        warnings.catch_warnings(record=True) as caught,
        mock.patch.object(builtins, "eval", forbidden),
        mock.patch.object(builtins, "exec", forbidden),
        mock.patch.object(os, "system", forbidden),
    ):
        warnings.simplefilter("always")
        got_content, got_calls = parse_tool_calls(text)
    assert got_content == content
    assert _strict(_summary(got_calls)) == _strict(calls)
    assert bool(caught) == warns, [str(w.message) for w in caught]


@pytest.mark.parametrize(("text", "content", "calls", "warns"), CASES)
def test_stream_matches_whole_text_for_every_split(text, content, calls, warns):
    expected = _strict(calls)
    for cut in range(len(text) + 1):
        got_content, got_calls = _stream([text[:cut], text[cut:]])
        assert got_content == content, cut
        assert _strict(_summary(got_calls)) == expected, cut
    rng = random.Random(text)
    for _ in range(20):
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(1, 12))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        got_content, got_calls = _stream(pieces)
        assert got_content == content, pieces
        assert _strict(_summary(got_calls)) == expected, pieces
    got_content, got_calls = _stream(list(text))
    assert (got_content, _strict(_summary(got_calls))) == (content, expected)


def test_stream_emits_content_before_the_block_closes():
    parser = ToolCallStreamParser()
    assert parser.feed("Let me look") == [("content", "Let me look")]
    assert parser.feed(" that up.") == [("content", " that up.")]
    assert parser.feed(" <|tool_") == []  # a space that a block may swallow, and a partial marker
    assert parser.feed("call_start|>[f(a=1") == []
    events = parser.feed(")]<|tool_call_end|>Done")
    assert [kind for kind, _ in events] == ["tool_calls", "content"]
    assert _summary(events[0][1]) == [("f", {"a": 1})]
    assert events[1] == ("content", "\nDone")
    assert parser.finish() == []


def test_stream_releases_a_partial_marker_that_turns_out_to_be_text():
    parser = ToolCallStreamParser()
    assert parser.feed("a <|tool") == [("content", "a")]
    assert parser.feed("box|> b") == [("content", " <|toolbox|> b")]
    assert parser.feed(" <|tool_call_st") == []
    assert parser.finish() == [("content", " <|tool_call_st")]


def test_stream_flushes_an_unclosed_block_as_content_with_a_warning():
    parser = ToolCallStreamParser()
    assert parser.feed(f"x {S}[f(a=1)") == [("content", "x")]
    with pytest.warns(UserWarning, match="without an end marker"):
        assert parser.finish() == [("content", f" {S}[f(a=1)")]


def test_positional_arguments_take_schema_names_when_tools_are_given():
    def search(query: str, limit: int = 5) -> list:
        return []

    text = f"{S}[search('cats', 3, extra=1), other(1)]{E}"
    expected = [("search", {"query": "cats", "limit": 3, "extra": 1}), ("other", {"arg0": 1})]
    assert _summary(parse_tool_calls(text, tools=[search])[1]) == expected
    assert _summary(_stream([text[:30], text[30:]], tools=[tool_schema(search)])[1]) == expected


def test_ids_are_unique():
    _, calls = parse_tool_calls(f"{S}[f(), f(), f()]{E}")
    assert len({call["id"] for call in calls}) == 3


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------

identifiers = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,7}", fullmatch=True).filter(
    lambda name: not keyword.iskeyword(name)
)
dotted_names = st.lists(identifiers, min_size=1, max_size=3).map(".".join)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
    | st.sampled_from([S, E, "'", '"', "\\", "\n", "'\"", "\\'", "<|", "|>"])
)
values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8,
)
call_lists = st.lists(st.tuples(dotted_names, st.dictionaries(identifiers, values, max_size=4)), min_size=1, max_size=3)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(calls=call_lists, json_arguments=st.booleans())
def test_render_then_parse_round_trips(calls, json_arguments):
    def forbidden(*args, **kwargs):
        raise AssertionError("model text was executed")

    openai_calls = [
        {"function": {"name": name, "arguments": json.dumps(args) if json_arguments else args}} for name, args in calls
    ]
    with mock.patch.object(builtins, "eval", forbidden), mock.patch.object(builtins, "exec", forbidden):
        text = render_tool_calls(openai_calls)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a round trip must never hit the malformed path
            content, parsed = parse_tool_calls(f"Sure.{text}")
    assert content == "Sure."
    assert _strict(_summary(parsed)) == _strict([list(call) for call in calls])


fragments = st.sampled_from(
    [S, E, S[:7], E[5:], "[", "]", "(", ")", "f(", "a.b(", "x=", "'", '"', ",", " ", "\n", "1", "true"]
)
texts = st.lists(st.text(max_size=6) | fragments, max_size=12).map("".join)


@settings(max_examples=300, deadline=None)
@given(text=texts, cuts=st.lists(st.integers(min_value=0, max_value=80), max_size=6))
def test_arbitrary_text_never_raises_and_streams_like_whole_text(text, cuts):
    def forbidden(*args, **kwargs):
        raise AssertionError("model text was executed")

    with mock.patch.object(builtins, "eval", forbidden), mock.patch.object(builtins, "exec", forbidden):
        content, calls = _parse_quietly(text)
        bounds = sorted({min(c, len(text)) for c in cuts})
        pieces = [text[a:b] for a, b in zip([0, *bounds], [*bounds, len(text)], strict=True)]
        stream_content, stream_calls = _stream(pieces)
    assert isinstance(content, str)
    assert stream_content == content
    assert _strict(_summary(stream_calls)) == _strict(_summary(calls))
    if not calls and S not in text:
        assert content == text


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def _call(name: str, arguments: dict | str, call_id: str = "call_1") -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def test_render_tool_calls_examples():
    calls = [
        _call("get_weather", {"city": "Paris", "days": 3, "metric": True, "at": None}),
        _call("a.b", '{"opts": {"x": [1, 2]}, "tags": ["x", "y"]}'),
        _call("now", {}),
    ]
    assert render_tool_calls(calls) == (
        f"{S}[get_weather(city='Paris', days=3, metric=True, at=None), "
        f"""a.b(opts={{"x": [1, 2]}}, tags=['x', 'y']), now()]{E}"""
    )
    assert render_tool_calls([_call("f", {"s": "it's\n\\"})]) == f"{S}[f(s='it\\'s\\n\\\\')]{E}"


@pytest.mark.parametrize(
    ("calls", "match"),
    [
        ([_call("bad name", {})], "identifier"),
        ([_call("f", {"not valid": 1})], "argument name"),
        ([_call("f", "{not json")], "not valid JSON"),
        ([_call("f", "[1, 2]")], "JSON object"),
        ([{"function": {"arguments": {}}}], "name"),
        (["f()"], "must be a dict"),
        ("f()", "must be a list"),
    ],
)
def test_render_tool_calls_rejects_bad_calls(calls, match):
    with pytest.raises(ToolError, match=match):
        render_tool_calls(calls)


def _jinja_env():
    jinja2 = pytest.importorskip("jinja2")
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """transformers' `{% generation %}` tag, which only marks assistant text for masking."""

        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    # transformers' tojson: no HTML escaping, no key sorting.
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    return env


def _template(name: str) -> str:
    return reference_file("chat_templates", name).read_text()


SIMPLE_ARGUMENTS = [
    {"city": "Paris"},
    {"city": "New York", "days": 3},
    {"n": -2, "x": 1.5, "flag": False, "none": None},
    {"filters": {"max": 10, "unit": "c"}},
    {"query": "it is", "nested": {"a": [1, 2], "b": "x"}, "k": 7},
    {},
]


@pytest.mark.reference
@pytest.mark.parametrize("arguments", SIMPLE_ARGUMENTS)
def test_render_matches_the_template_macro(arguments):
    source = _template("LFM2.5-8B-A1B.jinja")
    macros = "".join(
        re.search(r"{%-? macro " + name + r".*?{%-? endmacro -?%}", source, re.S).group(0)
        for name in ("format_arg_value", "render_tool_calls")
    )
    env = _jinja_env()
    calls = [_call("get_weather", arguments), _call("tools.now", {"tz": "UTC"})]
    expected = env.from_string(macros + "{{ render_tool_calls(calls) }}").render(calls=calls)
    assert render_tool_calls(calls) == expected
    assert (
        render_tool_calls(
            [{**c, "function": {**c["function"], "arguments": json.dumps(arguments)}} for c in calls][:1] + calls[1:]
        )
        == expected
    )


@pytest.mark.reference
def test_prepared_messages_render_the_same_with_and_without_template_support():
    env = _jinja_env()
    template = env.from_string(_template("LFM2.5-8B-A1B.jinja"))
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [_call("get_weather", '{"city": "Paris"}')]},
        {"role": "tool", "tool_call_id": "call_1", "content": {"temp": 21}},
        {"role": "assistant", "content": "It is 21 C."},
    ]
    native = template.render(messages=prepare_messages(messages, True), bos_token="<s>")
    as_text = template.render(messages=prepare_messages(messages, False), bos_token="<s>")
    assert native == as_text
    assert f"<|im_start|>assistant\n{S}[get_weather(city='Paris')]{E}<|im_end|>" in native
    assert '{"temp": 21}' in native


# ---------------------------------------------------------------------------------------------
# prepare_messages
# ---------------------------------------------------------------------------------------------


def test_prepare_messages_appends_rendered_calls_and_does_not_mutate():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "assistant", "content": "Checking.", "tool_calls": [_call("f", '{"a": 1}')]},
        {"role": "assistant", "content": None, "tool_calls": [_call("g", {"b": "x"})]},
        {"role": "tool", "tool_call_id": "call_1", "content": [1, "ü"]},
        {"role": "assistant", "content": [{"type": "text", "text": "hi"}], "tool_calls": [_call("h", {})]},
        {"role": "tool", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "tool", "content": None},
        {"role": "assistant", "content": "no calls", "tool_calls": []},
    ]
    snapshot = json.dumps(messages)
    out = prepare_messages(messages, template_renders_tool_calls=False)
    assert json.dumps(messages) == snapshot
    assert out[0] == {"role": "system", "content": "Be brief."}
    assert out[1] == {"role": "assistant", "content": f"Checking.{S}[f(a=1)]{E}"}
    assert out[2] == {"role": "assistant", "content": f"{S}[g(b='x')]{E}"}
    assert out[3] == {"role": "tool", "tool_call_id": "call_1", "content": '[1, "ü"]'}
    assert out[4]["content"] == [{"type": "text", "text": "hi"}, {"type": "text", "text": f"{S}[h()]{E}"}]
    assert out[5] == {"role": "tool", "content": "ab"}
    assert out[6] == {"role": "tool", "content": ""}
    assert out[7] == {"role": "assistant", "content": "no calls"}
    assert prepare_messages(messages[7:], template_renders_tool_calls=True) == [out[7]]
    assert all(a is not b for a, b in zip(out, messages, strict=True))


def test_prepare_messages_parses_arguments_when_the_template_renders_calls():
    messages = [{"role": "assistant", "content": "", "tool_calls": [_call("f", '{"a": [1]}')]}]
    out = prepare_messages(messages, template_renders_tool_calls=True)
    assert out[0]["tool_calls"] == [_call("f", {"a": [1]})]
    assert messages[0]["tool_calls"][0]["function"]["arguments"] == '{"a": [1]}'
    out[0]["tool_calls"][0]["function"]["arguments"]["a"].append(2)
    assert messages[0]["tool_calls"][0]["function"]["arguments"] == '{"a": [1]}'


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ("hello", "list of dicts"),
        ([{"role": "user", "content": "x"}, "oops"], r"messages\[1\]"),
        ([{"role": "robot", "content": "x"}], r"messages\[0\].*role.*robot"),
        ([{"content": "x"}], "role"),
        ([{"role": "user", "content": 3}], r"messages\[0\].*content"),
        ([{"role": "user", "content": "x", "tool_calls": []}], "only assistant"),
        ([{"role": "assistant", "content": "", "tool_calls": {"a": 1}}], r"messages\[0\]\.tool_calls"),
        ([{"role": "assistant", "tool_calls": [_call("f", "{bad")]}], r"tool_calls\[0\]\.function\.arguments"),
        ([{"role": "assistant", "tool_calls": [{"type": "code", "function": {}}]}], "'type' must be"),
        ([{"role": "assistant", "tool_calls": [{"function": {"name": ""}}]}], "name"),
    ],
)
def test_prepare_messages_rejects_bad_messages(messages, match):
    with pytest.raises(ToolError, match=match):
        prepare_messages(messages, template_renders_tool_calls=False)


def test_tool_error_is_a_generation_error():
    assert issubclass(ToolError, GenerationError) and issubclass(ToolError, LFM2Error)


# ---------------------------------------------------------------------------------------------
# tool_schema
# ---------------------------------------------------------------------------------------------

WEATHER = {
    "name": "get_weather",
    "description": "Get the weather.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


def test_tool_schema_accepts_both_dict_shapes_and_copies():
    openai = {"type": "function", "function": WEATHER}
    assert tool_schema(openai) == openai
    assert tool_schema(WEATHER) == openai
    out = tool_schema(WEATHER)
    out["function"]["parameters"]["properties"]["city"]["type"] = "integer"
    assert WEATHER["parameters"]["properties"]["city"]["type"] == "string"
    assert tool_schema({"name": "ping"}) == {
        "type": "function",
        "function": {"name": "ping", "description": "", "parameters": {"type": "object", "properties": {}}},
    }


class Unit(Enum):
    CELSIUS = "c"
    FAHRENHEIT = "f"


def get_forecast(
    city: str,
    days: int = 3,
    unit: Literal["c", "f"] = "c",
    scale: Unit = Unit.CELSIUS,
    hours: Optional[list[int]] = None,  # noqa: UP045 - the typing spelling is part of the test
    extra: dict[str, float] | None = None,
    detailed: bool = False,
    *,
    ratio: float,
) -> str:
    """Get the forecast for a city.

    Uses the national service.

    Args:
        city (str): The city name, e.g.
            'Paris'.
        days: How many days ahead.
        unit: Temperature unit.
        ratio: A ratio.

    Returns:
        The forecast text.
    """
    return city


def test_tool_schema_from_a_function():
    # transformers would refuse this function (four arguments lack a description); we describe what we can,
    # in transformers' format: the whole description, `nullable` for Optional, the return value.
    assert tool_schema(get_forecast) == {
        "type": "function",
        "function": {
            "name": "get_forecast",
            "description": "Get the forecast for a city.\n\nUses the national service.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "The city name, e.g. 'Paris'."},
                    "days": {"type": "integer", "description": "How many days ahead."},
                    "unit": {"type": "string", "enum": ["c", "f"], "description": "Temperature unit."},
                    "scale": {"type": "string", "enum": ["c", "f"]},
                    "hours": {"type": "array", "items": {"type": "integer"}, "nullable": True},
                    "extra": {"type": "object", "additionalProperties": {"type": "number"}, "nullable": True},
                    "detailed": {"type": "boolean"},
                    "ratio": {"type": "number", "description": "A ratio."},
                },
                "required": ["city", "ratio"],
            },
            "return": {"type": "string", "description": "The forecast text."},
        },
    }


def convert_money(amount: float, currency: Literal["EUR", "USD", 1, None], rounding: int | str | None = None,
                  pair: tuple[str, int] = ("a", 1), notes: list | None = None, when: Unit | None = None,
                  mode: str = "fast") -> dict[str, list[float]]:
    """Convert an amount of money.

    Rates are refreshed hourly,
    and cached.

    Args:
        amount (float): how much
        currency: the target currency
        rounding: digits, or a
            named rule such as 'bank'
        pair: a currency and a scale
        notes: free notes
        when: a unit of time
        mode: how hard to try (choices: ["fast", "exact"])

    Returns:
        a mapping of rates
        to amounts

    Raises:
        ValueError: never
    """
    return {}


def no_return_doc(x: int, y: bool = False) -> int:
    """Short.

    Args:
        x: an x
        y: a y
    """
    return x


class Shelf:
    def put(self, item: str) -> None:
        """Put an item on the shelf.

        Args:
            item: what to put
        """


@pytest.mark.parametrize("fn", [convert_money, no_return_doc, Shelf().put], ids=["rich", "no-return-doc", "method"])
def test_tool_schema_of_a_callable_equals_transformers(fn):
    # The chat template lists a callable as this schema; transformers' get_json_schema is the reference.
    transformers_utils = pytest.importorskip("transformers.utils")
    expected = transformers_utils.get_json_schema(fn)
    assert tool_schema(fn) == expected
    assert json.dumps(tool_schema(fn)) == json.dumps(expected)  # the same key order, so the same prompt text


def test_template_tools_keep_dicts_as_given_and_convert_callables():
    bare = {"parameters": {"type": "object", "properties": {}}, "name": "ping", "x-extra": 1}
    wrapped = {"type": "function", "function": dict(WEATHER)}
    got = template_tools([bare, wrapped, no_return_doc])
    assert got == [bare, wrapped, tool_schema(no_return_doc)]
    assert list(got[0]) == ["parameters", "name", "x-extra"]  # key order kept: it is the prompt's order
    got[0]["name"] = "changed"
    assert bare["name"] == "ping"  # copies: the caller's dicts are never touched
    assert template_tools(None) is None
    with pytest.raises(ToolError, match=r"tools\[1\] must be a dict"):
        template_tools([bare, 3])
    with pytest.raises(ToolError, match="list of tool dicts"):
        template_tools(bare)


def test_tool_schema_from_an_untyped_function_and_a_method():
    class Box:
        def put(self, item, count=1):
            """Put things in the box."""

    schema = tool_schema(Box().put)["function"]
    assert schema["name"] == "put" and schema["description"] == "Put things in the box."
    assert schema["parameters"] == {"type": "object", "properties": {"item": {}, "count": {}}, "required": ["item"]}


def _var_args(*items: str) -> None:
    """Takes anything."""


def _var_kwargs(**options: str) -> None:
    """Takes anything."""


def _bad_type(x: complex) -> None:
    """A type JSON cannot describe."""


@pytest.mark.parametrize(
    ("tool", "match"),
    [
        (42, "dict .* or a Python callable"),
        ("get_weather", "dict .* or a Python callable"),
        ({"description": "x"}, "no 'name'"),
        ({"type": "function", "function": {"description": "x"}}, "no 'name'"),
        ({"type": "function", "function": "f"}, "'function' must be a dict"),
        ({"type": "retrieval", "function": WEATHER}, "'type' must be 'function'"),
        ({"name": "f", "parameters": [1]}, "'parameters' must be"),
        ({"name": "f", "description": 3}, "'description' must be a string"),
        (_var_args, r"\*items"),
        (_var_kwargs, r"\*\*options"),
        (_bad_type, "complex"),
        (lambda x: x, "__name__"),
    ],
)
def test_tool_schema_rejects_bad_tools(tool, match):
    with pytest.raises(ToolError, match=match):
        tool_schema(tool)


# ---------------------------------------------------------------------------------------------
# run_tool_calls
# ---------------------------------------------------------------------------------------------


def add(a: int, b: int = 0) -> int:
    return a + b


def fail(reason: str) -> None:
    raise RuntimeError(f"broken: {reason}")


def test_run_tool_calls_returns_tool_messages():
    calls = [
        _call("add", '{"a": 2, "b": 3}', "call_a"),
        _call("add", {"arg0": 4}, "call_b"),
        _call("echo", {"x": [1, "é"]}, "call_c"),
        _call("fail", {"reason": "disk"}, "call_d"),
        _call("missing", {}, "call_e"),
        _call("add", {"c": 1}, "call_f"),
        _call("add", "{not json", "call_g"),
        "not a call",
    ]
    functions = {"add": add, "echo": lambda x: {"got": x}, "fail": fail}
    out = run_tool_calls(calls, functions)
    assert [m["role"] for m in out] == ["tool"] * 8
    assert [m["tool_call_id"] for m in out] == [
        "call_a",
        "call_b",
        "call_c",
        "call_d",
        "call_e",
        "call_f",
        "call_g",
        "",
    ]
    assert [m["name"] for m in out[:7]] == ["add", "add", "echo", "fail", "missing", "add", "add"]
    assert out[0]["content"] == "5"
    assert out[1]["content"] == "4"
    assert out[2]["content"] == '{"got": [1, "é"]}'
    assert out[3]["content"] == "Error: RuntimeError: broken: disk"
    assert out[4]["content"].startswith("Error:") and "'missing'" in out[4]["content"] and "add" in out[4]["content"]
    assert out[5]["content"].startswith("Error: TypeError")
    assert out[6]["content"].startswith("Error:") and "JSON" in out[6]["content"]
    assert out[7]["content"].startswith("Error:")


def test_run_tool_calls_accepts_a_list_and_only_calls_what_it_is_given():
    calls = [_call("add", {"a": 1}), _call("system", {"arg0": "echo hi"}), _call("os.system", {"arg0": "x"})]
    with mock.patch.object(os, "system", side_effect=AssertionError("called")) as system:
        out = run_tool_calls(calls, [add])
    system.assert_not_called()
    assert out[0]["content"] == "1"
    assert all(m["content"].startswith("Error:") for m in out[1:])


def test_run_tool_calls_falls_back_to_str_for_results_json_cannot_hold():
    out = run_tool_calls([_call("obj", {}), _call("text", {})], {"obj": lambda: {1, 2}, "text": lambda: "plain"})
    assert out[0]["content"] == "{1, 2}"
    assert out[1]["content"] == "plain"


def tag(names: Sequence[str], ids: set[int], pairs: Mapping[str, float], rest: Iterable[bool] = ()) -> None:
    """Tag things."""


def test_tool_schema_describes_hints_transformers_refuses():
    props = tool_schema(tag)["function"]["parameters"]["properties"]
    assert props == {"names": {"type": "array", "items": {"type": "string"}},
                     "ids": {"type": "array", "items": {"type": "integer"}},
                     "pairs": {"type": "object", "additionalProperties": {"type": "number"}},
                     "rest": {"type": "array", "items": {"type": "boolean"}}}
