"""The OpenAI-compatible server, driven live (uvicorn on a free port) with the official `openai` client.

Replies are scripted where the test needs exact text (tool calls, stop sequences): a forward hook
recognises the prompt and forces the model's tokens, as in test_chat.py. The concurrency test
needs no script: greedy decoding of the random model, whose top-1 margins it checks first, must
give each of 16 simultaneous clients exactly the text it gets alone.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lfm2
from lfm2.server import COMPLETION_MAX_TOKENS, _max_token_bytes, create_app

MODEL = "lfm2-tiny"
USER = [{"role": "user", "content": "Hi there"}]
TOOL_CALLS = [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "x"}'}}]


class Live:
    """A uvicorn server for `create_app(llm, ...)` in a thread, and an `openai` client for it."""

    def __init__(self, llm, **options) -> None:
        self.app = create_app(llm, MODEL, **options)
        self.scheduler = self.app.state.engine
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=60)

    def post(self, path: str, **kw) -> httpx.Response:
        return httpx.post(self.url + path, timeout=60, **kw)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def llm(chat_checkpoint):
    return lfm2.load(chat_checkpoint)


@pytest.fixture(scope="module")
def live(llm):
    server = Live(llm, max_batch=16, max_queue=8)
    yield server
    server.close()


class Script:
    """Make the model reply `replies[key]` (then <|im_end|>) to any prompt containing `key`.

    Requests must run one at a time (batch 1), so that each forward call belongs to one request.
    """

    def __init__(self, llm, replies: dict[str, str]) -> None:
        tok = llm.tokenizer
        self.tok = tok
        self.replies = {k: tok.encode(v) + [tok.token_to_id("<|im_end|>")] for k, v in replies.items()}
        self.current: list[int] | None = None
        self.step = 0
        self.prompts: list[str] = []
        # Every request must start with a prefill that the hooks see: no prefix reuse meanwhile.
        self.cache, self.cache_bytes = llm.prefix_cache, llm.prefix_cache.max_bytes
        llm.prefix_cache.max_bytes = 0
        self.handles = [llm.model.register_forward_pre_hook(self.pre),
                        llm.model.lm_head.register_forward_hook(self.post)]

    def pre(self, module, args):
        ids = args[0]
        assert ids.shape[0] == 1, "scripted requests must run one at a time"
        # Several tokens on a filled cache: strict tool calls scoring the listed names, not a prefill.
        self.scoring = ids.shape[1] > 1 and args[1].length > 0
        if ids.shape[1] > 1 and not self.scoring:  # a prefill: a new request starts
            prompt = self.tok.decode(ids[0].tolist())
            self.prompts.append(prompt)
            self.current = next((v for k, v in self.replies.items() if k in prompt), None)
            self.step = 0

    def post(self, module, args, out):
        if self.current is None:
            return out
        out = out.clone()
        if self.scoring:  # the scripted tokens that would follow, position by position
            for i in range(out.shape[1]):
                out[:, i, self.current[min(self.step + i, len(self.current) - 1)]] = 1e4
            return out
        out[..., self.current[min(self.step, len(self.current) - 1)]] = 1e4
        self.step += 1
        return out

    def __enter__(self) -> Script:
        return self

    def __exit__(self, *exc) -> None:
        self.cache.max_bytes = self.cache_bytes
        for h in self.handles:
            h.remove()


def get_weather_tool() -> dict:
    return {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def stream_chat(client, **kw) -> tuple[str, list, str, object, list]:
    """Content, tool-call deltas, finish reason, usage and all chunks of a streamed chat completion."""
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    calls = [t for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or []]
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1, f"expected one finish_reason, got {finish}"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None  # include_usage: a last, usage-only chunk
    return content, calls, finish[0], chunks[-1].usage, chunks


# -- endpoints -----------------------------------------------------------------------------------


def test_models_and_health(live):
    models = live.client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert live.client.models.retrieve(MODEL).id == MODEL
    health = httpx.get(live.url + "/health").json()
    assert health["status"] == "ok" and health["max_batch"] == 16 and health["active"] == 0
    assert health["compiled_decode"] == "off"  # a test model is far below lfm2.compile.AUTO_MIN_WEIGHTS


def test_chat_non_streamed_and_streamed_with_usage(live, llm):
    reply = "Hello! How can I help?"
    with Script(llm, {"Hi there": reply}):
        whole = live.client.chat.completions.create(model=MODEL, messages=USER)
        content, calls, finish, usage, chunks = stream_chat(live.client, model=MODEL, messages=USER)
    prompt_ids = llm.chat_prompt(USER, None, None)[0]
    assert whole.object == "chat.completion" and whole.id.startswith("chatcmpl-") and whole.model == MODEL
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == reply == content
    assert choice.finish_reason == finish == "stop" and not choice.message.tool_calls and not calls
    expected = (len(prompt_ids), len(llm.tokenizer.encode(reply)) + 1)  # + the <|im_end|> it sampled
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == expected
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (*expected, sum(expected))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)


def test_chat_renders_system_and_tool_history(live, llm):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Oslo?"}]},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "rainy, 8 C"},
    ]
    with Script(llm, {"rainy, 8 C": "It is rainy."}) as script:
        reply = live.client.chat.completions.create(model=MODEL, messages=messages, tools=[get_weather_tool()])
    assert reply.choices[0].message.content == "It is rainy."
    prompt = script.prompts[0]
    assert "<|im_start|>system\n" in prompt and "Be brief." in prompt and "Weather in Oslo?" in prompt
    assert "[get_weather(city='Oslo')]" in prompt and "<|tool_response_start|>rainy, 8 C" in prompt
    assert '"name": "get_weather"' in prompt  # the tool list


CALL = "Let me check.<|tool_call_start|>[get_weather(city='Paris, France')]<|tool_call_end|>"


def test_tool_calls_non_streamed(live, llm):
    with Script(llm, {"Weather in Paris": CALL}):
        reply = live.client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[get_weather_tool()])
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris, France"}


def test_tool_calls_streamed(live, llm):
    with Script(llm, {"Weather in Paris": CALL}):
        content, calls, finish, usage, _ = stream_chat(
            live.client, model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}],
            tools=[get_weather_tool()])
    assert content == "Let me check." and finish == "tool_calls"
    (call,) = calls
    assert call.index == 0 and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris, France"}
    assert usage.completion_tokens == len(llm.tokenizer.encode(CALL)) + 1


def test_named_tool_choice_forces_the_call(live, llm):
    with Script(llm, {"anything": "city='Rome')]<|tool_call_end|>"}) as script:
        reply = live.client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "anything"}], tools=[get_weather_tool()],
            tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert script.prompts[0].endswith("<|im_start|>assistant\n<|tool_call_start|>[get_weather(")
    assert reply.choices[0].finish_reason == "tool_calls"
    assert json.loads(reply.choices[0].message.tool_calls[0].function.arguments) == {"city": "Rome"}
    assert reply.choices[0].message.content is None


def test_strict_function_constrains_the_call(live, llm):
    """OpenAI's `"strict": true` on a function: the server keeps the model's call valid against the
    schema (a misspelt tool name cannot come out); without it, the call comes out as written."""
    from lfm2.constrain import ToolCallGrammar

    bad = "<|tool_call_start|>[get_wether(city='Oslo')]<|tool_call_end|>"
    strict_tool = get_weather_tool()
    strict_tool["function"]["strict"] = True
    messages = [{"role": "user", "content": "Weather in Oslo?"}]
    with Script(llm, {"Weather in Oslo": bad}):
        free = live.client.chat.completions.create(model=MODEL, messages=messages, tools=[get_weather_tool()])
        strict = live.client.chat.completions.create(model=MODEL, messages=messages, tools=[strict_tool],
                                                     max_tokens=40)
    assert free.choices[0].message.tool_calls[0].function.name == "get_wether"
    message = strict.choices[0].message
    if message.tool_calls:
        assert message.tool_calls[0].function.name == "get_weather"
        assert isinstance(json.loads(message.tool_calls[0].function.arguments)["city"], str)
    else:  # the block ran out of tokens: still a valid start of a call
        grammar = ToolCallGrammar([strict_tool])
        body = message.content.removeprefix("<|tool_call_start|>")
        assert message.content.startswith("<|tool_call_start|>[get_weather(")
        assert grammar.feed(grammar.initial(), body.encode()) is not None


def test_stop_sequences_and_max_tokens(live, llm):
    text = "one two three four five"
    with Script(llm, {"count": text}):
        messages = [{"role": "user", "content": "count"}]
        whole = live.client.chat.completions.create(model=MODEL, messages=messages, stop=[" three", "zzz"])
        content, _, finish, usage, _ = stream_chat(live.client, model=MODEL, messages=messages, stop=" three")
        short = live.client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=2)
        legacy = live.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3)
    assert whole.choices[0].message.content == content == "one two"
    assert whole.choices[0].finish_reason == finish == "stop"
    assert whole.usage.completion_tokens == usage.completion_tokens < len(llm.tokenizer.encode(text))
    ids = llm.tokenizer.encode(text)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2
    assert short.choices[0].message.content == llm.tokenizer.decode(ids[:2])
    assert legacy.usage.completion_tokens == 3


def test_completions_non_streamed_and_streamed(live, llm):
    prompts = ["The quick brown fox", "Numbers: 12345"]
    kw = dict(model=MODEL, max_tokens=12, temperature=0.0, extra_body={"ignore_eos": True})
    whole = live.client.completions.create(prompt=prompts, **kw)
    assert whole.object == "text_completion" and [c.index for c in whole.choices] == [0, 1]
    solo = [live.client.completions.create(prompt=p, **kw).choices[0].text for p in prompts]
    assert [c.text for c in whole.choices] == solo
    assert all(c.finish_reason == "length" for c in whole.choices)
    prompt_tokens = sum(len(llm.tokenizer.encode(p, add_special_tokens=True)) for p in prompts)
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (prompt_tokens, 24)
    chunks = list(live.client.completions.create(prompt=prompts, stream=True, stream_options={"include_usage": True},
                                                 **kw))
    texts = ["", ""]
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.text
    assert texts == solo and chunks[-1].usage.completion_tokens == 24
    ids = llm.tokenizer.encode(prompts[0], add_special_tokens=True)
    by_ids = live.client.completions.create(prompt=ids, **kw)
    assert by_ids.choices[0].text == solo[0]
    echoed = live.client.completions.create(prompt=prompts[1], echo=True, **kw)
    assert echoed.choices[0].text == prompts[1] + solo[1]


def test_seeded_sampling_is_reproducible(live):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=1.0, top_p=0.9,
              extra_body={"ignore_eos": True, "top_k": 40, "min_p": 0.01})
    a, b = (live.client.completions.create(seed=1234, **kw).choices[0].text for _ in range(2))
    c = live.client.completions.create(seed=4321, **kw).choices[0].text
    assert a == b != c


def test_tiny_temperatures_mean_greedy(live):
    """1e-30 would overflow the logits to inf; like vLLM, the server treats it as 0."""
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=8, extra_body={"ignore_eos": True})
    tiny = live.client.completions.create(temperature=1e-30, **kw).choices[0].text
    assert tiny == live.client.completions.create(temperature=0, **kw).choices[0].text


def test_each_request_is_logged_as_json(live, caplog):
    with caplog.at_level(logging.INFO, logger="lfm2.server"):
        reply = live.client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, temperature=0,
                                               extra_body={"ignore_eos": True})
        deadline = time.time() + 5
        records: list[dict] = []
        while not records and time.time() < deadline:
            records = [json.loads(r.getMessage()) for r in caplog.records if r.name == "lfm2.server"]
            records = [r for r in records if r.get("id") == reply.id]
            time.sleep(0.01)
    (record,) = records
    assert record["event"] == "request" and record["endpoint"] == "completions" and record["status"] == "ok"
    assert record["prompt_tokens"] == reply.usage.prompt_tokens and record["completion_tokens"] == 5
    assert record["ttft_ms"] > 0 and record["tokens_per_s"] > 0 and record["finish_reason"] == ["length"]


# -- errors ----------------------------------------------------------------------------------------

LONG = " ".join(["word"] * 2000)
CHAT = "/v1/chat/completions"


def chat(**overrides) -> dict:
    return {"model": MODEL, "messages": USER, "max_tokens": 4, **overrides}


ERRORS = [
    # (path, body or raw bytes, status, param, words the message must contain)
    (CHAT, b'{"model": "lfm2-tiny", "messages": [', 400, None, "not valid JSON"),
    (CHAT, [1, 2], 400, None, "JSON object"),
    (CHAT, {"model": MODEL}, 400, "messages", "missing"),
    (CHAT, chat(temperature="hot"), 400, "temperature", "number"),
    (CHAT, chat(temperature=5), 400, "temperature", "less than or equal to 2"),
    (CHAT, chat(max_tokens=-5), 400, "max_tokens", "greater than or equal to 1"),
    (CHAT, chat(max_tokens=10**12), 400, "max_tokens", "too large"),
    (CHAT, chat(max_completion_tokens=1.5), 400, "max_completion_tokens", "integer"),
    (CHAT, chat(model="gpt-4"), 404, "model", "does not exist"),
    (CHAT, chat(messages=[{"role": "user", "content": LONG}]), 400, "messages", "maximum context length"),
    (CHAT, chat(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages[0].role", "'user'"),
    (CHAT, chat(messages=[{"role": "user"}]), 400, "messages[0].content", "needs 'content'"),
    (CHAT, chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]), 400,
     "messages[0].content[0].image_url.url", "missing"),
    (CHAT, chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64,iVBORw0KGgo="}}]}]), 400, "messages", "reads text only"),
    (CHAT, chat(messages=[{"role": "user", "content": [{"type": "audio", "audio": {}}]}]), 400,
     "messages[0].content[0].type", "'text'"),
    (CHAT, chat(n=1000), 400, "n", "at most"),
    (CHAT, chat(top_logprobs=2), 400, "top_logprobs", "needs logprobs"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 6}, 400, "logprobs", "less than or equal"),
    (CHAT, chat(stop=[""]), 400, "stop", "empty"),
    (CHAT, chat(stop=5), 400, "stop", "string"),
    (CHAT, chat(seed=2**70), 400, "seed", "less than"),
    (CHAT, chat(top_p=0), 400, "top_p", "greater than 0"),
    (CHAT, chat(top_k=-7), 400, "top_k", "greater than or equal to -1"),
    (CHAT, chat(stream="yes"), 400, "stream", "boolean"),
    (CHAT, chat(tools=[get_weather_tool()], tool_choice={"type": "function", "function": {"name": "nope"}}), 400,
     "tool_choice", "not among the tools"),
    (CHAT, chat(tool_choice="required"), 400, "tool_choice", "needs tools"),
    (CHAT, chat(tools=[{"type": "function", "function": {"name": "bad name!"}}]), 400, "tools[0].function.name",
     "pattern"),
    (CHAT, chat(messages=[{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]), 400, "messages",
     "arguments"),
    ("/v1/completions", {"model": MODEL, "prompt": [[1, 10**7]]}, 400, "prompt", "outside the vocabulary"),
    ("/v1/completions", {"model": MODEL, "prompt": []}, 400, "prompt", "empty"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "best_of": 3}, 400, "best_of", "not supported"),
    # Bodies that are no request at all.
    (CHAT, b"", 400, None, "the request body is empty: send a JSON object with 'model' and 'messages'"),
    ("/v1/completions", b"", 400, None, "the request body is empty: send a JSON object with 'model' and 'prompt'"),
    (CHAT, b"null", 400, None, "must be a JSON object with 'model' and 'messages', got null"),
    (CHAT, b'"hi"', 400, None, "must be a JSON object with 'model' and 'messages', got a string"),
    (CHAT, b"{not json", 400, None, "not valid JSON"),
    # What each role needs: the schema and the server agree (a tool's result has content, as in OpenAI's API).
    (CHAT, chat(messages=[{"role": "tool", "tool_call_id": "c"}]), 400, "messages[0].content", "needs 'content'"),
    (CHAT, chat(messages=[{"role": "tool", "content": None}]), 400, "messages[0].content", "needs 'content'"),
    (CHAT, chat(messages=[{"role": "assistant", "content": None}]), 400, "messages[0].content", "needs 'content'"),
    (CHAT, chat(messages=[{"content": "hi"}]), 400, "messages[0].role", "missing"),
    (CHAT, chat(messages=[{"role": "user", "content": "hi", "tool_calls": TOOL_CALLS}]), 400,
     "messages[0].tool_calls", "only assistant messages"),
    # JSON may spell a lone surrogate, which is no character: the tokenizer cannot take it.
    (CHAT, b'{"model": "lfm2-tiny", "messages": [{"role": "user", "content": "a\\ud800"}]}', 400,
     "messages[0].content", "lone UTF-16 surrogate"),
    ("/v1/completions", b'{"model": "lfm2-tiny", "prompt": ["ok", "\\udfff"]}', 400, "prompt[1]", "surrogate"),
    (CHAT, b'{"model": "\\ud800", "messages": [{"role": "user", "content": "a"}]}', 404, "model", "does not exist"),
]


@pytest.mark.parametrize("path,body,status,param,words", ERRORS, ids=[f"{e[3]}-{e[4]}" for e in ERRORS])
def test_bad_requests_get_openai_errors(live, path, body, status, param, words):
    if isinstance(body, bytes):
        r = live.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = live.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and words in error["message"], error
    assert error["type"] == "invalid_request_error"
    assert "NoneType" not in error["message"] and "Field required" not in error["message"]


def test_errors_through_the_openai_client(live):
    with pytest.raises(openai.NotFoundError) as e:
        live.client.chat.completions.create(model="nope", messages=USER)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        live.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": LONG}])
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:  # streamed requests are checked before the stream starts
        live.client.completions.create(model=MODEL, prompt="x", stream=True, max_tokens=0)
    assert e.value.param == "max_tokens"
    for path, method in (("/nowhere", "GET"), ("/health", "DELETE")):
        r = httpx.request(method, live.url + path)
        assert r.status_code in (404, 405) and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(live.url + "/health").json()["status"] == "ok"


def test_completions_default_to_16_tokens_and_chat_to_the_rest_of_the_context(live, llm):
    """OpenAI's defaults: 16 tokens for /v1/completions (fewer if the context has less room); a
    chat completion runs to the end of the context."""
    kw = dict(model=MODEL, temperature=0, extra_body={"ignore_eos": True})
    reply = live.client.completions.create(prompt="Once upon a time", **kw)
    assert reply.usage.completion_tokens == COMPLETION_MAX_TOKENS == 16
    assert reply.choices[0].finish_reason == "length"
    limit = live.scheduler.max_len
    almost_full = [7] * (limit - 5)  # room for 5 tokens
    reply = live.client.completions.create(prompt=almost_full, **kw)
    assert reply.usage.completion_tokens == 5 and reply.choices[0].finish_reason == "length"

    def messages(words: int) -> list[dict]:
        return [{"role": "user", "content": " ".join(["word"] * words)}]

    per_word = (len(llm.chat_prompt(messages(101), None, None)[0]) - len(llm.chat_prompt(messages(1), None, None)[0]))
    words = int((limit - 40 - len(llm.chat_prompt(messages(1), None, None)[0])) / (per_word / 100))
    room = limit - len(llm.chat_prompt(messages(words), None, None)[0])
    assert 16 < room < 80, f"fixture: {room} free slots"
    reply = live.client.chat.completions.create(messages=messages(words), **kw)
    assert reply.usage.completion_tokens == room and reply.choices[0].finish_reason == "length"


def test_openapi_documents_what_the_server_answers(live):
    """No 422 (the server answers 400); every error status with OpenAI's error body; streams as
    server-sent events; a tool message's content required, as the server requires it."""
    doc = httpx.get(live.url + "/openapi.json").json()
    schemas = doc["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and "securitySchemes" not in doc["components"]
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            codes = set(operation["responses"])
            assert "422" not in codes and "401" not in codes, (method, path)  # no API key on this server
            assert {"200", "413", "500"} <= codes
            for code in codes - {"200"}:
                assert operation["responses"][code]["content"]["application/json"]["schema"] == error_ref
    for path, chunk in ((CHAT, "ChatCompletionChunk"), ("/v1/completions", "Completion")):
        responses = doc["paths"][path]["post"]["responses"]
        assert {"400", "404", "413", "429", "500", "503"} < set(responses)
        assert "Retry-After" in responses["429"]["headers"]
        stream = responses["200"]["content"]["text/event-stream"]["schema"]["properties"]["data"]["anyOf"]
        assert stream[0] == {"const": "[DONE]"}
        assert {"$ref": f"#/components/schemas/{chunk}"} in stream[1]["contentSchema"]["anyOf"]
    assert schemas["ErrorResponse"]["required"] == ["error"]
    assert set(schemas["ErrorDetail"]["required"]) == {"message", "type", "param", "code"}
    assert "content" in schemas["ToolMessage"]["required"] and "content" in schemas["UserMessage"]["required"]
    assert "content" not in schemas["AssistantMessage"]["required"]  # tool calls may stand in for it


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(data=st.data())
def test_a_token_never_stands_for_more_than_max_token_bytes(llm, data):
    """The bound behind refusing long prompts before tokenizing: n bytes of text are at least
    n / max_token_bytes tokens. Texts made of the vocabulary's own tokens, the longest included,
    come closest to it."""
    tok = llm.tokenizer
    longest = _max_token_bytes(tok)
    assert longest is not None
    pieces = [tok.decode([i]) for i in range(tok.vocab_size)]
    pieces.sort(key=lambda p: -len(p.encode()))
    piece = st.one_of(st.sampled_from(pieces[:20]), st.sampled_from(pieces), st.text(max_size=8))
    text = "".join(data.draw(st.lists(piece, max_size=40)))
    assert len(tok.encode(text)) >= -(-len(text.encode()) // longest)


def test_a_huge_prompt_is_refused_before_tokenizing_while_others_go_on(live, llm, monkeypatch):
    """3 MiB of text (under the body limit) cannot fit 512 tokens: the server says so from its
    length, without rendering or tokenizing it, and small requests meanwhile answer at once."""
    rendered: list[int] = []
    render = llm.tokenizer.apply_chat_template
    monkeypatch.setattr(llm.tokenizer, "apply_chat_template",
                        lambda messages, *a, **kw: rendered.append(len(messages)) or render(messages, *a, **kw))
    huge = "many words " * (3 * 2**20 // 11)
    small = {"model": MODEL, "prompt": "Hi", "max_tokens": 1}
    latencies = []
    with ThreadPoolExecutor(1) as pool:
        big = pool.submit(live.post, CHAT, json=chat(messages=[{"role": "user", "content": huge}]))
        while not big.done() and len(latencies) < 100:
            start = time.perf_counter()
            assert live.post("/v1/completions", json=small).status_code == 200
            latencies.append(time.perf_counter() - start)
        r = big.result()
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded" and "at least" in error["message"] and not rendered
    assert max(latencies, default=0.0) < 1.0, latencies


@pytest.mark.parametrize("path", [CHAT, "/v1/completions"])
def test_prompts_are_built_off_the_event_loop(live, llm, monkeypatch, path):
    """The chat template and the tokenizer run in worker threads: while one request's prompt takes
    2 s to build, another request is answered."""
    started = threading.Event()
    tok = llm.tokenizer
    render, encode_batch = tok.apply_chat_template, tok.encode_batch

    def slowly(build, marked: bool):
        if marked:
            started.set()
            time.sleep(2)
        return build

    monkeypatch.setattr(tok, "apply_chat_template",
                        lambda m, *a, **kw: slowly(render, "slowly" in str(m))(m, *a, **kw))
    monkeypatch.setattr(tok, "encode_batch",
                        lambda t, *a, **kw: slowly(encode_batch, "slowly" in str(t))(t, *a, **kw))
    body = (chat(messages=[{"role": "user", "content": "slowly"}]) if path == CHAT
            else {"model": MODEL, "prompt": "slowly", "max_tokens": 2})
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(live.post, path, json=body)
        assert started.wait(30)
        start = time.perf_counter()
        quick = live.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
        waited = time.perf_counter() - start
        assert slow.result().status_code == 200
    assert quick.status_code == 200 and waited < 1.0, f"a 2 s prompt held another request up for {waited:.1f} s"


# -- concurrency -------------------------------------------------------------------------------------


@torch.inference_mode()
def greedy_margin(model, prompt: list[int], steps: int, stop_ids) -> float:
    """The smallest top-1 minus top-2 logit margin along the greedy path (stop ids end it)."""
    cache = model.make_cache(1, len(prompt) + steps)
    logits = model(torch.tensor([prompt]), cache, last_only=True)[:, -1]
    margin = math.inf
    for _ in range(steps):
        top = logits.topk(2).values[0]
        margin = min(margin, float(top[0] - top[1]))
        token = int(logits.argmax())
        if token in stop_ids:
            break
        logits = model(torch.tensor([[token]]), cache)[:, -1]
    return margin


TOPICS = "foxes dogs numbers emoji Paris weather code Python models tokens rivers stars music chess tea rain".split()


def test_16_concurrent_streaming_clients_get_their_solo_text(live, llm):
    """Greedy: each of 16 simultaneous streams equals the same request sent alone, and they share steps."""
    questions = [[{"role": "user", "content": f"Tell me about {TOPICS[i]} ({i})"}] for i in range(16)]
    kw = dict(model=MODEL, temperature=0, max_tokens=24, extra_body={"repetition_penalty": 1.0})
    for q in questions:  # float rounding (~1e-6 here) cannot flip a greedy choice with this margin
        margin = greedy_margin(llm.model, llm.chat_prompt(q, None, None)[0], 24, llm.tokenizer.stop_ids)
        assert margin > 1e-4, f"fixture margin {margin:.1e} too small for an exact comparison"

    def run(q):
        content, _, finish, usage, _ = stream_chat(live.client, messages=q, **kw)
        return content, finish, usage.completion_tokens

    solo = [run(q) for q in questions]
    steps = live.scheduler.steps
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(run, questions))
    shared_steps = live.scheduler.steps - steps
    assert together == solo
    texts = [s[0] for s in solo]
    assert len(set(texts)) >= 12 and len(set("".join(texts))) > 20, f"degenerate fixture outputs: {texts}"
    generated = sum(s[2] for s in solo)
    assert shared_steps < generated / 3, f"{shared_steps} decode steps for {generated} tokens: rows did not share"


def test_cancelled_stream_frees_its_row_and_a_full_queue_gets_429(llm, caplog):
    """One row, no queue: a second client gets 429 until the first one hangs up mid-stream."""
    small = Live(llm, max_batch=1, max_queue=0)
    slow = llm.model.register_forward_hook(lambda *a: time.sleep(0.01))  # 400 tokens would take > 4 s
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True}
    caplog.set_level(logging.INFO, logger="lfm2.server")
    try:
        with httpx.stream("POST", small.url + "/v1/completions", json={**body, "stream": True}, timeout=30) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            data = [line for line in (next(lines) for _ in range(6)) if line.startswith("data:")]
            assert data and small.scheduler.active == 1
            busy = small.post("/v1/completions", json={**body, "max_tokens": 2})
            assert busy.status_code == 429 and busy.headers["Retry-After"] == "1"
            assert busy.json()["error"]["code"] == "server_busy"
            hung_up = time.perf_counter()
        while small.scheduler.active:  # the row is freed at the next step boundary
            assert time.perf_counter() - hung_up < 2.0, "the cancelled request kept its row"
            time.sleep(0.005)
        freed_after = time.perf_counter() - hung_up
        after = small.post("/v1/completions", json={**body, "max_tokens": 3})
        assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 3
        assert freed_after < 1.0
        records = [json.loads(r.getMessage()) for r in caplog.records if r.name == "lfm2.server"]
        assert [r["status"] for r in records if r["event"] == "request"] == ["disconnected", "ok"]
    finally:
        slow.remove()
        small.close()


# -- fuzzing ---------------------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool", "developer"]), "content": st.text(max_size=30)},
    optional={"tool_call_id": st.text(max_size=5), "tool_calls": st.just(TOOL_CALLS)},
)
# Plausible values of every field (some still wrong together, e.g. tool_calls on a user message).
VALID = {
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "max_tokens": st.integers(1, 40),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "top_k": st.integers(-1, 100),
    "min_p": st.floats(0, 1),
    "repetition_penalty": st.floats(0.5, 2),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "seed": st.integers(0, 2**32),
    "n": st.integers(1, 3),
    "stop": st.one_of(st.text(min_size=1, max_size=3), st.lists(st.text(min_size=1, max_size=3), max_size=4)),
    "ignore_eos": st.booleans(),
}
CHAT_VALID = {
    **VALID,
    "max_completion_tokens": st.integers(1, 40),
    "logprobs": st.booleans(),
    "top_logprobs": st.integers(0, 20),
    "tools": st.lists(st.just(get_weather_tool()), max_size=2),
    "tool_choice": st.sampled_from(["auto", "none", "required",
                                    {"type": "function", "function": {"name": "get_weather"}}]),
}
COMPLETION_VALID = {**VALID, "echo": st.booleans(), "logprobs": st.integers(0, 5)}
# Values that stretch or break each field: neighbours of the limits, wrong types, anything.
WILD = st.one_of(JSON_VALUES, st.integers(-(2**65), 2**65), st.floats(-3, 3), st.sampled_from([0, -1, 1e308, ""]))


