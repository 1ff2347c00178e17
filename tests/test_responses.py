"""OpenAI's Responses API (`lfm2/responses.py`), driven live with the official `openai` client:
`client.responses.create` (whole and streamed), its streaming helper, tools and their outputs,
`previous_response_id` over the server-side store, retrieve / delete / input_items, and errors.

Replies are scripted where the test needs exact text (`Script` from test_server.py: a forward hook
recognises the prompt and forces the model's tokens); the prompts it records show what the model read.
Every answer is also held to the `openai` package's own types, strictly, and to the server's schema.
"""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from openai.types.responses import Response as SDKResponse
from openai.types.responses import ResponseStreamEvent as SDKStreamEvent
from pydantic import TypeAdapter

import lfm2
from lfm2.responses import (
    ITEMS,
    OutputBuilder,
    ResponseObject,
    ResponseStore,
    ResponseStreamEvent,
    Stored,
    to_messages,
)
from tests.test_server import MODEL, Live, Script

WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
SDK_EVENT = TypeAdapter(SDKStreamEvent)


@pytest.fixture(scope="module")
def llm(chat_checkpoint):
    return lfm2.load(chat_checkpoint)


@pytest.fixture(scope="module")
def live(llm):
    server = Live(llm, max_batch=4, max_queue=4)
    yield server
    server.close()


def raw_response(live: Live, **body) -> dict:
    """A whole response as JSON, held to the SDK's type and the server's schema."""
    r = live.post("/v1/responses", json={"model": MODEL, **body})
    assert r.status_code == 200, r.text
    SDKResponse.model_validate(r.json(), strict=True)
    ResponseObject.model_validate(r.json())
    return r.json()


def raw_events(live: Live, **body) -> list[dict]:
    """A streamed response's events, each named by its type and held to the SDK's types."""
    with httpx.stream("POST", live.url + "/v1/responses", json={"model": MODEL, "stream": True, **body},
                      timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        text = r.read().decode()
    events = []
    for block in text.strip().split("\n\n"):
        name, data = block.split("\n")
        assert name.startswith("event: ") and data.startswith("data: "), block
        event = json.loads(data.removeprefix("data: "))
        assert event["type"] == name.removeprefix("event: ")
        SDK_EVENT.validate_python(event, strict=True)
        ResponseStreamEvent.model_validate(event)
        events.append(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def text_events(n_deltas: int) -> list[str]:
    return ["response.output_item.added", "response.content_part.added", *["response.output_text.delta"] * n_deltas,
            "response.output_text.done", "response.content_part.done", "response.output_item.done"]


# -- generation ------------------------------------------------------------------------------------


def test_string_input_gives_a_message_and_usage(live, llm):
    reply = "Hello! How can I help?"
    with Script(llm, {"Hi there": reply}):
        r = live.client.responses.create(model=MODEL, input="Hi there")
        raw = raw_response(live, input="Hi there")
    assert r.id.startswith("resp_") and r.object == "response" and r.model == MODEL and r.status == "completed"
    assert r.output_text == reply and r.error is None and r.incomplete_details is None
    (message,) = r.output
    assert message.type == "message" and message.role == "assistant" and message.status == "completed"
    assert message.id.startswith("msg_") and message.content[0].type == "output_text"
    assert message.content[0].annotations == []
    prompt = llm.chat_prompt([{"role": "user", "content": "Hi there"}], None, None)[0]
    generated = len(llm.tokenizer.encode(reply)) + 1  # + the <|im_end|> it sampled
    usage = (r.usage.input_tokens, r.usage.output_tokens, r.usage.total_tokens)
    assert usage == (len(prompt), generated, len(prompt) + generated)
    assert r.usage.output_tokens_details.reasoning_tokens == 0
    assert raw["output"][0]["content"][0]["text"] == reply and raw["store"] is True and raw["tools"] == []
    assert (raw["tool_choice"], raw["parallel_tool_calls"], raw["text"]) == ("auto", True, {"format": {"type": "text"}})


def test_instructions_and_items_reach_the_prompt_in_order(live, llm):
    items = [
        {"role": "developer", "content": "Answer in French."},
        {"role": "user", "content": [{"type": "input_text", "text": "Weather in "},
                                     {"type": "input_text", "text": "Oslo?"}]},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "Il pleut.", "annotations": []}]},
        {"type": "message", "role": "user", "content": "And tomorrow?"},
    ]
    with Script(llm, {"And tomorrow?": "Soleil."}) as script:
        r = live.client.responses.create(model=MODEL, input=items, instructions="Be brief.")
    assert r.output_text == "Soleil." and r.instructions == "Be brief."
    expected = [{"role": "system", "content": "Be brief."}, {"role": "system", "content": "Answer in French."},
                {"role": "user", "content": "Weather in Oslo?"}, {"role": "assistant", "content": "Il pleut."},
                {"role": "user", "content": "And tomorrow?"}]
    assert script.prompts[0] == llm.tokenizer.apply_chat_template(expected, add_generation_prompt=True)


