"""Structured output (`lfm2.structured`): replies held to JSON schemas, regexes and choices.

A random-weight model sampled at temperature 1 is the hardest writer a grammar can get: it has no
idea what JSON is, so every valid reply is the constraint's doing. Each of the 26 schemas in
`tests/data/json_schemas.json` (objects nested and open, bounded arrays, enums, number ranges,
patterns, lengths, formats, $ref/$defs and recursion, anyOf/allOf, tuples, nullable unions) is
sampled three times and every finished reply must validate with `jsonschema` (a reply cut by
`max_new_tokens`, an unclosed string of this model's random text, must be a prefix the grammar allows).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import openai
import pytest
import torch

import lfm2
from lfm2 import structured
from lfm2.engine import Engine, Request
from lfm2.sampling import SamplingParams

SCHEMAS = json.loads((Path(__file__).parent / "data" / "json_schemas.json").read_text())
UNSUPPORTED = {
    "uniqueItems": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
    "propertyNames": {"type": "object", "propertyNames": {"pattern": "^a"}},
    "dependentSchemas": {"type": "object", "dependentSchemas": {"a": {"required": ["b"]}}},
    "if": {"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}},
    "contains": {"type": "array", "contains": {"const": 3}},
    "unevaluatedProperties": {"type": "object", "properties": {"a": {"type": "integer"}},
                              "unevaluatedProperties": False},
}


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    """A random model whose tokenizer was trained on the test corpus plus JSON, so that quotes and
    brackets are tokens of their own and a random string ends within a few hundred tokens."""
    from lfm2.tokenizer import Tokenizer
    from lfm2.train.tokenizer import train_tokenizer
    from tests.conftest import CORPUS, tiny_config, write_checkpoint

    path = tmp_path_factory.mktemp("structured")
    samples = [json.dumps(s) for s in SCHEMAS.values()] + ['{"a": "b", "c": [1, 2.5, true, null]}'] * 10
    train_tokenizer(CORPUS + samples * 10, vocab_size=600, out_dir=path)
    vocab = Tokenizer.from_dir(path).vocab_size
    config = tiny_config(vocab_size=vocab, tie_word_embeddings=False, max_position_embeddings=1024)
    return lfm2.load(write_checkpoint(path, config, seed=3))


def test_every_reply_validates_at_temperature_1(llm):
    """All 26 schemas x 3 seeds as rows of one batch (the engine runs a grammar per row)."""
    tok, size, stops = llm.tokenizer, llm.config.vocab_size, frozenset(llm.tokenizer.stop_ids)
    prompt = tok.encode("Reply in JSON:", add_special_tokens=True)
    rows = [(name, seed) for name in sorted(SCHEMAS) for seed in range(3)]
    outs: dict[tuple[str, int], list[int]] = {row: [] for row in rows}
    requests = []
    for row in rows:
        fmt = structured.json_schema(SCHEMAS[row[0]])
        requests.append(Request(prompt, SamplingParams(temperature=1.0, seed=row[1]), 300,
                                lambda t, out=outs[row]: out.append(t) and False, stop_ids=stops,
                                constraint=structured.constraint(fmt, tok, size, sorted(stops))))
    engine = Engine(llm.model, max_batch=len(rows), max_len=len(prompt) + 301)
    for _ in engine.run(requests):
        pass
    finished = set()
    for row, request in zip(rows, requests, strict=True):
        text = tok.decode(outs[row])
        if request.result.finish_reason == "stop":
            finished.add(row[0])
            jsonschema.validate(json.loads(text), SCHEMAS[row[0]])
        else:  # cut by max_new_tokens (an unclosed random string): still a prefix the grammar allows
            assert request.result.finish_reason == "length", request.result
            c = structured.constraint(structured.json_schema(SCHEMAS[row[0]]), tok, size, sorted(stops))
            assert c.matcher.try_consume_tokens(outs[row]) == len(outs[row]), text
    assert len(finished) >= len(SCHEMAS) - 2, f"only {sorted(finished)} finished within 300 tokens"


def test_chat_reply_and_stream_validate(llm):
    schema = SCHEMAS["array_of_objects"]
    messages = [{"role": "user", "content": "List items."}]
    reply = llm.chat(messages, json_schema=schema, temperature=1.0, seed=3, max_new_tokens=400)
    jsonschema.validate(json.loads(reply["content"]), schema)
    pieces = list(llm.chat_stream(messages, json_schema=schema, temperature=1.0, seed=3, max_new_tokens=400))
    assert "".join(p.get("content", "") for p in pieces) == reply["content"]
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    replies = llm.chat(messages, response_format=fmt, n=3, temperature=1.0, seed=5, max_new_tokens=400)
    assert len({r["content"] for r in replies}) > 1  # the choices differ, each valid
    for r in replies:
        jsonschema.validate(json.loads(r["content"]), schema)


def test_json_object_regex_and_choice(llm):
    objects = 0
    for seed in range(3):
        text = llm.chat([{"role": "user", "content": "JSON please"}], response_format={"type": "json_object"},
                        temperature=1.0, seed=seed, max_new_tokens=300)["content"]
        if llm.last_stats[0].finish_reason == "stop":
            objects += isinstance(json.loads(text), dict)
        code = llm.generate("Code:", regex=r"[A-Z]{3}-[0-9]{2,4}", temperature=1.0, seed=seed)
        assert re.fullmatch(r"[A-Z]{3}-[0-9]{2,4}", code), code
        assert llm.generate("Pick:", choice=["red", "green", "blue"], temperature=1.0, seed=seed) in {
            "red", "green", "blue"}
    assert objects >= 1


def test_a_pydantic_model_is_a_schema(llm):
    pydantic = pytest.importorskip("pydantic")

    class Point(pydantic.BaseModel):
        x: int
        y: int

    finished = 0
    for seed in range(4):  # a random model may write an integer longer than the token budget: count those that end
        text = llm.generate("Point:", json_schema=Point, temperature=1.0, seed=seed, max_new_tokens=150)
        if llm.last_stats[0].finish_reason == "stop":
            Point.model_validate_json(text)
            finished += 1
    assert finished >= 1


@pytest.mark.parametrize("keyword", sorted(UNSUPPORTED))
def test_unsupported_keywords_are_refused_by_name(llm, keyword):
    with pytest.raises(structured.StructuredOutputError, match=repr(keyword)) as info:
        llm.generate("x", json_schema=UNSUPPORTED[keyword])
    assert info.value.keyword == keyword


def test_bad_formats_are_refused_clearly(llm):
    with pytest.raises(structured.StructuredOutputError, match="regular expression"):
        llm.generate("x", regex="[unclosed")
    with pytest.raises(structured.StructuredOutputError, match="list of non-empty strings"):
        llm.generate("x", choice="yes")
    with pytest.raises(structured.StructuredOutputError, match="'yaml' is not supported"):
        llm.chat([{"role": "user", "content": "x"}], response_format={"type": "yaml"})
    with pytest.raises(lfm2.errors.GenerationError, match="one structured-output argument"):
        llm.generate("x", regex="a", choice=["a"])


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "strict": True, "parameters": {
        "type": "object", "additionalProperties": False, "required": ["city", "days"], "properties": {
            "city": {"type": "string", "minLength": 1, "maxLength": 12},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
            "unit": {"enum": ["celsius", "fahrenheit"]},
            "verbose": {"type": "boolean"}}}}},
    {"type": "function", "function": {"name": "book_flight", "strict": True, "parameters": {
        "$defs": {"airport": {"type": "string", "pattern": "^[A-Z]{3}$"}},
        "type": "object", "additionalProperties": False, "required": ["route", "passengers"], "properties": {
            "route": {"type": "object", "additionalProperties": False, "required": ["from", "to"], "properties": {
                "from": {"$ref": "#/$defs/airport"}, "to": {"$ref": "#/$defs/airport"}}},
            "passengers": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
                "type": "object", "required": ["name"], "additionalProperties": False,
                "properties": {"name": {"type": "string", "maxLength": 10},
                               "age": {"type": "integer", "minimum": 0, "maximum": 120}}}},
            "budget": {"type": ["number", "null"], "minimum": 0}}}}},
]


def _check_calls(reply: dict) -> int:
    """Every call's arguments validate against its tool's full parameter schema."""
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for call in reply.get("tool_calls", []):
        jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[call["function"]["name"]])
    return len(reply.get("tool_calls", []))


def test_strict_calls_follow_the_full_argument_schemas(llm):
    calls = 0
    for seed in range(6):
        reply = llm.chat([{"role": "user", "content": "Book it"}], tools=TOOLS, tool_choice="required",
                         temperature=1.0, seed=seed, max_new_tokens=300)
        if llm.last_stats[0].finish_reason == "stop":
            assert "<|tool_call" not in reply["content"]
            calls += _check_calls(reply)
    assert calls >= 3
    named = {"type": "function", "function": {"name": "book_flight"}}
    for seed in range(3):
        reply = llm.chat([{"role": "user", "content": "Fly"}], tools=TOOLS, tool_choice=named, temperature=1.0,
                         seed=seed, max_new_tokens=300)
        if llm.last_stats[0].finish_reason == "stop":
            assert [c["function"]["name"] for c in reply["tool_calls"]][0] == "book_flight"
            _check_calls(reply)


def test_python_spellings_of_values_are_allowed():
    # LFM2 models write strings in single quotes and booleans as True/False (LFM2.5's template does).
    from lfm2.tools import parse_tool_calls

    fmt = structured.reply_grammar(None, TOOLS, forced=False)
    import llguidance

    from lfm2.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(Path(lfm2.__file__).parent / "bundled" / "lfm2-tiny")
    lltok = structured.grammar_tokenizer(tok, tok.vocab_size, sorted(tok.stop_ids))
    text = "<|tool_call_start|>[get_weather(city='Paris', days=3, verbose=True)]<|tool_call_end|>"
    matcher = llguidance.LLMatcher(lltok, fmt)
    ids = tok.encode(text)
    assert matcher.try_consume_tokens(ids) == len(ids), matcher.get_error()
    _, calls = parse_tool_calls(text, TOOLS)
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "days": 3, "verbose": True}
    for bad in ("days=9", "city='much too long a city'", "days=3, verbose='yes'", "city=3"):
        m = llguidance.LLMatcher(lltok, fmt)
        ids = tok.encode(f"<|tool_call_start|>[get_weather(city='Oslo', {bad})]<|tool_call_end|>".replace(
            "city='Oslo', city", "city"))
        assert m.try_consume_tokens(ids) < len(ids), bad


def test_with_tools_the_reply_is_the_format_or_a_call(llm):
    schema = SCHEMAS["person"]
    answers = 0
    for seed in range(5):
        reply = llm.chat([{"role": "user", "content": "Weather?"}], tools=TOOLS, json_schema=schema,
                         temperature=1.0, seed=seed, max_new_tokens=300)
        if llm.last_stats[0].finish_reason != "stop":
            continue
        if reply.get("tool_calls"):
            _check_calls(reply)
        else:
            answers += 1
            jsonschema.validate(json.loads(reply["content"]), schema)
    assert answers >= 1
    finished = 0
    for seed in range(4):  # a forced call is the reply
        forced = llm.chat([{"role": "user", "content": "Weather?"}], tools=TOOLS, tool_choice="required",
                          json_schema=schema, temperature=1.0, seed=seed, max_new_tokens=300)
        if llm.last_stats[0].finish_reason == "stop":
            finished += 1
            assert _check_calls(forced) >= 1
    assert finished >= 1


def test_whole_tool_names_are_chosen_in_grammar_calls(llm):
    c = structured.calls_constraint(None, TOOLS, llm.tokenizer, llm.config.vocab_size,
                                    sorted(llm.tokenizer.stop_ids), forced="<|tool_call_start|>[")
    assert c.at_name() and c.look_ahead_room() == max(len(ids) for ids in c.name_ids)
    c.force(c.name_ids[1])
    for t in c.name_ids[1]:
        assert c.mask().nonzero().flatten().tolist() == [t]
        c.advance(t)
    assert not c.at_name() and not c.matcher.is_error()


def test_prefix_reuse_keeps_the_constraint(llm):
    messages = [{"role": "user", "content": "Tell me about a person, as JSON, at some length please."}]
    first = llm.chat(messages, json_schema=SCHEMAS["person"], temperature=0, max_new_tokens=200)
    again = llm.chat(messages, json_schema=SCHEMAS["person"], temperature=0, max_new_tokens=200)
    assert llm.last_stats[0].cached_tokens > 0
    assert again == first


class _Counting:
    """A processor that allows everything and counts the engine's calls."""

    def __init__(self, size: int) -> None:
        self.prepared = self.masked = 0
        self.size = size

    def look_ahead_room(self) -> int:
        return 0

    def prepare(self) -> None:
        self.prepared += 1

    def mask(self) -> torch.Tensor:
        self.masked += 1
        return torch.ones(self.size, dtype=torch.bool)

    def advance(self, token: int) -> None:
        pass