def bodies(required: dict, valid: dict):
    """A plausible body with zero to two fields replaced by wild values (or deleted)."""
    base = st.fixed_dictionaries(required, optional=valid)
    names = sorted({*required, *valid, "n", "best_of", "response_format", "messages", "prompt", "model"})
    mutations = st.dictionaries(st.sampled_from(names), st.one_of(WILD, st.just(...)), max_size=2)
    return st.builds(lambda b, m: {k: v for k, v in {**b, **m}.items() if v is not ...}, base, mutations)


REQUESTS = st.one_of(
    st.tuples(st.just(CHAT), bodies({"model": st.just(MODEL), "messages": st.lists(MESSAGE, min_size=1, max_size=3)},
                                    CHAT_VALID)),
    st.tuples(st.just("/v1/completions"), bodies(
        {"model": st.just(MODEL), "prompt": st.one_of(st.text(max_size=30), st.lists(st.integers(0, 600), max_size=5),
                                                      st.lists(st.text(max_size=10), max_size=3))},
        COMPLETION_VALID)),
    st.tuples(st.sampled_from([CHAT, "/v1/completions"]), JSON_VALUES),  # not even an object
)


@pytest.fixture(scope="module")
def fuzz_server(llm):
    server = Live(llm, max_batch=4, max_queue=4, max_len=96)  # short contexts keep valid requests quick
    yield server
    server.close()


