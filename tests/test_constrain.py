"""Constrained tool calls: the grammar byte by byte, the token masks, and generation through it."""

from __future__ import annotations

import json
import random
import string
import threading
import warnings

import pytest
import torch

import lfm2
from lfm2.constrain import (
    MAX_NUMBER_DIGITS,
    ToolCallGrammar,
    tool_call_constraint,
    wants_constraint,
)
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


# -- the tool chosen by its whole name -----------------------------------------------------------

# Names of as many tokens each, so that a random model's choice is not simply the shortest name.
NAMES = [{"type": "function", "function": {"name": n, "parameters": {}}} for n in ("a_x", "b_y", "c_z", "d_w")]


def name_scores(llm, messages, tools, first_only: bool = False) -> dict[str, float]:
    """Each listed name's log-probability after `<|tool_call_start|>[` (or its first token's), from one
    full forward pass per name on a fresh cache: independent of the incremental scoring under test."""
    tok = llm.tokenizer
    prompt = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True) + "<|tool_call_start|>["
    ids = tok.encode(prompt, add_special_tokens=False)
    scores = {}
    for t in tools:
        name = t["function"]["name"]
        full = ids + tok.encode(name + "(", add_special_tokens=False)
        with torch.inference_mode():
            logits = llm.model(torch.tensor([full]), llm.model.make_cache(1, len(full)))[0].float()
        logp = torch.log_softmax(logits, dim=-1)
        end = len(ids) + 1 if first_only else len(full)
        scores[name] = sum(logp[i - 1, full[i]].item() for i in range(len(ids), end))
    return scores


def first_name(reply) -> str:
    """The first call's name, from the call or (a random model rarely closes one) the text so far."""
    if reply.get("tool_calls"):
        return reply["tool_calls"][0]["function"]["name"]
    return reply["content"].removeprefix("<|tool_call_start|>[").partition("(")[0]


def letter_tools(seed: int) -> list[dict]:
    """Four tools named like `q_k`: as many tokens each, distinct first letters."""
    rng = random.Random(seed)
    return [{"type": "function", "function": {"name": f"{a}_{rng.choice(string.ascii_lowercase)}", "parameters": {}}}
            for a in rng.sample(string.ascii_lowercase, 4)]


def test_strict_calls_choose_the_most_likely_whole_name(llm):
    """Greedy strict calls pick the listed name the model gives the highest probability as a whole
    (checked against full forward passes), where token by token the first token decides: on this
    random model the two differ for some tool lists, so the test tells them apart."""
    messages = [{"role": "user", "content": "go"}]
    warnings.simplefilter("ignore")  # calls left open: only their names are looked at
    whole, by_token = [], []
    for seed in range(16):
        tools = letter_tools(seed)
        reply = llm.chat(messages, tools=tools, tool_choice="required", temperature=0, max_new_tokens=8)
        scores = name_scores(llm, messages, tools)
        assert first_name(reply) == max(scores, key=scores.get), (tools, scores)
        whole.append(first_name(reply))
    llm.whole_tool_names = False
    for seed in range(16):
        reply = llm.chat(messages, tools=letter_tools(seed), tool_choice="required", temperature=0, max_new_tokens=8)
        by_token.append(first_name(reply))
    assert whole != by_token
    for seed in range(16):  # token by token: the first token is the mask's argmax, whatever follows
        tools = letter_tools(seed)
        scores = name_scores(llm, messages, tools, first_only=True)
        assert by_token[seed] == max(scores, key=scores.get)


def test_whole_names_in_a_batch_and_in_the_engine_thread(llm):
    """Rows of different lengths and tool lists, decoded together, choose as each does alone; the
    engine driven from its thread (as the server drives it) chooses the same names."""
    from lfm2.engine import Engine, Request
    from lfm2.sampling import SamplingParams

    tok, greedy = llm.tokenizer, SamplingParams(temperature=0.0)
    cases = [("short", NAMES), ("a much longer request than the other one, with more words", NAMES[1:4])]
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": ask}], tools=tools,
                                                  add_generation_prompt=True) + "<|tool_call_start|>[",
                          add_special_tokens=False) for ask, tools in cases]

    def constraint(tools):
        return tool_call_constraint(tok, tools, "<|tool_call_start|>[", llm.config.vocab_size)

    def run(rows):  # synchronously, rows admitted together
        out = [[] for _ in rows]
        requests = [Request(prompts[i], greedy, 8, lambda t, j=j: out[j].append(t) or False,
                            constraint=constraint(cases[i][1])) for j, i in enumerate(rows)]
        for _ in Engine(llm.model, max_batch=len(rows), max_len=400).run(requests):
            pass
        return [tok.decode(o) for o in out]

    alone = [run([0])[0], run([1])[0]]
    assert run([0, 1]) == alone
    assert all("(" in text for text in alone)
    with Engine(llm.model, max_batch=2) as sched:
        got = [[], []]
        done = threading.Semaphore(0)
        for i in range(2):
            sched.submit(Request(prompts[i], greedy, 8, lambda t, i=i: got[i].append(t) or False,
                                 lambda r: done.release(), constraint=constraint(cases[i][1])))
        for _ in range(2):
            assert done.acquire(timeout=60)
    assert [tok.decode(g) for g in got] == alone


def test_sampled_whole_names_follow_the_seed(llm):
    """At temperature > 0 the name is drawn, reproducibly for a seed, and any listed name can come out."""
    messages = [{"role": "user", "content": "go"}]
    warnings.simplefilter("ignore")  # calls left open: only their names are looked at

    def pick(seed):
        return first_name(llm.chat(messages, tools=NAMES, tool_choice="required", temperature=2.0, seed=seed,
                                   max_new_tokens=12))

    picks = [pick(seed) for seed in range(12)]
    assert picks == [pick(seed) for seed in range(12)]
    assert len(set(picks)) > 1 and set(picks) <= {t["function"]["name"] for t in NAMES}


def test_sampled_whole_names_take_the_sampling_filters(llm):
    """The name is drawn under the row's filters as a token would be: top_k=1 (or min_p=1) leaves only
    the most likely name, whatever the temperature and the seed."""
    messages = [{"role": "user", "content": "go"}]
    warnings.simplefilter("ignore")  # calls left open: only their names are looked at
    best = first_name(llm.chat(messages, tools=NAMES, tool_choice="required", temperature=0, max_new_tokens=8))
    for seed in range(6):
        for filters in ({"top_k": 1}, {"min_p": 1.0}):
            reply = llm.chat(messages, tools=NAMES, tool_choice="required", temperature=2.0, seed=seed,
                             max_new_tokens=8, **filters)
            assert first_name(reply) == best, (seed, filters)