def test_the_engine_prepares_masks_before_each_decode_step(llm):
    proc = _Counting(llm.config.vocab_size)
    engine = Engine(llm.model, max_batch=1, max_len=64)
    request = Request([1, 2, 3], SamplingParams(temperature=0.0), 8, lambda t: False, lambda r: None,
                      ignore_eos=True, constraint=proc)
    for _ in engine.run([request]):
        pass
    assert proc.masked == 8 and proc.prepared == 7  # every decode step (the first token comes from prefill)


# -- the server -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def live(llm):
    from tests.test_server import Live

    server = Live(llm, max_batch=4, max_queue=8)
    yield server
    server.close()


def test_server_response_format_json_schema(live):
    schema = SCHEMAS["tool_arguments"]
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": schema, "strict": True}}
    out = live.client.chat.completions.create(model="lfm2-tiny", messages=[{"role": "user", "content": "Hi"}],
                                              response_format=fmt, temperature=1.0, seed=4, max_tokens=300, n=2)
    for choice in out.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), schema)
    stream = live.client.chat.completions.create(model="lfm2-tiny", messages=[{"role": "user", "content": "Hi"}],
                                                 response_format=fmt, temperature=1.0, seed=4, max_tokens=300,
                                                 stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), schema)
    obj = live.client.chat.completions.create(model="lfm2-tiny", messages=[{"role": "user", "content": "Hi"}],
                                              response_format={"type": "json_object"}, temperature=1.0, seed=1,
                                              max_tokens=300)
    assert isinstance(json.loads(obj.choices[0].message.content), dict)