def check_no_server_error(server: Live, path: str, body) -> None:
    raw = json.dumps(body).encode()  # NaN and Infinity included, as Python clients may send them
    headers = {"Content-Type": "application/json"}
    with httpx.stream("POST", server.url + path, content=raw, headers=headers, timeout=60) as r:
        text = r.read().decode()
    assert r.status_code < 500, f"{r.status_code} for {body!r}: {text}"
    if r.status_code != 200:
        assert set(json.loads(text)["error"]) == {"message", "type", "param", "code"}
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert text.endswith("data: [DONE]\n\n") and '"server_error"' not in text, text


def fuzz(server: Live, examples: int) -> None:
    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(REQUESTS)
    def run(request):
        check_no_server_error(server, *request)

    run()
    assert httpx.get(server.url + "/health").json()["active"] == 0


def test_fuzzed_requests_never_get_a_5xx(fuzz_server):
    fuzz(fuzz_server, 80)


@pytest.mark.slow
def test_fuzzed_requests_never_get_a_5xx_long(fuzz_server):
    fuzz(fuzz_server, 2000)


# -- command line ------------------------------------------------------------------------------------


def test_serve_subcommand_starts_a_server(chat_checkpoint):
    """`add_serve_parser` + its handler, as `lfm2 serve` wires them, in a child process."""
    import argparse
    import subprocess
    import sys

    from lfm2.server import add_serve_parser, cmd_serve

    parser = argparse.ArgumentParser(prog="lfm2")
    add_serve_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--model", "m", "--port", "9", "--max-batch", "2"])
    assert args.handler is cmd_serve and (args.port, args.max_batch, args.host) == (9, 2, "127.0.0.1")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (
        "import argparse, sys; from lfm2.server import add_serve_parser\n"
        "p = argparse.ArgumentParser(); add_serve_parser(p.add_subparsers())\n"
        "a = p.parse_args(sys.argv[1:]); a.handler(a)\n"
    )
    argv = ["serve", "--model", str(chat_checkpoint), "--port", str(port), "--served-model-name", "cli-model",
            "--max-model-len", "128", "--log-level", "warning"]
    proc = subprocess.Popen([sys.executable, "-c", code, *argv])
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None and time.time() < deadline, "lfm2 serve did not start"
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).json()
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert health["model"] == "cli-model" and health["max_len"] == 128
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        reply = client.completions.create(model="cli-model", prompt="Hi", max_tokens=3, extra_body={"ignore_eos": True})
        assert reply.usage.completion_tokens == 3
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("tools, choice", [(None, None), ([get_weather_tool()], "none")], ids=["no-tools", "none"])
def test_a_reply_that_may_not_call_tools_never_shows_call_markers(live, llm, tools, choice):
    """A model that reaches for a tool nobody offered (scripted here to open a call block) must not put
    `<|tool_call_start|>` into the reply's content: the markers are masked (`lfm2.constrain.NoToolCalls`)."""
    extra = {} if tools is None else {"tools": tools, "tool_choice": choice}
    with Script(llm, {"Joke please": "<|tool_call_start|>[get_weather(city='x')]<|tool_call_end|>"}):
        reply = live.client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Joke please"}], max_tokens=12, **extra)
        chunks = list(live.client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Joke please"}], max_tokens=12, stream=True, **extra))
    message = reply.choices[0].message
    assert message.tool_calls is None and "<|tool_call" not in (message.content or "")
    assert reply.choices[0].finish_reason != "tool_calls"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "<|tool_call" not in streamed and not any(c.choices and c.choices[0].delta.tool_calls for c in chunks)


def test_tools_reach_the_template_as_the_client_sent_them(live, llm):
    """Key order and extra keys of a client's tool are kept: the prompt equals the chat template rendered
    on the request's own tools (as transformers renders what it is given), not on a re-serialised copy."""
    tool = {"function": {"parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                         "x-note": "kept", "name": "get_weather", "description": "Weather now."},
            "type": "function"}
    messages = [{"role": "user", "content": "Weather in Oslo?"}]
    with Script(llm, {"Weather in Oslo?": "Sunny."}) as script:
        r = live.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "tools": [tool],
                                                    "max_tokens": 4})
    assert r.status_code == 200, r.text
    expected = llm.tokenizer.apply_chat_template(messages, tools=[tool], add_generation_prompt=True)
    assert script.prompts[0] == expected
    assert '{"function": {"parameters"' in expected and '"x-note": "kept"' in expected