def test_a_forced_function_call_then_its_output_via_previous_response_id(live, llm):
    replies = {"sunny, 25 C": "It is sunny in Rome.", "Weather in Rome?": "city='Rome')]<|tool_call_end|>"}
    with Script(llm, replies) as script:
        first = live.client.responses.create(model=MODEL, input="Weather in Rome?", tools=[WEATHER],
                                             tool_choice={"type": "function", "name": "get_weather"})
        (call,) = first.output
        result = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 25 C"}
        second = live.client.responses.create(model=MODEL, previous_response_id=first.id, input=[result],
                                              tools=[WEATHER])
        # The same turn without the store: the client sends the whole conversation, output items as they came.
        stateless = live.client.responses.create(
            model=MODEL, store=False, tools=[WEATHER],
            input=[{"role": "user", "content": "Weather in Rome?"}, call.model_dump(exclude_none=True), result])
    assert script.prompts[0].endswith("<|im_start|>assistant\n<|tool_call_start|>[get_weather(")
    assert call.type == "function_call" and call.name == "get_weather" and call.status == "completed"
    assert call.call_id.startswith("call_") and call.id.startswith("fc_")
    assert json.loads(call.arguments) == {"city": "Rome"}
    assert first.tool_choice.name == "get_weather" and first.tools[0].name == "get_weather"
    assert first.tools[0].strict is True  # the Responses API's default
    assert second.output_text == stateless.output_text == "It is sunny in Rome."
    assert second.previous_response_id == first.id
    prompt = script.prompts[1]
    assert "Weather in Rome?" in prompt and "[get_weather(city='Rome')]" in prompt
    assert "<|tool_response_start|>sunny, 25 C" in prompt and '"name": "get_weather"' in prompt
    assert script.prompts[2] == prompt


def test_previous_response_id_continues_the_conversation_without_its_instructions(live, llm):
    kw = dict(model=MODEL, max_output_tokens=6, temperature=0)
    first = live.client.responses.create(input="First turn", instructions="Be brief.", **kw)
    second = live.client.responses.create(input="Second turn", previous_response_id=first.id, **kw)
    third = live.client.responses.create(input="Third turn", previous_response_id=second.id, **kw)
    assert second.instructions is None  # not carried over, as OpenAI documents
    convo = [{"role": "user", "content": "First turn"}, {"role": "assistant", "content": first.output_text},
             {"role": "user", "content": "Second turn"}]
    ids = llm.chat_prompt(convo, None, None)[0]
    assert second.usage.input_tokens == len(ids)
    convo += [{"role": "assistant", "content": second.output_text}, {"role": "user", "content": "Third turn"}]
    assert third.usage.input_tokens == len(llm.chat_prompt(convo, None, None)[0])
    # the third prompt repeats the second's turns: the prefix cache resumes from where they end
    assert third.usage.input_tokens_details.cached_tokens >= llm.turn_ends(ids)[-1] > 0
    assert [i.content[0].text for i in live.client.responses.input_items.list(third.id).data] == ["Third turn"]


