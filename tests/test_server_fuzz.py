"""Schemathesis against the live server: requests generated from its own `/openapi.json`; every
answer must be one the schema documents (status code, content type, headers, body, each event
of a stream), and none may be a 5xx.

Bounded to run in well under a minute on two cores: 25 examples per operation and kind of data
(200 in the slow variant), a 256-token context (room for a tool list; no request generates more
than 255 tokens, and Schemathesis reads only a stream's first 20 events), and most valid bodies
name the served model, so that generation runs and is checked, not only the 404 of an unknown
model. Random data reaches some replies only now and then (a streamed tool call, an echo), so
`test_typical_replies_match_the_schema` checks each kind of 200 every run.
"""

from __future__ import annotations

import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.generation import GenerationMode

import lfm2
from tests.test_server import MODEL, Live

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]


@pytest.fixture(scope="module")
def live(chat_checkpoint):
    server = Live(lfm2.load(chat_checkpoint), max_batch=4, max_queue=4, max_len=256)
    yield server
    server.close()


@pytest.fixture(scope="module")
def api(live):
    return schemathesis.openapi.from_url(live.url + "/openapi.json")


def served(strategy):
    """`strategy`'s cases, two in three of them naming the served model (random names get 404),
    half of those streamed. For valid bodies only: it would mend a negative case whose fault is
    the model's name."""

    def steer(case_and_how):
        case, how = case_and_how
        if how and isinstance(case.body, dict):
            case.body["model"] = MODEL
            if how == "stream":
                case.body["stream"] = True
        return case

    return st.tuples(strategy, st.sampled_from([None, "model", "stream"])).map(steer)


# Schemathesis's own pytest runner (`schemathesis.pytest.from_fixture`) needs a pytest older than
# ours (it reads `Function._nodeid`), so each operation is driven through its Hypothesis strategy.
OPERATIONS = [("GET", "/health", False), ("GET", "/metrics", False), ("GET", "/v1/models", False),
              ("GET", "/v1/models/{model_id}", False),
              ("POST", "/v1/chat/completions", True), ("POST", "/v1/completions", True),
              ("POST", "/v1/responses", True), ("GET", "/v1/responses/{response_id}", False),
              ("DELETE", "/v1/responses/{response_id}", False),
              ("GET", "/v1/responses/{response_id}/input_items", True)]


def test_every_operation_is_fuzzed(api):
    documented = {(op.ok().method.upper(), op.ok().path) for op in api.get_all_operations()}
    assert documented == {(method, path) for method, path, _ in OPERATIONS}


# Every operation with the data its schema allows (positive) and, where the schema can be broken,
# data it forbids (negative: the server must answer 4xx, never 5xx); a path parameter alone (the
# ids of /v1/models/{model_id} and /v1/responses/{response_id}) takes any string: no negative data.
RUNS = [(method, path, mode) for method, path, breakable in OPERATIONS
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if breakable or mode == GenerationMode.POSITIVE]


def fuzz(api, live, method: str, path: str, mode: GenerationMode, examples: int) -> None:
    cases = api[path][method].as_strategy(mode)

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(case=served(cases) if mode == GenerationMode.POSITIVE else cases)
    def check(case):
        case.call_and_validate(checks=CHECKS, timeout=60)

    check()
    # Schemathesis reads 20 events of a stream and hangs up; the server frees the row at its next step.
    deadline = time.monotonic() + 10
    while httpx.get(live.url + "/health").json()["active"]:
        assert time.monotonic() < deadline, "a request kept its row after its client had gone"
        time.sleep(0.05)


@pytest.mark.parametrize("method,path,mode", RUNS, ids=[f"{m} {p} {mode}" for m, p, mode in RUNS])
def test_the_server_answers_as_its_schema_says(api, live, method, path, mode):
    fuzz(api, live, method, path, mode, 25)


@pytest.mark.slow
@pytest.mark.parametrize("method,path,mode", RUNS, ids=[f"{m} {p} {mode}" for m, p, mode in RUNS])
def test_the_server_answers_as_its_schema_says_long(api, live, method, path, mode):
    fuzz(api, live, method, path, mode, 200)

TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
RESPONSE_TOOL = {"type": "function", "name": "get_weather", "parameters": TOOL["function"]["parameters"]}
TYPICAL = [  # replies random data reaches only now and then: each shape of 200, streamed and not
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "Weather?"}], "tools": [TOOL]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Weather?"}], "tools": [TOOL],
                              "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
    ("/v1/completions", {"prompt": ["Once upon", "a time"], "echo": True}),
    ("/v1/completions", {"prompt": [1, 2, 3], "stop": ["e"]}),
    ("/v1/responses", {"input": "Hi", "instructions": "Be brief."}),
    ("/v1/responses", {"input": [{"role": "user", "content": "Weather?"}], "tools": [RESPONSE_TOOL],
                       "tool_choice": {"type": "function", "name": "get_weather"}}),
]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("path,body", TYPICAL, ids=[f"{p} {i}" for i, (p, _) in enumerate(TYPICAL)])
def test_typical_replies_match_the_schema(api, path, body, stream):
    responses = path == "/v1/responses"
    extra = {"stream": True} if stream else {}
    if stream and not responses:
        extra["stream_options"] = {"include_usage": True}
    limit = {"max_output_tokens" if responses else "max_tokens": 12}
    case = api[path]["POST"].Case(body={"model": MODEL, "temperature": 0, **limit, **body, **extra})
    response = case.call(timeout=60)
    assert response.status_code == 200, response.text
    case.validate_response(response, checks=CHECKS)