def test_serve_quantize_reaches_the_loader_and_serves(monkeypatch, chat_checkpoint):
    """`lfm2 serve --quantize int8` loads quantized weights (the library's `quantize=`) and serves them."""
    import argparse

    import uvicorn

    from lfm2.quant import QuantLinear
    from lfm2.server import add_serve_parser, cmd_serve

    loaded = []
    real_load = lfm2.load

    def load(*args, **kwargs):
        loaded.append(real_load(*args, **kwargs))
        return loaded[-1]

    apps = []
    monkeypatch.setattr(lfm2, "load", load)
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: apps.append(self.config.app))
    parser = argparse.ArgumentParser(prog="lfm2")
    add_serve_parser(parser.add_subparsers(dest="command"))
    cmd_serve(parser.parse_args(["serve", "--model", str(chat_checkpoint), "--port", "0", "--quantize", "int8"]))
    monkeypatch.undo()  # uvicorn runs for real below
    (llm,) = loaded
    assert len(apps) == 1 and any(isinstance(m, QuantLinear) for m in llm.model.modules())
    server = Live(llm)  # the same quantized model behind the app, answering
    try:
        reply = server.client.completions.create(model=MODEL, prompt="Hi", max_tokens=3,
                                                 extra_body={"ignore_eos": True})
        assert reply.usage.completion_tokens == 3
    finally:
        server.close()