def test_stored_responses_are_retrieved_listed_and_deleted(live):
    kw = dict(model=MODEL, max_output_tokens=3, temperature=0)
    kept = live.client.responses.create(input=[{"role": "user", "content": "Keep me"}], metadata={"k": "v"}, **kw)
    got = live.client.responses.retrieve(kept.id)
    assert got.model_dump() == kept.model_dump() and got.metadata == {"k": "v"}
    (item,) = live.client.responses.input_items.list(kept.id).data
    assert item.type == "message" and item.role == "user" and item.content[0].text == "Keep me"
    assert live.client.responses.delete(kept.id) is None
    for call in (live.client.responses.retrieve, live.client.responses.delete):
        with pytest.raises(openai.NotFoundError) as e:
            call(kept.id)
        assert e.value.code == "response_not_found"
    unstored = live.client.responses.create(input="Forget me", store=False, **kw)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        live.client.responses.retrieve(unstored.id)
    with pytest.raises(openai.NotFoundError) as e:
        live.client.responses.create(input="next", previous_response_id=unstored.id, **kw)
    assert e.value.param == "previous_response_id" and e.value.code == "previous_response_not_found"


def test_input_items_pages_in_both_orders(live):
    items = [{"role": "user", "content": f"turn {i}"} for i in range(5)]
    r = live.client.responses.create(model=MODEL, input=items, max_output_tokens=2)
    newest = live.client.responses.input_items.list(r.id, limit=2)
    assert [i.content[0].text for i in newest.data] == ["turn 4", "turn 3"] and newest.has_more
    rest = live.client.responses.input_items.list(r.id, after=newest.last_id, order="desc")
    assert [i.content[0].text for i in rest.data] == ["turn 2", "turn 1", "turn 0"] and not rest.has_more
    oldest = live.client.responses.input_items.list(r.id, order="asc", limit=100)
    assert [i.content[0].text for i in oldest.data] == [f"turn {i}" for i in range(5)]


def test_the_store_is_bounded_in_bytes_least_recently_used_first():
    store = ResponseStore(max_bytes=100)
    entry = Stored(b"x" * 20, b"y" * 10, b"z" * 10)  # 40 bytes
    assert store.put("a", entry) and store.put("b", entry)
    assert store.get("a") is entry  # now the most recently used
    assert store.put("c", entry)  # 120 bytes: b goes
    assert store.get("b") is None and store.get("a") is entry and store.bytes == 80 and len(store) == 2
    assert not store.put("huge", Stored(b"x" * 101, b"", b"")) and store.get("huge") is None
    assert store.delete("a") and not store.delete("a") and store.bytes == 40


def test_a_server_that_stores_nothing_says_so(live):
    store = live.app.state.responses
    store.max_bytes, bound = 0, store.max_bytes
    try:
        r = live.client.responses.create(model=MODEL, input="Hi", max_output_tokens=2)
    finally:
        store.max_bytes = bound
    assert r.store is False
    with pytest.raises(openai.NotFoundError):
        live.client.responses.retrieve(r.id)


def test_streaming_helper_and_raw_events_match_the_whole_response(live, llm):
    reply = "Streams are fun to read."
    with Script(llm, {"Stream please": reply}):
        whole = live.client.responses.create(model=MODEL, input="Stream please")
        with live.client.responses.stream(model=MODEL, input="Stream please") as stream:
            events = list(stream)
            final = stream.get_final_response()
        raw = raw_events(live, input="Stream please")
    types = [e.type for e in events]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert types == ["response.created", "response.in_progress", *text_events(len(deltas)), "response.completed"]
    assert [e["type"] for e in raw] == types[:2] + text_events(len(raw) - 8) + ["response.completed"]
    assert "".join(deltas) == final.output_text == whole.output_text == reply
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    assert final.status == "completed" and final.usage.output_tokens == whole.usage.output_tokens
    assert final.output[0].id == events[2].item.id == events[-2].item.id
    assert final.id == events[0].response.id and live.client.responses.retrieve(final.id).output_text == reply


def test_a_streamed_tool_call_comes_as_items_and_argument_events(live, llm):
    call = "Let me check.<|tool_call_start|>[get_weather(city='Paris, France')]<|tool_call_end|>"
    with Script(llm, {"Weather in Paris?": call}):
        whole = live.client.responses.create(model=MODEL, input="Weather in Paris?", tools=[WEATHER])
        events = list(live.client.responses.create(model=MODEL, input="Weather in Paris?", tools=[WEATHER],
                                                   stream=True))
    types = [e.type for e in events]
    n = types.count("response.output_text.delta")
    assert types == ["response.created", "response.in_progress", *text_events(n), "response.output_item.added",
                     "response.function_call_arguments.delta", "response.function_call_arguments.done",
                     "response.output_item.done", "response.completed"]
    final = events[-1].response
    for r in (whole, final):
        message, fc = r.output
        assert message.content[0].text == "Let me check." and fc.type == "function_call"
        assert fc.name == "get_weather" and json.loads(fc.arguments) == {"city": "Paris, France"}
    assert events[-3].arguments == final.output[1].arguments and events[-3].item_id == final.output[1].id
    stored = httpx.get(f"{live.url}/v1/responses/{whole.id}").json()
    assert SDKResponse.model_validate(stored, strict=True).output[1].call_id == whole.output[1].call_id