def test_server_completions_take_a_response_format(live):
    schema = SCHEMAS["enum"]
    out = live.client.completions.create(model="lfm2-tiny", prompt="JSON:", max_tokens=100, temperature=1.0,
                                         extra_body={"response_format": {"type": "json_schema", "json_schema": {
                                             "name": "e", "schema": schema}}})
    jsonschema.validate(json.loads(out.choices[0].text), schema)


def test_server_takes_vllms_guided_fields(live):
    out = live.client.chat.completions.create(model="lfm2-tiny", messages=[{"role": "user", "content": "Hi"}],
                                              temperature=1.0, extra_body={"guided_choice": ["alpha", "beta"]})
    assert out.choices[0].message.content in {"alpha", "beta"}
    out = live.client.completions.create(model="lfm2-tiny", prompt="Code:", temperature=1.0, max_tokens=30,
                                         extra_body={"guided_regex": "[A-Z]{3}-[0-9]{3}"})
    assert re.fullmatch("[A-Z]{3}-[0-9]{3}", out.choices[0].text)
    schema = SCHEMAS["integer_exclusive"]
    out = live.client.chat.completions.create(model="lfm2-tiny", messages=[{"role": "user", "content": "Hi"}],
                                              temperature=1.0, extra_body={"guided_json": schema})
    jsonschema.validate(json.loads(out.choices[0].message.content), schema)
    with pytest.raises(openai.BadRequestError, match="guided_regex: not a valid regular expression"):
        live.client.completions.create(model="lfm2-tiny", prompt="x", extra_body={"guided_regex": "[a-"})