def test_n_choices_are_decoded_together_from_one_prefill(live, llm):
    """n choices: rows of one batch, the prompt prefilled once (the others resume from its state),
    each choice with its own seed; the prompt counts once in the usage."""
    chunks, hits = live.scheduler.prefill_chunks, llm.prefix_cache.hits
    reply = live.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "n choices"}],
                                                n=3, max_tokens=6, temperature=1.0, seed=11)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    # the first choice's prompt: one forward pass (the state where the user turn ends is kept from inside
    # it); the other two resume from its end and prefill nothing
    assert live.scheduler.prefill_chunks == chunks + 1 and llm.prefix_cache.hits >= hits + 2
    assert len({c.message.content for c in reply.choices}) > 1
    again = live.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "n choices"}],
                                                n=3, max_tokens=6, temperature=1.0, seed=11)
    assert [c.message.content for c in again.choices] == [c.message.content for c in reply.choices]
    ids = llm.tokenizer.apply_chat_template([{"role": "user", "content": "n choices"}], add_generation_prompt=True)
    assert reply.usage.prompt_tokens == len(llm.tokenizer.encode(ids))
    assert 3 <= reply.usage.completion_tokens <= 18
    streamed = list(live.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "n choices"}], n=2, max_tokens=5, stream=True,
        temperature=1.0, seed=11))
    texts = ["".join(c.choices[0].delta.content or "" for c in streamed if c.choices and c.choices[0].index == i)
             for i in range(2)]
    finishes = [c.choices[0].finish_reason for c in streamed if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 2 and all(texts)
    completions = live.client.completions.create(model=MODEL, prompt=["a b", "c d"], n=2, max_tokens=3)
    assert [c.index for c in completions.choices] == [0, 1, 2, 3]


@torch.inference_mode()
def next_token_logprobs(llm, ids: list[int]) -> torch.Tensor:
    cache = llm.model.make_cache(1, len(ids))
    return torch.log_softmax(llm.model(torch.tensor([ids]), cache, last_only=True)[0, -1].float(), dim=-1)


def test_chat_logprobs_are_the_models(live, llm):
    """logprobs / top_logprobs, non-streamed and streamed, equal the model's own next-token
    log-probabilities (first token: a full prefill of the prompt here)."""
    messages = [{"role": "user", "content": "logprobs please"}]
    reply = live.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0,
                                                logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert 1 <= len(content) <= 5 and all(len(t.top_logprobs) == 3 for t in content)
    prompt = llm.tokenizer.encode(llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    ref = next_token_logprobs(llm, prompt)
    top = ref.topk(3)
    first = content[0]
    assert [t.logprob for t in first.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
    assert first.logprob == pytest.approx(float(top.values[0]), abs=1e-4)  # greedy: the top token
    assert bytes(first.bytes).decode("utf-8", "replace") == first.token
    streamed = list(live.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0,
                                                        logprobs=True, stream=True))
    lps = [t for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.logprob for t in lps] == pytest.approx([t.logprob for t in content], abs=1e-4)
    plain = live.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_completion_logprobs_with_echo(live, llm):
    r = live.post("/v1/completions", json={"model": MODEL, "prompt": "The cat sat", "max_tokens": 3,
                                           "temperature": 0, "logprobs": 2, "echo": True, "ignore_eos": True})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    prompt = llm.tokenizer.encode("The cat sat", add_special_tokens=True)
    assert prompt[0] == llm.tokenizer.bos_id
    assert len(lp["tokens"]) == len(prompt) - 1 + 3  # the BOS tokenizing added is not part of the echoed text
    assert all(isinstance(x, float) for x in lp["token_logprobs"])  # the first word's: given the BOS
    assert all(len(t) <= 2 for t in lp["top_logprobs"])
    ref = next_token_logprobs(llm, prompt[:1])  # the prompt's first word, given the BOS
    assert lp["token_logprobs"][0] == pytest.approx(float(ref[prompt[1]]), abs=1e-4)
    assert "".join(lp["tokens"]) == choice["text"]  # the echoed prompt's tokens, then the completion's
    assert [choice["text"][o:].startswith(t) for t, o in zip(lp["tokens"], lp["text_offset"], strict=True)] == \
        [True] * len(lp["tokens"])  # each offset is where its token starts in the text


def test_completion_echo_of_token_ids_keeps_every_token(live, llm):
    ids = llm.tokenizer.encode("The cat sat", add_special_tokens=True)
    r = live.post("/v1/completions", json={"model": MODEL, "prompt": ids, "max_tokens": 2, "temperature": 0,
                                           "logprobs": 1, "echo": True, "ignore_eos": True})
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 2 and lp["token_logprobs"][0] is None  # the ids as sent, BOS included
    assert "".join(lp["tokens"]) == r.json()["choices"][0]["text"]


def test_multi_turn_reuses_the_conversation_and_metrics_show_it(live, llm):
    """The follow-up turn of a conversation resumes from the state its first turn left (hits, tokens
    reused, in /health and /metrics), and its reply equals one from a server without reuse."""
    convo = [{"role": "system", "content": "Be brief. " * 30}, {"role": "user", "content": "First turn"}]
    first = live.client.chat.completions.create(model=MODEL, messages=convo, max_tokens=6, temperature=0)
    before = httpx.get(live.url + "/health").json()["prefix_cache"]
    convo += [{"role": "assistant", "content": first.choices[0].message.content},
              {"role": "user", "content": "Second turn"}]
    second = live.client.chat.completions.create(model=MODEL, messages=convo, max_tokens=6, temperature=0)
    after = httpx.get(live.url + "/health").json()["prefix_cache"]
    assert after["hits"] == before["hits"] + 1
    assert after["hit_tokens"] - before["hit_tokens"] >= first.usage.prompt_tokens
    metrics = httpx.get(live.url + "/metrics").text
    assert f"lfm2_prefix_cache_hits_total {after['hits']}" in metrics
    assert "# TYPE lfm2_prefix_cache_bytes gauge" in metrics
    llm.prefix_cache.max_bytes, bound = 0, llm.prefix_cache.max_bytes
    try:
        fresh = live.client.chat.completions.create(model=MODEL, messages=convo, max_tokens=6, temperature=0)
    finally:
        llm.prefix_cache.max_bytes = bound
    assert fresh.choices[0].message.content == second.choices[0].message.content