def test_max_output_tokens_make_an_incomplete_response(live, llm):
    text = "one two three four five"
    with Script(llm, {"count": text}):
        r = live.client.responses.create(model=MODEL, input="count", max_output_tokens=2)
        events = raw_events(live, input="count", max_output_tokens=2)
    ids = llm.tokenizer.encode(text)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 2 and r.output[0].status == "incomplete"
    assert r.output_text == llm.tokenizer.decode(ids[:2])
    assert events[-1]["type"] == "response.incomplete" and events[-1]["response"]["status"] == "incomplete"
    assert events[-2]["item"]["status"] == "incomplete"


def test_truncation_auto_drops_the_oldest_turns_to_fit(live, llm):
    long = " ".join(["word"] * 120)
    items = []
    for i in range(4):
        items += [{"role": "user", "content": f"Turn {i}: {long}"}, {"role": "assistant", "content": long}]
    items.append({"role": "user", "content": "Last question?"})
    with pytest.raises(openai.BadRequestError) as e:
        live.client.responses.create(model=MODEL, input=items, instructions="Be brief.", max_output_tokens=8)
    assert e.value.code == "context_length_exceeded" and e.value.param == "input"
    with Script(llm, {"Last question?": "Fine."}) as script:
        r = live.client.responses.create(model=MODEL, input=items, instructions="Be brief.", max_output_tokens=8,
                                         truncation="auto")
    prompt = script.prompts[0]
    assert r.output_text == "Fine." and r.truncation == "auto"
    assert "Be brief." in prompt and "Last question?" in prompt and "Turn 0" not in prompt
    assert r.usage.input_tokens + 8 <= live.scheduler.max_len


def test_a_client_that_hangs_up_frees_its_row(live, llm):
    slow = llm.model.register_forward_hook(lambda *a: time.sleep(0.01))  # 400 tokens would take > 4 s
    body = {"model": MODEL, "input": "Once upon a time", "max_output_tokens": 400, "ignore_eos": True,
            "stream": True}
    try:
        with httpx.stream("POST", live.url + "/v1/responses", json=body, timeout=30) as r:
            lines = r.iter_lines()
            while "response.output_text.delta" not in next(lines):
                pass
            assert live.scheduler.active == 1
            hung_up = time.perf_counter()
        while live.scheduler.active:
            assert time.perf_counter() - hung_up < 2.0, "the cancelled request kept its row"
            time.sleep(0.005)
    finally:
        slow.remove()


def test_a_failed_generation_ends_the_stream_with_response_failed(live, llm):
    def fail_on_decode(module, args):
        if args[0].shape[1] == 1:
            raise RuntimeError("injected failure")

    hook = llm.model.register_forward_pre_hook(fail_on_decode)
    try:
        events = raw_events(live, input="Fail please", max_output_tokens=8, ignore_eos=True)
        with pytest.raises(openai.InternalServerError) as e:
            live.client.responses.create(model=MODEL, input="Fail please", max_output_tokens=8)
    finally:
        hook.remove()
    assert [e["type"] for e in events[:2]] == ["response.created", "response.in_progress"]
    failed = events[-1]["response"]
    assert events[-1]["type"] == "response.failed" and failed["status"] == "failed"
    assert failed["error"]["code"] == "server_error" and "injected failure" in failed["error"]["message"]
    assert "injected failure" in e.value.message
    assert live.client.responses.create(model=MODEL, input="Hi", max_output_tokens=2).error is None  # serving on


# -- reasoning ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def thinking(tmp_path_factory):
    """A live server on a random reasoning checkpoint (`<think>`/`</think>` tokens, tests/test_reasoning.py)."""
    from tests.test_reasoning import make_checkpoint

    thinker = lfm2.load(make_checkpoint(tmp_path_factory.mktemp("thinking")))
    server = Live(thinker, max_batch=2, max_queue=2)
    yield thinker, server
    server.close()