def test_server_refuses_unsupported_schemas_by_name(live):
    fmt = {"type": "json_schema", "json_schema": {"name": "u", "schema": UNSUPPORTED["uniqueItems"]}}
    with pytest.raises(openai.BadRequestError) as info:
        live.client.chat.completions.create(model="lfm2-tiny", messages=[{"role": "user", "content": "Hi"}],
                                            response_format=fmt)
    body = info.value.body
    assert "'uniqueItems'" in body["message"] and body["param"] == "response_format.json_schema.schema"
    with pytest.raises(openai.BadRequestError, match="schema: required"):
        live.client.chat.completions.create(model="lfm2-tiny", messages=[{"role": "user", "content": "Hi"}],
                                            response_format={"type": "json_schema", "json_schema": {"name": "u"}})
    with pytest.raises(openai.BadRequestError, match="give one output format"):
        live.client.chat.completions.create(model="lfm2-tiny", messages=[{"role": "user", "content": "Hi"}],
                                            response_format={"type": "json_object"},
                                            extra_body={"guided_regex": "a+"})
    with pytest.raises(openai.BadRequestError, match="ignore_eos"):
        live.client.chat.completions.create(model="lfm2-tiny", messages=[{"role": "user", "content": "Hi"}],
                                            response_format={"type": "json_object"},
                                            extra_body={"ignore_eos": True})