def test_reasoning_becomes_a_reasoning_item_with_its_events(thinking, monkeypatch):
    llm, live = thinking
    with Script(llm, {"Think first": "<think>Hmm, easy.</think>The answer is 4."}):
        whole = live.client.responses.create(model=MODEL, input="Think first")
        events = raw_events(live, input="Think first")
        rendered, chat_plan = [], llm.chat_plan

        def spy(messages, *args, **kwargs):
            rendered.append(messages)
            return chat_plan(messages, *args, **kwargs)

        monkeypatch.setattr(llm, "chat_plan", spy)
        live.client.responses.create(model=MODEL, input="Think again", previous_response_id=whole.id)
    thought, message = whole.output
    assert thought.type == "reasoning" and thought.id.startswith("rs_") and thought.summary == []
    assert thought.content[0].type == "reasoning_text" and thought.content[0].text == "Hmm, easy."
    assert message.content[0].text == whole.output_text == "The answer is 4."
    assert whole.usage.output_tokens_details.reasoning_tokens == len(llm.tokenizer.encode("Hmm, easy."))
    types = [e["type"] for e in events]
    deltas = [e["delta"] for e in events if e["type"] == "response.reasoning_text.delta"]
    collapsed = [t for i, t in enumerate(types) if i == 0 or t != types[i - 1]]  # one thought token a delta
    assert collapsed[:8] == ["response.created", "response.in_progress", "response.output_item.added",
                             "response.content_part.added", "response.reasoning_text.delta",
                             "response.reasoning_text.done", "response.content_part.done",
                             "response.output_item.done"]
    done = next(e for e in events if e["type"] == "response.reasoning_text.done")
    assert events[3]["part"] == {"type": "reasoning_text", "text": ""} and done["text"] == "Hmm, easy."
    assert "".join(deltas) == "Hmm, easy." and len(deltas) > 1
    assert [o["type"] for o in events[-1]["response"]["output"]] == ["reasoning", "message"]
    # the follow-up's earlier turn carries its reasoning; the template decides whether the model sees it
    (messages,) = rendered
    assert messages[1] == {"role": "assistant", "content": "The answer is 4.", "reasoning_content": "Hmm, easy."}


def test_reasoning_and_calls_of_one_reply_make_one_assistant_message():
    items = ITEMS.validate_python([
        {"role": "user", "content": "Weather in Oslo and Rome?"},
        {"type": "reasoning", "id": "rs_1", "summary": [],
         "content": [{"type": "reasoning_text", "text": "Two calls."}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
        {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": '{"city": "Rome"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "rainy"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "sunny"}]},
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "Summed up."}]},
        {"role": "assistant", "content": "Rainy and sunny."},
    ])
    user, turn, tool1, tool2, answer = to_messages(items)
    assert user == {"role": "user", "content": "Weather in Oslo and Rome?"}
    assert turn["reasoning_content"] == "Two calls." and turn["content"] == "Checking."
    assert [c["function"]["arguments"] for c in turn["tool_calls"]] == ['{"city": "Oslo"}', '{"city": "Rome"}']
    assert (tool1["tool_call_id"], tool1["content"], tool2["content"]) == ("c1", "rainy", "sunny")
    assert answer == {"role": "assistant", "content": "Rainy and sunny.", "reasoning_content": "Summed up."}
    # a reply's text after its calls stays in its turn; a second text is the next turn
    call = {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}
    text = {"role": "assistant", "content": "Done."}
    one, two = to_messages(ITEMS.validate_python([call, text, text]))
    assert one["tool_calls"][0]["id"] == "c" and one["content"] == two["content"] == "Done." and "tool_calls" not in two


def test_the_output_builder_streams_every_kind_of_item_in_openais_order():
    out = OutputBuilder()
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    for piece in [("reasoning", "Think"), ("reasoning", "ing."), ("content", "Hi"), ("tool_calls", [call]),
                  ("content", "Done.")]:
        out.add(*piece)
    out.finish("completed")
    events = out.take()
    for event in events:
        SDK_EVENT.validate_python(event, strict=True)
    assert [i["type"] for i in out.items] == ["reasoning", "message", "function_call", "message"]
    assert [e["output_index"] for e in events if e["type"] == "response.output_item.done"] == [0, 1, 2, 3]
    assert out.items[0]["content"] == [{"type": "reasoning_text", "text": "Thinking."}]
    assert events[0]["item"]["status"] == "in_progress" and all(i["status"] == "completed" for i in out.items)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    empty = OutputBuilder()
    empty.finish("incomplete")
    (message,) = empty.items
    assert message["content"][0]["text"] == "" and message["status"] == "incomplete"