def test_a_reasoning_model_thinks_freely_and_answers_in_the_format(tmp_path):
    from tests.test_reasoning import Scripted, make_checkpoint, thinker

    llm = lfm2.load(make_checkpoint(tmp_path / "think"))
    schema = SCHEMAS["integer_exclusive"]  # bounded: the answer always completes
    with Scripted(llm, thinker(" more", '{"score": 5, "count": 12}')):
        reply = llm.chat([{"role": "user", "content": "Score it"}], json_schema=schema, max_reasoning_tokens=6,
                         temperature=1.0, seed=2, max_new_tokens=100)
    assert set(reply["reasoning_content"].split()) == {"more"}  # the thought, unconstrained, then closed
    jsonschema.validate(json.loads(reply["content"]), schema)
    assert llm.last_stats[0].finish_reason == "stop"


def test_keywords_the_engine_accepts_are_enforced(llm):
    # llguidance accepts these; the replies must show that they hold, not merely parse
    for schema, holds in [({"type": "integer", "multipleOf": 7, "minimum": 1, "maximum": 200}, lambda v: v % 7 == 0),
                          ({"type": "object", "minProperties": 2, "maxProperties": 3,
                            "additionalProperties": {"type": "integer", "minimum": 0, "maximum": 9}},
                           lambda v: 2 <= len(v) <= 3),
                          ({"type": "string", "format": "date"}, lambda v: len(v) == 10 and v[4] == "-")]:
        texts = llm.generate("x", n=3, json_schema=schema, temperature=1.0, seed=11, max_new_tokens=200)
        for text, stats in zip(texts, llm.last_stats, strict=True):
            if stats.finish_reason == "stop":
                value = json.loads(text)
                jsonschema.validate(value, schema)
                assert holds(value), (schema, text)