# -- errors ------------------------------------------------------------------------------------------------

LONG = " ".join(["word"] * 2000)
RESPONSES = "/v1/responses"


def body(**overrides) -> dict:
    return {"model": MODEL, "input": "Hi", "max_output_tokens": 4, **overrides}


ERRORS = [
    # (body or raw bytes, status, param, words the message must contain)
    (b"", 400, None, "the request body is empty: send a JSON object with 'model' and 'input'"),
    ({"model": MODEL}, 400, "input", "missing"),
    (body(input=""), 400, "input", "at least 1"),
    (body(input=[]), 400, "input", "at least 1"),
    (body(model="gpt-4"), 404, "model", "does not exist"),
    (body(max_tokens=5), 400, "max_tokens", "'max_output_tokens'"),
    (body(messages=[]), 400, "messages", "'input'"),
    (body(stop=["x"]), 400, "stop", "Unknown parameter: 'stop'"),
    (body(moderation={"model": "m"}), 400, "moderation", "not supported"),
    (body(background=True), 400, "background", "not supported"),
    (body(conversation="conv_1"), 400, "conversation", "previous_response_id"),
    (body(top_logprobs=3), 400, "top_logprobs", "not supported"),
    (body(include=["message.output_text.logprobs"]), 400, "include", "not supported"),
    (body(text={"format": {"type": "json_schema", "name": "x", "schema": {"type": "array", "uniqueItems": True}}}),
     400, "text.format.schema", "'uniqueItems'"),
    (body(text={"format": {"type": "json_schema", "name": "x"}}), 400, "text.format.schema", "required"),
    (body(text={"format": {"type": "yaml"}}), 400, "text.format.type", "'yaml' is not supported"),
    (body(max_output_tokens=0), 400, "max_output_tokens", "greater than or equal to 1"),
    (body(max_output_tokens=10**9), 400, "max_output_tokens", "too large"),
    (body(temperature="hot"), 400, "temperature", "number"),
    (body(metadata={f"k{i}": "v" for i in range(17)}), 400, "metadata", "at most 16"),
    (body(input=LONG), 400, "input", "maximum context length"),
    (body(previous_response_id="resp_nope"), 404, "previous_response_id", "resp_nope"),
    (body(tools=[WEATHER], tool_choice={"type": "function", "name": "nope"}), 400, "tool_choice",
     "not among the tools"),
    (body(tool_choice="required"), 400, "tool_choice", "needs tools"),
    (body(tool_choice="sometimes"), 400, "tool_choice", "'none'"),
    (body(tools=[{"type": "web_search"}]), 400, "tools[0].type", "'function'"),
    (body(tools=[{"type": "function", "name": "bad name!"}]), 400, "tools[0].name", "pattern"),
    (body(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools[0].name", "missing"),
    (body(input=[{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]), 400,
     "input[0].content[0].image_url", "data URLs"),
    (body(input=[{"role": "user", "content": [{"type": "input_image", "file_id": "file_1"}]}]), 400,
     "input[0].content[0].image_url", "Files API"),
    (body(input=[{"role": "user", "content": [{"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]}]),
     400, "input", "reads text only"),
    (body(input=[{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]), 400,
     "input[0].content[0]", "no input_file"),
    (body(input=[{"type": "item_reference", "id": "msg_1"}]), 400, "input[0]", "function_call_output"),
    (body(input=[{"role": "wizard", "content": "hi"}]), 400, "input[0].role", "'user'"),
    (body(input=[{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{not json"}]), 400,
     "input[0].arguments", "JSON object"),
    (body(input=[{"type": "function_call_output", "output": "x"}]), 400, "input[0].call_id", "missing"),
    (b'{"model": "lfm2-tiny", "input": "a\\ud800"}', 400, "input", "lone UTF-16 surrogate"),
]


@pytest.mark.parametrize("payload,status,param,words", ERRORS, ids=[f"{e[2]}-{e[3]}" for e in ERRORS])
def test_bad_requests_get_openai_errors(live, payload, status, param, words):
    if isinstance(payload, bytes):
        r = live.post(RESPONSES, content=payload, headers={"Content-Type": "application/json"})
    else:
        r = live.post(RESPONSES, json=payload)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and words in error["message"], error
    assert "Field required" not in error["message"]


def test_errors_through_the_openai_client(live):
    with pytest.raises(openai.BadRequestError) as e:
        live.client.responses.create(model=MODEL, input="Hi", extra_body={"max_tokens": 5})
    assert e.value.param == "max_tokens" and e.value.code == "unknown_parameter"
    with pytest.raises(openai.BadRequestError) as e:  # streamed requests are checked before the stream starts
        live.client.responses.create(model=MODEL, input="Hi", stream=True, tools=[WEATHER],
                                     tool_choice={"type": "function", "name": "nope"})
    assert e.value.param == "tool_choice"
    with pytest.raises(openai.NotFoundError):
        live.client.responses.create(model=MODEL, input="Hi", previous_response_id="resp_gone")
    for method, path in (("GET", "/v1/responses/resp_nope"), ("DELETE", "/v1/responses/resp_nope"),
                         ("GET", "/v1/responses/resp_nope/input_items")):
        r = httpx.request(method, live.url + path)
        assert r.status_code == 404 and r.json()["error"]["code"] == "response_not_found"
    kept = live.client.responses.create(model=MODEL, input="Hi", max_output_tokens=2)
    r = httpx.get(f"{live.url}/v1/responses/{kept.id}/input_items", params={"limit": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "limit"
    r = httpx.get(f"{live.url}/v1/responses/{kept.id}/input_items", params={"after": "msg_nope"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "after"


def test_openapi_documents_the_responses_routes(live):
    doc = httpx.get(live.url + "/openapi.json").json()
    post = doc["paths"]["/v1/responses"]["post"]["responses"]
    assert {"400", "404", "413", "429", "500", "503"} < set(post)
    stream = post["200"]["content"]["text/event-stream"]["schema"]
    assert stream["required"] == ["event", "data"]
    assert stream["properties"]["data"]["contentSchema"] == {"$ref": "#/components/schemas/ResponseStreamEvent"}
    assert "ResponseStreamEvent" in doc["components"]["schemas"]
    assert "additionalProperties" in doc["components"]["schemas"]["ResponsesRequest"]
    items = doc["paths"]["/v1/responses/{response_id}/input_items"]["get"]["responses"]
    assert {"400", "404"} < set(items)
    assert "404" in doc["paths"]["/v1/responses/{response_id}"]["delete"]["responses"]


def test_serve_takes_the_store_bound():
    import argparse

    from lfm2.server import DEFAULT_RESPONSES_STORE_BYTES, add_serve_parser

    parser = argparse.ArgumentParser(prog="lfm2")
    add_serve_parser(parser.add_subparsers(dest="command"))
    assert parser.parse_args(["serve"]).responses_store_bytes == DEFAULT_RESPONSES_STORE_BYTES == 64 * 2**20
    assert parser.parse_args(["serve", "--responses-store-bytes", "1M"]).responses_store_bytes == 2**20
    assert parser.parse_args(["serve", "--responses-store-bytes", "0"]).responses_store_bytes == 0


def test_text_format_holds_the_answer_to_a_json_schema(live):
    import jsonschema

    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                               "days": {"type": "integer", "minimum": 1, "maximum": 7}},
              "required": ["city", "days"], "additionalProperties": False}
    fmt = {"format": {"type": "json_schema", "name": "trip", "schema": schema, "strict": True}}
    for seed in range(3):  # the schema bounds every string and number: a reply always completes
        r = live.client.responses.create(model=MODEL, input="Plan a trip", text=fmt, temperature=1.0,
                                         max_output_tokens=200, extra_body={"seed": seed})
        assert r.text.format.type == "json_schema" and r.status == "completed"
        jsonschema.validate(json.loads(r.output_text), schema)
    with live.client.responses.stream(model=MODEL, input="Plan a trip", text=fmt, temperature=1.0,
                                      max_output_tokens=200) as stream:
        final = stream.get_final_response()
    jsonschema.validate(json.loads(final.output_text), schema)
