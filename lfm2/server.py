"""An OpenAI-compatible HTTP server: `lfm2 serve --model M --host 127.0.0.1 --port 8000`.

Endpoints, in OpenAI's wire format so that the official clients work unchanged:
`GET /v1/models`, `POST /v1/chat/completions` and `POST /v1/completions` (both streamed as
server-sent events or not), OpenAI's Responses API (`POST /v1/responses` and its stored responses:
`lfm2/responses.py`), `GET /health` (load: active and queued requests) and `GET /metrics`.
`/openapi.json` (and `/docs`) describe them as they behave: every status code the server answers, each error in
OpenAI's shape, and the stream's events.

How a request flows: a gate in front of the app checks the API key and the body's size before
the body is read; the handler validates the body (pydantic models, strict types), then renders
the chat template and tokenizes in a worker thread, so that a long prompt never stalls the event
loop, and submits one `engine.Request` per choice to the `Engine`, which decodes every
client's rows together in its own thread. The request's callbacks run in that thread: `on_token`
pushes the token through a `TextStream` (incremental detokenizer + stop strings, which ends the
request when a stop string appears) and hands the text to the event loop with
`loop.call_soon_threadsafe`; the handler turns it into deltas, with a reasoning model's thought
split off and tool calls parsed out as they close (`lfm2.reasoning.ReplyParser`). A client that
goes away is noticed by a watcher on the ASGI `receive` channel, which cancels its requests, so
its row is free at the next decode step.

The engine keeps the state after each chat turn, prompt and reply in `llm.prefix_cache`
(`--prefix-cache-bytes`, least recently used dropped first): a conversation's next turn, or a
request sharing a system prompt, prefills only what is new. `n` choices are rows decoded together
that share the prompt's prefill (each with its own seed); `logprobs` / `top_logprobs` (chat) and
`logprobs` with `echo` (completions) report the model's raw log-probabilities. `GET /metrics`
gives the load, the engine's counters and the prefix cache's hits, misses and bytes (Prometheus).

Every failure a client can cause gets OpenAI's error body, `{"error": {"message", "type",
"param", "code"}}`, with status 400 (bad body or values, prompt longer than the context), 401
(missing or wrong API key, when the server has one), 404 (unknown model or route), 405, 413
(body over `max_body_bytes`) or 429 with `Retry-After` when the wait queue is full; anything
else is a 500 in the same shape, logged with its traceback, and the server keeps serving.
Each request is logged as one JSON line on the `lfm2.server` logger (id, tokens in and out,
time to first token, tokens/s).

With an API key (`--api-key`, else `$LFM2_API_KEY`), every route needs `Authorization: Bearer
KEY` except `/health` (for load balancers), the chat page's files (`/`, `/static/...`; the page
asks its user for the key) and the API's description (`/openapi.json`, `/docs`, `/redoc`), which
hold nothing private. Keys are compared in constant time.

Extensions beyond OpenAI's fields, as vLLM names them: `top_k`, `min_p`, `repetition_penalty`
and `ignore_eos`. Reasoning models (`lfm2.reasoning`): the reply's thinking block comes back in
`message.reasoning_content` and streams as `delta.reasoning_content` (vLLM's and llama.cpp's
field), `max_reasoning_tokens` closes it after that many tokens, `reasoning_format: "none"` (as
llama.cpp names it) leaves it in the content, and an assistant message sent back with
`reasoning_content` (or `reasoning`) reaches the chat template, which decides whether to keep it.
Logprobs cover every generated token, the thought's included, in order; streamed, each rides on
the first delta that shows its text, whether thought or answer. Unset sampling fields take the
checkpoint's defaults (generation_config.json, else the LFM2 model card), not OpenAI's; an unset
`max_tokens` is the rest of the context for chat completions and 16 for completions, as in
OpenAI's API.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at definition
# time, and the handlers live in `create_app`, which imports FastAPI lazily (so that `lfm2
# generate` does not pay for it).
import argparse
import asyncio
import copy
import dataclasses
import errno
import hmac
import ipaddress
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Iterable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, WithJsonSchema, model_validator

from lfm2 import structured
from lfm2.compile import state as compile_state
from lfm2.compile import warm
from lfm2.engine import MAX_LOGPROBS, Engine, Request, Result, TokenLogprob
from lfm2.errors import GenerationError, LFM2Error, SchedulerBusy
from lfm2.generate import TextStream, logprob_entries, token_text
from lfm2.images import MAX_IMAGE_BYTES, fetch_image
from lfm2.llm import ChatPlan
from lfm2.prefix_cache import DEFAULT_PREFIX_CACHE_BYTES
from lfm2.sampling import SamplingParams, choice_params
from lfm2.structured import StructuredOutputError
from lfm2.threads import release_openmp_workers, released

log = logging.getLogger("lfm2.server")

DEFAULT_MAX_LEN = 4096  # slots per row when the model's context is longer: 16 rows of 128k would not fit
MAX_STOP_STRINGS = 16
GREEDY_BELOW = 1e-5  # smaller temperatures overflow the logits to inf: treated as 0 (greedy), as vLLM does
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat completions default to the context
DEFAULT_MAX_BODY_BYTES = 4 * 2**20  # a 128k-token prompt is about 0.5 MiB of text
DEFAULT_RESPONSES_STORE_BYTES = 64 * 2**20  # /v1/responses' stored conversations: a long chat is tens of KiB of text
OPEN_PATHS = frozenset({"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})  # no API key


def _open(path: str) -> bool:
    """Whether `path` is served without the API key: /health, the API's description, and the chat
    page's own files (`/`, `/static/...`), which hold nothing private; the page then asks its user
    for the key and sends it with every API call (`webui/src/api.js`)."""
    return path in OPEN_PATHS or path == "/" or path.startswith("/static/")


# -- request bodies ---------------------------------------------------------------------------
# Strict types: "0.5" is not a number and 1.0 is not an integer, as in OpenAI's API. Unknown
# fields are ignored, so clients that send newer or provider-specific fields still work.


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class FunctionCall(_Body):
    name: str
    arguments: str


class ToolCall(_Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ImageUrl(_Body):
    url: str = Field(description="a data URL (data:image/png;base64,...): the server fetches no remote images")
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Body):
    """An image in a user message (vision models, LFM2-VL)."""

    type: Literal["image_url"]
    image_url: ImageUrl


class _Message(_Body):
    name: str | None = None
    tool_call_id: str | None = None


class _TextMessage(_Message):
    """Every role but the assistant: content required (a tool's result too, as in OpenAI's API)."""

    content: str | list[TextPart]
    tool_calls: None = Field(None, description="only assistant messages carry tool calls")


class SystemMessage(_TextMessage):
    """A system prompt; "developer" is OpenAI's newer name for it and renders the same."""

    role: Literal["system", "developer"]


class UserMessage(_TextMessage):
    role: Literal["user"]
    content: str | list[TextPart | ImagePart]


class ToolMessage(_TextMessage):
    role: Literal["tool"]


class AssistantMessage(_Message):
    """An earlier reply: text, tool calls or both. The schema's `anyOf` says what the server checks
    (`_message_dict`): a null or absent content needs at least one tool call, as in OpenAI's API."""

    model_config = ConfigDict(json_schema_extra={"anyOf": [
        {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}},
        {"required": ["tool_calls"], "properties": {"tool_calls": {"type": "array", "minItems": 1}}},
    ]})

    role: Literal["assistant"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None
    reasoning_content: str | None = Field(None, description="the reply's thought, for the chat template")
    reasoning: str | None = Field(None, description="reasoning_content's other name (vLLM's newer one)")


# One model per role, told apart by `role`, so that the schema states what each role needs.
ChatMessage = Annotated[SystemMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")]
MESSAGE_ROLES = ("system", "developer", "user", "assistant", "tool")


class FunctionDefinition(_Body):
    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.\-]{0,63}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class _KeepsRaw(BaseModel):
    """A mixin for request bodies that keep the JSON they were validated from (`_raw`: key order and
    extra keys kept)."""

    _raw: dict[str, Any] | None = PrivateAttr(default=None)

    @model_validator(mode="wrap")
    @classmethod
    def _keep_raw(cls, data: Any, handler: Any) -> Any:
        body = handler(data)
        if isinstance(data, dict):
            body._raw = copy.deepcopy(data)
        return body


class Tool(_Body, _KeepsRaw):
    """A tool as the client sent it: validated by the fields below, and listed to the model exactly as
    sent (`raw`: key order and extra keys kept), as transformers renders what it is given."""

    type: Literal["function"]
    function: FunctionDefinition

    def raw(self) -> dict[str, Any]:
        return self._raw if self._raw is not None else self.model_dump(exclude_none=True)


class FunctionName(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: FunctionName


class StreamOptions(_Body):
    include_usage: bool = False


# What the server refuses by name (`_unsupported`), the schema says too.
_ONE = {"maximum": 1, "description": "only 1 is supported"}
_NULL = WithJsonSchema({"type": "null", "description": "not supported"})
COMPLETION_MAX_LOGPROBS = 5  # OpenAI's limit for /v1/completions


class _GenerationBody(_Body):
    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    n: int | None = Field(None, ge=1, description="choices, decoded together; at most the server's --max-batch")
    user: str | None = None
    # Extensions (vLLM's names).
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, ge=0.01, le=10)  # tinier ones overflow the logits
    ignore_eos: bool = False
    guided_json: dict[str, Any] | None = Field(None, description="a JSON schema the reply must match (vLLM's name)")
    guided_regex: str | None = Field(None, description="a regular expression the reply must match (vLLM's name)")
    guided_choice: list[str] | None = Field(None, min_length=1,
                                            description="the reply is one of these strings (vLLM's name)")
    response_format: Annotated[dict[str, Any] | None, WithJsonSchema({"anyOf": [
        {"type": "object", "required": ["type"], "properties": {"type": {"enum": ["text", "json_object"]}}},
        {"type": "object", "required": ["type", "json_schema"], "properties": {
            "type": {"const": "json_schema"},
            "json_schema": {"type": "object", "required": ["name"], "properties": {
                "name": {"type": "string"}, "description": {"type": "string"}, "schema": {"type": "object"},
                "strict": {"type": ["boolean", "null"]}}}}},
        {"type": "null"}],
        "description": "structured output: the reply is JSON (valid against the schema), see lfm2.structured"})] = None


class ChatCompletionRequest(_GenerationBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="default: the rest of the context")
    max_completion_tokens: int | None = Field(None, ge=1, description="max_tokens' newer name; wins over it")
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="needs logprobs: true")
    # Reasoning models (lfm2.reasoning).
    max_reasoning_tokens: int | None = Field(None, ge=1, description="the most tokens the thinking block may "
                                             "have; then it is closed and the model answers")
    reasoning_format: Literal["auto", "deepseek", "none"] | None = Field(
        None, description="'none': keep the thinking block in the content (llama.cpp's name); else it is split "
        "off into reasoning_content")


class CompletionRequest(_GenerationBody):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=1, description=f"default: {COMPLETION_MAX_TOKENS}, as in OpenAI's API")
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=COMPLETION_MAX_LOGPROBS)
    best_of: int | None = Field(None, ge=1, json_schema_extra=_ONE)
    suffix: Annotated[str | None, _NULL] = None


# -- response bodies ----------------------------------------------------------------------------
# What the handlers return, for /openapi.json only: the handlers build plain dicts (no response
# validation on the hot path), and the fuzz test (tests/test_server_fuzz.py) holds the two equal.


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, rate_limit_error or server_error")
    param: str | None = Field(description="the request field at fault, as in 'messages[0].content'")
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error body, which comes with every status but 200."""

    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class FunctionCallOut(BaseModel):
    name: str
    arguments: str = Field(description="the arguments as a JSON object, in a string")


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCallOut


class AssistantReply(BaseModel):
    role: Literal["assistant"]
    content: str | None
    reasoning_content: str | None = Field(None, description="a reasoning model's thought; absent when none")
    tool_calls: list[ToolCallOut] | None = None


FinishReason = Literal["stop", "length", "tool_calls"]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobOut] | None
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantReply
    logprobs: ChoiceLogprobs | None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: None
    choices: list[ChatChoice]
    usage: Usage


class ToolCallDelta(BaseModel):
    index: int
    id: str
    type: Literal["function"]
    function: FunctionCallOut


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletionChunk(BaseModel):
    """One event of a streamed chat completion; with `include_usage`, a last one has no choices and the usage."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    system_fingerprint: None
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    """The legacy completions format: per token its text, logprob (null for a prompt's first token),
    the `logprobs` most likely alternatives, and where it starts in the choice's text."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"] | None = Field(description="null in a stream's text events")


class Completion(BaseModel):
    """A completion, and also each event of a streamed one (without usage, or with it last)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: None
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class PrefixCacheStats(BaseModel):
    entries: int
    bytes: int
    max_bytes: int
    hits: int
    misses: int
    hit_tokens: int = Field(description="prompt tokens resumed from the cache instead of prefilled")
    evictions: int


class ImageCacheStats(BaseModel):
    entries: int
    bytes: int
    max_bytes: int
    hits: int = Field(description="images whose features were reused instead of encoded")
    misses: int = Field(description="images encoded")


class Health(BaseModel):
    status: Literal["ok"]
    model: str
    active: int
    queued: int
    max_batch: int
    max_queue: int
    max_len: int
    decode_steps: int
    prefill_chunks: int
    prefix_cache: PrefixCacheStats
    image_cache: ImageCacheStats = Field(description="encoded images kept by content (vision models)")
    compiled_decode: Literal["off", "fused", "pending", "ready", "failed"] = Field(
        description="the decode step: fused (lfm2.step, one C++ call), off (eager), or torch.compile's "
                    "(lfm2.compile): pending, ready, or failed (decoding eagerly)")


# -- errors -------------------------------------------------------------------------------------


class APIError(Exception):
    """A client error with everything OpenAI's error body needs."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _param_path(loc: tuple) -> str:
    """pydantic's ('body', 'messages', 0, 'user', 'content') -> OpenAI's 'messages[0].content'.

    Parts naming which member of a union pydantic tried ('str', 'list[int]', 'NamedToolChoice',
    "literal['none','auto']", a message's role after its index) are left out: they are not fields.
    """
    out, after_index = "", False
    for part in loc[1:] if loc and loc[0] in ("body", "query") else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif (part.isidentifier() and not part[:1].isupper() and part not in _TYPE_TAGS
              and not (after_index and part in MESSAGE_ROLES)):
            out += f".{part}" if out else part
        after_index = isinstance(part, int)
    return out


def _json_kind(value: Any) -> str:
    kinds = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number",
             type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def _validation_error(errors: list[dict], wants: str) -> APIError:
    """The first of pydantic's errors, spelled for a client (malformed JSON has its own message).

    `wants` names the body's required fields ("'model' and 'messages'"), for a body that is
    empty or not a JSON object at all.
    """
    if not errors:
        return APIError(400, "the request body is invalid")
    # Of a union's failed members, the one that got furthest into the value says the most.
    first = max(errors, key=lambda e: len(e.get("loc", ())))
    kind = first.get("type")
    if kind == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return APIError(400, f"the request body is not valid JSON ({detail})", code="invalid_json")
    loc = tuple(first.get("loc", ()))
    param = _param_path(loc)
    if not param and isinstance(first.get("input"), bytes):  # a body sent without a JSON content type
        try:
            json.loads(first["input"])
        except ValueError as exc:
            return APIError(400, f"the request body is not valid JSON ({exc})", code="invalid_json")
        return APIError(400, "send the request body with 'Content-Type: application/json'", code="invalid_json")
    if not param:
        if kind == "missing":
            return APIError(400, f"the request body is empty: send a JSON object with {wants}")
        return APIError(400, f"the request body must be a JSON object with {wants}, got "
                        f"{_json_kind(first.get('input'))}")
    # Inside messages[i], pydantic's location names the message's role after its index.
    role = next((str(b) for a, b in zip(loc[:-1], loc[1:], strict=True) if isinstance(a, int) and b in MESSAGE_ROLES),
                None)
    where = param.split(".")[0]
    if kind in ("union_tag_invalid", "union_tag_not_found"):  # the role that picks a message's model
        param += ".role"
        if kind == "union_tag_not_found":
            kind = "missing"
    if role is not None and param.endswith(".content") and (kind == "missing" or first.get("input") is None):
        return APIError(400, f"{where}: a '{role}' message needs 'content'", param=param, code="invalid_value")
    if kind == "missing":
        return APIError(400, f"missing required parameter '{param}'", param=param, code="missing_required_parameter")
    if kind == "none_required" and role is not None and param.endswith(".tool_calls"):
        return APIError(400, f"{where}: only assistant messages may have tool_calls, found role '{role}'",
                        param=param, code="invalid_value")
    found = json.dumps(first.get("input"), default=str)
    found = found if len(found) <= 80 else found[:77] + "..."
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return APIError(400, f"invalid value for '{param}': {first.get('msg')}; found {found}{more}", param=param,
                    code="invalid_value")


# -- one choice's bridge between the engine thread and the event loop ----------------------------


class _Job:
    """Callbacks for one `engine.Request`, run in the engine thread; events go to an asyncio queue.

    Events are (kind, index, value): ("text", i, (piece, logprobs)), the logprobs being those of
    the tokens since the last piece (empty unless asked for), and, last, ("done", i, Result).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, events: asyncio.Queue, index: int, tokenizer,
                 stop: list[str]) -> None:
        self.loop, self.events, self.index = loop, events, index
        self.text = TextStream(tokenizer, stop)
        self.request: Request | None = None
        self.result: Result | None = None
        self.logprobs: list[TokenLogprob] = []  # not yet sent

    def on_token(self, token: int) -> bool:
        piece = self.text.push(token)
        if self.request is not None and self.request.logprobs is not None:
            self.logprobs.append(self.request.token_logprobs[-1])  # the engine's entry for this token
        if piece:
            self._send("text", (piece, self._take()))
        return self.text.stopped

    def on_finish(self, result: Result) -> None:
        if result.finish_reason in ("stop", "length"):
            tail = self.text.finish()
            if tail or self.logprobs:
                self._send("text", (tail, self._take()))
        self._send("done", result)

    def _take(self) -> list[TokenLogprob]:
        out, self.logprobs = self.logprobs, []
        return out

    def _send(self, kind: str, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, self.index, value))
        except RuntimeError:  # the event loop is closed: the server is shutting down, nobody listens
            pass


# -- the app ------------------------------------------------------------------------------------


class _Server:
    """State shared by the handlers: the model, its engine, defaults."""

    def __init__(self, llm, model_name: str, engine: Engine, remote_images: int = 0) -> None:
        if llm.tokenizer is None:
            raise GenerationError(f"{llm.path}: the checkpoint has no tokenizer.json, so it cannot be served")
        self.llm, self.model_name, self.engine = llm, model_name, engine
        self.remote_images = remote_images  # bytes an http(s) image may have; 0: such URLs are refused
        self.tokenizer = llm.tokenizer
        self.defaults = llm.sampling_params()  # read generation_config.json once
        self.created = int(time.time())
        self.max_token_bytes = _max_token_bytes(self.tokenizer)

    # -- validation shared by both endpoints ------------------------------------------------

    def validate(self, body: _GenerationBody) -> tuple[SamplingParams, list[str]]:
        """What both endpoints check first: the model name, unsupported features, sampling values
        and stop strings. Returns the sampling parameters and the stop strings."""
        self.check_model(body.model)
        _unsupported(body)
        return self.sampling(body), self.stop_strings(body.stop)

    def output_format(self, body: _GenerationBody) -> structured.OutputFormat | None:
        """The request's `response_format` (or vLLM's `guided_json` / `guided_regex` / `guided_choice`),
        checked: a 400 names the field or schema keyword at fault, or two formats asked at once."""
        given = {name: value for name in ("response_format", "guided_json", "guided_regex", "guided_choice")
                 if (value := getattr(body, name)) is not None
                 and not (name == "response_format" and value.get("type") == "text")}
        if len(given) > 1:
            raise APIError(400, f"give one output format, not {' and '.join(given)}", param=list(given)[1],
                           code="invalid_value")
        try:
            if body.guided_json is not None:
                fmt = structured.json_schema(body.guided_json, param="guided_json")
            elif body.guided_regex is not None:
                fmt = structured.regex(body.guided_regex, param="guided_regex")
            elif body.guided_choice is not None:
                fmt = structured.choice(body.guided_choice, param="guided_choice")
            else:
                fmt = structured.response_format(body.response_format)
        except StructuredOutputError as exc:
            raise _format_error(exc) from exc
        if fmt is not None and body.ignore_eos:
            raise APIError(400, "ignore_eos cannot go with an output format: the reply ends where its format does",
                           param="ignore_eos", code="invalid_value")
        return fmt

    def warm_grammars(self) -> None:
        try:
            structured.grammar_tokenizer(self.tokenizer, self.llm.config.vocab_size, sorted(self.tokenizer.stop_ids))
        except Exception:  # structured requests will say what is wrong; serving plain text goes on
            log.exception("could not prepare structured output")

    def grammar(self, fmt: structured.OutputFormat) -> structured.GrammarConstraint:
        """`LLM.grammar`, its errors as 400s (slow the first time: run in a thread)."""
        try:
            return self.llm.grammar(fmt)
        except StructuredOutputError as exc:
            raise _format_error(exc) from exc

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(404, f"The model '{model}' does not exist; this server serves '{self.model_name}'",
                           param="model", code="model_not_found")

    def sampling(self, body: _GenerationBody) -> SamplingParams:
        overrides = {
            name: getattr(body, name)
            for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "top_k", "min_p",
                         "repetition_penalty")
            if getattr(body, name) is not None
        }
        if 0 < overrides.get("temperature", 1.0) < GREEDY_BELOW:
            overrides["temperature"] = 0.0
        if body.seed is not None:
            overrides["seed"] = body.seed % 2**63  # OpenAI takes any 64-bit seed; torch wants >= 0
        for name, value in overrides.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise APIError(400, f"invalid value for '{name}': {value} is not a finite number", param=name,
                               code="invalid_value")
        try:
            return dataclasses.replace(self.defaults, **overrides)
        except GenerationError as exc:
            param = next((name for name in overrides if f"{name}=" in str(exc)), None)
            raise APIError(400, str(exc), param=param, code="invalid_value") from exc

    def stop_strings(self, stop: str | list[str] | None) -> list[str]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise APIError(400, f"'stop' has {len(stops)} strings; at most {MAX_STOP_STRINGS} are allowed",
                           param="stop", code="invalid_value")
        if any(not s for s in stops):
            raise APIError(400, "'stop' strings must not be empty", param="stop", code="invalid_value")
        return stops

    def check_max_tokens(self, max_tokens: int | None, param: str) -> None:
        limit = self.engine.max_len
        if max_tokens is not None and max_tokens >= limit:
            raise APIError(400, f"'{param}' is too large: {max_tokens}. This model's context holds {limit} tokens, "
                           "prompt included", param=param, code="invalid_value")

    def check_fits(self, texts: Iterable[str], max_tokens: int | None, param: str) -> None:
        """400 before tokenizing when `texts` alone cannot fit the context, whatever their tokens.

        A token stands for at most `max_token_bytes` bytes of text, so n bytes make at least
        n / max_token_bytes tokens: a 4 MiB prompt is refused at once, not after seconds of
        tokenizing. Each of `texts` must appear whole in the prompt.
        """
        if self.max_token_bytes is None:
            return
        size = sum(len(text.encode("utf-8", "surrogatepass")) for text in texts)
        least = -(-size // self.max_token_bytes)
        wanted = max_tokens if max_tokens is not None else 1
        limit = self.engine.max_len
        if least + wanted > limit:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you requested at least "
                f"{least + wanted} tokens ({size} bytes of prompt text make at least {least} tokens, {wanted} in "
                "the completion). Please reduce the length of the prompt or the completion.",
                param=param, code="context_length_exceeded",
            )

    def token_budget(self, prompt_len: int, max_tokens: int | None, param: str, prompt_param: str,
                     default: int | None = None) -> int:
        """max_new_tokens for a prompt: the request's, else `default` or the rest of the context,
        whichever is less; 400 if it cannot fit."""
        limit = self.engine.max_len
        self.check_max_tokens(max_tokens, param)
        wanted = max_tokens if max_tokens is not None else 1
        if prompt_len + wanted > limit:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + wanted} tokens ({prompt_len} in the prompt, {wanted} in the completion). "
                "Please reduce the length of the prompt or the completion.",
                param=prompt_param, code="context_length_exceeded",
            )
        if max_tokens is not None:
            return max_tokens
        return limit - prompt_len if default is None else min(default, limit - prompt_len)

    def check_n(self, n: int | None) -> int:
        """The number of choices; they are rows of one batch, so at most `max_batch`."""
        n = 1 if n is None else n
        if n > self.engine.max_batch:
            raise APIError(400, f"n={n}: at most {self.engine.max_batch} choices per request (the server's "
                           "--max-batch)", param="n", code="invalid_value")
        return n

    def submit(self, prompts: list[list[int]], params: SamplingParams, max_tokens: list[int], stop: list[str],
               ignore_eos: bool, constraint: Any = None, logprobs: int | None = None,
               prompt_logprobs: int | None = None, checkpoints: list[int] = (),
               n: int = 1, embed: Any = None) -> tuple[list[_Job], asyncio.Queue]:
        """Queue one request per prompt, all or none; 429 when the queue cannot take them.
        `constraint` (tool calls, see `lfm2.constrain`) is copied fresh for each request;
        `checkpoints`: where the prefix cache keeps states (the ends of chat turns); `embed`: the prompt's
        image embeddings (`lfm2.engine.Request.embed`), for a chat with images. Prompts come in
        groups of `n` choices, each choice with its own seed (`choice_params`). The event loop's
        thread then gives back any OpenMP workers that left it (`lfm2.threads`)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        sched = self.engine
        if sched.active + sched.queued + len(prompts) > sched.max_batch + sched.max_queue:
            raise _busy(sched)
        jobs = []
        try:
            for i, (ids, budget) in enumerate(zip(prompts, max_tokens, strict=True)):
                job = _Job(loop, events, i, self.tokenizer, stop)
                job.request = Request(ids, choice_params(params, i % n), budget, job.on_token, job.on_finish,
                                      self.tokenizer.stop_ids, ignore_eos,
                                      None if constraint is None else constraint.fresh(),
                                      logprobs=logprobs, prompt_logprobs=prompt_logprobs, checkpoints=checkpoints,
                                      embed=embed)
                sched.submit(job.request)
                jobs.append(job)
        except SchedulerBusy as exc:
            self.cancel(jobs)
            raise _busy(sched) from exc
        except GenerationError as exc:
            self.cancel(jobs)
            raise APIError(400, str(exc), code="invalid_value") from exc
        finally:
            release_openmp_workers()  # a fresh constraint's masks may have run in parallel on the loop's thread
        return jobs, events

    def cancel(self, jobs: list[_Job]) -> None:
        for job in jobs:
            if job.request is not None and job.result is None:
                self.engine.cancel(job.request)

    # -- prompts -----------------------------------------------------------------------------

    def chat_plan(self, body: ChatCompletionRequest, max_tokens: int | None,
                  output: structured.OutputFormat | None = None) -> ChatPlan:
        """The request's `lfm2.llm.ChatPlan`: prompt ids, forced reply prefix, the tools the reply is
        parsed against (None: plain text), its logits processor, and how to split its thought off.

        Slow for long prompts (template, tokenizer): the handler runs it in a worker thread.
        """
        _check_unicode(body)
        messages = [_message_dict(m, i, self.remote_images) for i, m in enumerate(body.messages)]
        # Templates may trim a turn, or drop an assistant turn's thinking; the others' text stays whole.
        self.check_fits((_text(m["content"]).strip() for m in messages if m["role"] != "assistant"), max_tokens,
                        "messages")
        tools = [t.raw() for t in body.tools] if body.tools else None
        choice: str | dict | None = body.tool_choice
        if isinstance(choice, NamedToolChoice):
            names = [t["function"]["name"] for t in tools or []]
            if choice.function.name not in names:
                raise APIError(400, f"tool_choice names function '{choice.function.name}', which is not among the "
                               f"tools ({', '.join(names) or 'none given'})", param="tool_choice",
                               code="invalid_value")
            choice = choice.model_dump()
        if choice == "required" and not tools:
            raise APIError(400, "tool_choice 'required' needs tools", param="tool_choice", code="invalid_value")
        reasoning = False if body.reasoning_format == "none" else None
        try:
            return self.llm.chat_plan(messages, tools, choice, reasoning=reasoning,
                                      max_reasoning_tokens=body.max_reasoning_tokens, output=output)
        except StructuredOutputError as exc:
            raise _format_error(exc) from exc
        except LFM2Error as exc:
            if "max_reasoning_tokens" in str(exc):
                raise APIError(400, str(exc), param="max_reasoning_tokens", code="invalid_value") from exc
            raise APIError(400, f"could not build the prompt: {exc}", param="messages", code="invalid_value") from exc

    def completion_prompts(self, body: CompletionRequest) -> tuple[list[list[int]], list[str]]:
        """Token ids and text of each prompt (strings get BOS, as `llm.generate` does).

        Slow for long prompts (tokenizer): the handler runs it in a worker thread.
        """
        _check_unicode(body)
        prompt = body.prompt
        if isinstance(prompt, str):
            prompt = [prompt]
        elif prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "'prompt' must not be empty", param="prompt", code="invalid_value")
        strings = [p for p in prompt if isinstance(p, str)]
        for text in strings:
            self.check_fits([text], body.max_tokens, "prompt")
        # encode_batch lets go of the GIL while it works (encode does not), so the event loop runs on.
        encoded = iter(self.tokenizer.encode_batch(strings, add_special_tokens=True) if strings else [])
        ids, texts = [], []
        vocab = self.llm.config.vocab_size
        for i, p in enumerate(prompt):
            if isinstance(p, str):
                ids.append(next(encoded))
                texts.append(p)
            else:
                bad = [t for t in p if not 0 <= t < vocab]
                if not p or bad:
                    what = "is empty" if not p else f"holds token id {bad[0]}, outside the vocabulary (size {vocab})"
                    raise APIError(400, f"prompt[{i}] {what}", param="prompt", code="invalid_value")
                ids.append(list(p))
                texts.append(self.tokenizer.decode(p))
            if not ids[-1]:
                raise APIError(400, f"prompt[{i}] encodes to no tokens", param="prompt", code="invalid_value")
        return ids, texts


def _max_token_bytes(tokenizer) -> int | None:
    """The most bytes of text one token stands for, or None where no such bound holds.

    None when the tokenizer normalizes text first (NFKC, lowercasing or accent stripping can
    shrink it without limit) or when an added token takes in the whitespace beside it (lstrip,
    rstrip: one token can then cover any length). `_tok` is the `tokenizers` object behind
    `lfm2.tokenizer.Tokenizer`; the bound is only a shortcut, so without it the server
    tokenizes every prompt, as before.
    """
    backend = getattr(tokenizer, "_tok", None)
    if backend is None or backend.normalizer is not None:
        return None
    added = backend.get_added_tokens_decoder().values()
    if any(token.lstrip or token.rstrip for token in added):
        return None
    longest = max((len(piece) for piece in tokenizer.token_bytes() if piece), default=0)
    longest_added = max((len(token.content.encode()) for token in added), default=0)
    return max(longest + 1, longest_added)  # + 1: a decoder may drop a leading space from a lone token


def _check_unicode(body: BaseModel) -> None:
    """400 for text holding a lone UTF-16 surrogate ("\\ud800" is valid JSON but no character):
    the tokenizer and the UTF-8 encoder cannot take it."""
    todo: list[tuple[str, Any]] = [("", body.model_dump(exclude_none=True))]
    while todo:
        param, value = todo.pop()
        if isinstance(value, str):
            try:
                value.encode()
            except UnicodeEncodeError as exc:
                raise APIError(400, f"'{param}' holds a lone UTF-16 surrogate ({value[exc.start]!r}), which is "
                               "not a character: send valid Unicode", param=param, code="invalid_value") from None
        elif isinstance(value, dict):
            for key, item in value.items():
                todo += [(param, key), (f"{param}.{key}" if param else key, item)]
        elif isinstance(value, list):
            todo += [(f"{param}[{i}]", item) for i, item in enumerate(value)]


def _busy(sched: Engine) -> APIError:
    return APIError(
        429,
        f"The server is busy ({sched.active} requests running, {sched.queued} waiting, max_queue={sched.max_queue}); "
        "retry after a moment",
        type="rate_limit_error", code="server_busy", headers={"Retry-After": "1"},
    )


def _text(content: str | list | None) -> str:
    """A message's text: its text parts where it has images too."""
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content)
    return content or ""


def image_part(url: str, remote_images: int, where: str, param: str) -> dict[str, Any]:
    """An image given by URL as a chat content part `LLM.chat_plan` reads: a data URL as it is, an
    http(s) URL fetched (at most `remote_images` bytes; 0 refuses it); never a path on this machine.
    A 400 names `where`."""
    if url.startswith("data:"):
        return {"type": "image_url", "image_url": {"url": url}}
    if remote_images and url.startswith(("http://", "https://")):
        try:
            return {"type": "image", "image": fetch_image(url, remote_images)}
        except GenerationError as exc:
            raise APIError(400, f"{where}: {exc}", param=param, code="invalid_value") from None
    fetched = (f"http(s) URLs of at most {remote_images} bytes" if remote_images else
               "no remote URLs (start it with --allow-remote-images to fetch them)")
    raise APIError(400, f"{where}: images are read from data URLs (data:image/png;base64,...); this server "
                   f"fetches {fetched} and reads no paths", param=param, code="invalid_value")


def _message_dict(message: ChatMessage, i: int, remote_images: int = 0) -> dict[str, Any]:
    """An OpenAI message as the chat template wants it (text parts joined, developer -> system).
    Image parts are data URLs, or http(s) URLs fetched here (at most `remote_images` bytes) where
    the server allows them; it never reads its own files."""
    content = message.content
    if isinstance(content, list) and any(isinstance(part, ImagePart) for part in content):
        content = [image_part(part.image_url.url, remote_images, f"messages[{i}].content[{j}]",
                              f"messages[{i}].content[{j}].image_url.url") if isinstance(part, ImagePart)
                   else part.model_dump(exclude_none=True) for j, part in enumerate(content)]
    elif isinstance(content, list):
        content = "".join(part.text for part in content)
    role = "system" if message.role == "developer" else message.role
    if content is None and not message.tool_calls:  # only an assistant message may lack content (pydantic)
        raise APIError(400, f"messages[{i}]: a '{role}' message needs 'content'", param=f"messages[{i}].content",
                       code="invalid_value")
    out: dict[str, Any] = {"role": role, "content": content}
    if message.tool_calls:
        out["tool_calls"] = [call.model_dump(exclude_none=True) for call in message.tool_calls]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        out["name"] = message.name
    if isinstance(message, AssistantMessage):
        thought = message.reasoning_content if message.reasoning_content is not None else message.reasoning
        if thought is not None:
            out["reasoning_content"] = thought
    return out


def _unsupported(body: _GenerationBody) -> None:
    """Refuse, by name, the OpenAI features this server does not implement (rather than ignore them)."""
    if isinstance(body, ChatCompletionRequest):
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
    else:
        if body.suffix is not None:
            raise APIError(400, "'suffix' is not supported", param="suffix", code="unsupported_value")
        if body.best_of not in (None, 1):
            raise APIError(400, "best_of > 1 is not supported", param="best_of", code="unsupported_value")


def _format_error(exc: StructuredOutputError) -> APIError:
    code = "unsupported_value" if exc.keyword else "invalid_value"
    return APIError(400, str(exc), param=exc.param, code=code)


def _usage(results: list[Result], n: int = 1) -> dict[str, int]:
    """Token counts; a prompt shared by `n` consecutive choices counts once, as in OpenAI's API."""
    prompt = sum(r.prompt_tokens for r in results[::n])
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def _log_request(request_id: str, endpoint: str, stream: bool, results: list[Result | None], start: float) -> None:
    """One JSON line per request; status is ok, error, cancelled, or disconnected (the client left first)."""
    done = [r for r in results if r is not None]
    completion = sum(r.completion_tokens for r in done)
    ttft = min((r.time_to_first_token_s for r in done if r.completion_tokens), default=None)
    total = time.perf_counter() - start
    decode_s = total - ttft if ttft is not None else 0.0
    reasons = {r.finish_reason for r in done}
    status = ("disconnected" if len(done) < len(results) else "error" if "error" in reasons
              else "cancelled" if "cancelled" in reasons else "ok")
    record = {
        "event": "request", "id": request_id, "endpoint": endpoint, "stream": stream, "status": status,
        "finish_reason": [r.finish_reason for r in done],
        "prompt_tokens": sum(r.prompt_tokens for r in done), "completion_tokens": completion,
        "queued_ms": round(max((r.queued_s for r in done), default=0.0) * 1000, 1),
        "ttft_ms": None if ttft is None else round(ttft * 1000, 1),
        "total_ms": round(total * 1000, 1),
        "tokens_per_s": round((completion - len(done)) / decode_s, 2) if decode_s > 0 and completion > len(done)
        else None,
    }
    log.info(json.dumps(record))


async def _watch_disconnect(receive, on_disconnect) -> None:
    """Call `on_disconnect` when the client goes away (the ASGI channel says http.disconnect)."""
    try:
        while (await receive())["type"] != "http.disconnect":
            pass
    except Exception:  # the channel is gone either way
        pass
    on_disconnect()


# -- in front of the app: API key and body size ----------------------------------------------------


class _Gate:
    """ASGI middleware in front of the app: the API key, then the body's size, before any handler
    reads the body.

    A client without the key is refused unread. A body over `max_body_bytes` is refused from its
    Content-Length, or, sent in chunks, as soon as the bytes received pass the limit; a body within
    it is handed to the app whole, after which `receive` passes through (the disconnect watcher).
    """

    def __init__(self, app, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.key = None if api_key is None else api_key.encode()
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if self.key is not None and not _open(scope["path"]) and not self._authorized(headers):
            await _error_response(_unauthorized(headers), scope["path"])(scope, receive, send)
            return
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body_bytes:  # uvicorn refuses malformed lengths
            await _error_response(self._too_large(f"{int(declared)} bytes"), scope["path"])(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before the body was complete
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                await _error_response(self._too_large(f"more than {self.max_body_bytes} bytes"),
                                      scope["path"])(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)

    def _too_large(self, size: str) -> APIError:
        return APIError(413, f"the request body ({size}) is larger than this server's limit of {self.max_body_bytes} "
                        "bytes (lfm2 serve --max-body-bytes)", code="request_too_large")


def _unauthorized(headers: dict[bytes, bytes]) -> APIError:
    if b"authorization" not in headers:
        message = "You didn't provide an API key: send it in an Authorization header, 'Authorization: Bearer KEY'"
    else:
        message = "Incorrect API key provided: send this server's key as 'Authorization: Bearer KEY'"
    return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def _error_response(err: APIError, path: str):
    """`err` as a JSON response, logged. Non-ASCII is escaped, so that text echoed from the request
    (a model name holding a lone surrogate, say) cannot break the encoding."""
    from starlette.responses import Response

    log.info(json.dumps({"event": "request_error", "path": path, "status": err.status, "code": err.code,
                         "message": err.message}))
    return Response(json.dumps(err.body()), status_code=err.status, headers=err.headers,
                    media_type="application/json")


# -- /openapi.json -----------------------------------------------------------------------------------

_ERRORS = {
    400: "A malformed body, a bad value, or a prompt longer than the context.",
    401: "No API key, or a wrong one (only when the server has a key).",
    404: "No such model.",
    413: "A request body over the server's limit (lfm2 serve --max-body-bytes).",
    429: "The wait queue is full: retry after Retry-After seconds.",
    500: "An internal error, logged with its traceback.",
    503: "The request was cancelled: the server is shutting down.",
}
_GENERATION_ERRORS = (400, 404, 429, 503)
_STREAMS = {"/v1/chat/completions": "ChatCompletionChunk", "/v1/completions": "Completion",
            "/v1/responses": "ResponseStreamEvent"}  # what each POST streams


def _describe(app, api_key: bool, max_len: int) -> dict[str, Any]:
    """The API's description as the server behaves: FastAPI's, less the 422 it documents for
    every body (this server answers 400), plus what the gate and the streams do, and the largest
    `max_tokens` this server's context takes."""
    from fastapi.openapi.utils import get_openapi
    from pydantic.json_schema import models_json_schema

    from lfm2.responses import ResponseStreamEvent

    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    _, defs = models_json_schema([(m, "serialization") for m in (ErrorResponse, ChatCompletionChunk, Completion,
                                                                 ResponseStreamEvent)],
                                 ref_template="#/components/schemas/{model}")
    schemas.update(defs["$defs"])
    for body, field in (("ChatCompletionRequest", "max_tokens"), ("ChatCompletionRequest", "max_completion_tokens"),
                        ("CompletionRequest", "max_tokens")):
        schemas[body]["properties"][field]["maximum"] = max_len - 1
    if api_key:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            responses = operation["responses"]
            responses.pop("422", None)
            codes = [413, 500]  # the gate reads every body; any handler may fail
            if method == "post":
                codes += _GENERATION_ERRORS
                responses["200"]["content"]["text/event-stream"] = _event_stream(_STREAMS[path])
                responses["200"]["description"] = "The reply; with `stream: true`, server-sent events."
            elif "{" in path:
                codes.append(404)
            if method != "post" and any(p["in"] == "query" for p in operation.get("parameters", [])):
                codes.append(400)
            if api_key and path not in OPEN_PATHS:
                codes.append(401)
                operation["security"] = [{"bearer": []}]
            for code in sorted(codes):
                responses[str(code)] = {"description": _ERRORS[code], "content": error}
            if "429" in responses:
                responses["429"]["headers"] = {"Retry-After": {"description": "seconds", "schema": {"type": "string"}}}
    return doc


def _event_stream(chunk: str) -> dict[str, Any]:
    """One server-sent event: a JSON `chunk`, an error, or the closing `[DONE]`; the Responses API's
    events are named (`event:`) and have no `[DONE]`, as OpenAI sends them."""
    if chunk == "ResponseStreamEvent":
        payload = {"$ref": f"#/components/schemas/{chunk}"}
        data = {"type": "string", "contentMediaType": "application/json", "contentSchema": payload}
        return {"schema": {"type": "object", "required": ["event", "data"],
                           "properties": {"event": {"type": "string"}, "data": data}}}
    payload = {"anyOf": [{"$ref": f"#/components/schemas/{chunk}"}, {"$ref": "#/components/schemas/ErrorResponse"}]}
    data = {"anyOf": [{"const": "[DONE]"},
                      {"type": "string", "contentMediaType": "application/json", "contentSchema": payload}]}
    return {"schema": {"type": "object", "required": ["data"], "properties": {"data": data}}}


def create_app(llm, model_name: str, max_batch: int = 16, max_queue: int = 64, max_len: int | None = None,
               api_key: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               prefix_cache_bytes: int | None = None, responses_store_bytes: int = DEFAULT_RESPONSES_STORE_BYTES,
               remote_images: int = 0):
    """The FastAPI app serving `llm` as `model_name`; its engine runs while the app does (lifespan).

    `max_len` (slots per request: prompt + completion) defaults to the model's context, capped
    at 4096; the KV cache holds `max_batch * max_len` slots per attention layer. With `api_key`,
    requests need `Authorization: Bearer <api_key>` (but /health and the docs); bodies over
    `max_body_bytes` get 413. The engine reuses prompt prefixes through `llm.prefix_cache`
    (shared with `llm`'s own calls), bounded at `prefix_cache_bytes` when given (0: off). Responses
    of `/v1/responses` are kept for `previous_response_id` within `responses_store_bytes` (0: none).
    Image parts with http(s) URLs are fetched when `remote_images` (their size limit in bytes) is
    not 0, and refused otherwise.
    """
    import contextlib

    from fastapi import FastAPI
    from fastapi import Request as HTTPRequest
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from lfm2 import responses, web

    context = llm.config.max_position_embeddings
    max_len = min(context, DEFAULT_MAX_LEN) if max_len is None else max_len
    pad = llm.tokenizer.pad_id if llm.tokenizer is not None and llm.tokenizer.pad_id is not None else 0
    if prefix_cache_bytes is not None:
        llm.prefix_cache.max_bytes = prefix_cache_bytes
    engine = Engine(llm.model, max_batch=max_batch, max_queue=max_queue, max_len=max_len, pad_id=pad,
                       prefix_cache=llm.prefix_cache)
    server = _Server(llm, model_name, engine, remote_images)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        # The grammar engine's view of the vocabulary takes about a second to build (65,536 tokens):
        # built now, in the background, the first request with a response_format does not wait for it.
        threading.Thread(target=server.warm_grammars, name="lfm2-grammar-warmup", daemon=True).start()
        try:
            yield
        finally:
            engine.close()

    app = FastAPI(title="lfm2", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible server for Liquid AI's LFM2 models")
    app.state.server = server
    app.state.engine = engine
    app.add_middleware(_Gate, api_key=api_key, max_body_bytes=max_body_bytes)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _describe(app, api_key is not None, engine.max_len)
        return app.openapi_schema

    app.openapi = openapi
    web.add_routes(app, model_name, server.defaults, engine.max_len,  # the chat page at /: lfm2/web
                   vision=getattr(llm, "vision", None) is not None)
    app.state.responses = responses.ResponseStore(responses_store_bytes)

    @app.exception_handler(APIError)
    async def _api_error(request: HTTPRequest, exc: APIError):
        return _error_response(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: HTTPRequest, exc: RequestValidationError):
        wants = {"/v1/chat/completions": "'model' and 'messages'",
                 "/v1/responses": "'model' and 'input'"}.get(request.url.path, "'model' and 'prompt'")
        return _error_response(_validation_error(list(exc.errors()), wants), request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: HTTPRequest, exc: StarletteHTTPException):
        if exc.status_code == 404:
            err = APIError(404, f"no route {request.method} {request.url.path}", code="not_found")
        elif exc.status_code == 405:
            err = APIError(405, f"method {request.method} is not allowed on {request.url.path}",
                           code="method_not_allowed")
        elif exc.status_code == 400 and exc.detail == "There was an error parsing the body":  # not UTF-8, say
            err = APIError(400, "the request body could not be read as JSON: send UTF-8 JSON text", code="invalid_json")
        else:
            err = APIError(exc.status_code, str(exc.detail))
        err.headers = dict(exc.headers or {}) or None
        return _error_response(err, request.url.path)

    @app.exception_handler(Exception)
    async def _internal(request: HTTPRequest, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        err = APIError(500, f"internal server error ({type(exc).__name__}); see the server log", type="server_error",
                       code="internal_error")
        return _error_response(err, request.url.path)

    def load() -> dict[str, Any]:
        return {"active": engine.active, "queued": engine.queued, "max_batch": engine.max_batch,
                "max_queue": engine.max_queue, "max_len": engine.max_len, "decode_steps": engine.steps,
                "prefill_chunks": engine.prefill_chunks, "prefix_cache": llm.prefix_cache.stats(),
                "image_cache": llm.image_cache.stats(), "compiled_decode": compile_state(llm.model)}

    @app.get("/health", response_model=Health)
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, **load()}

    @app.get("/metrics", response_class=PlainTextResponse,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def metrics() -> str:
        """Prometheus' text format: load, engine counters and the prefix cache."""
        return _prometheus(load())

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": server.created, "owned_by": "lfm2",
                "max_model_len": engine.max_len}

    @app.get("/v1/models", response_model=ModelList)
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard)
    async def get_model(model_id: str) -> dict[str, Any]:
        server.check_model(model_id)
        return model_card()

    @app.post("/v1/chat/completions", response_model=None, responses={200: {"model": ChatCompletion}})
    async def chat_completions(body: ChatCompletionRequest, http: HTTPRequest):
        start = time.perf_counter()
        params, stop = server.validate(body)
        n = server.check_n(body.n)
        max_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        wanted = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        server.check_max_tokens(wanted, max_param)
        output = server.output_format(body)
        plan = await asyncio.to_thread(released(server.chat_plan), body, wanted, output)
        ids = plan.ids
        budget = server.token_budget(len(ids), wanted, max_param, "messages")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        jobs, events = server.submit([ids] * n, params, [budget] * n, stop, body.ignore_eos, plan.constraint,
                                     logprobs=logprobs, checkpoints=llm.turn_ends(ids), n=n, embed=plan.embed)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        watcher = asyncio.create_task(_watch_disconnect(http.receive, lambda: server.cancel(jobs)))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(i: int, delta: dict, finish: str | None = None, lps: list | None = None) -> dict:
            return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "system_fingerprint": None,
                    "choices": [{"index": i, "delta": delta, "logprobs": choice_logprobs(lps),
                                 "finish_reason": finish}]}

        def choice_logprobs(lps: list[TokenLogprob] | None) -> dict | None:
            if logprobs is None or lps is None:
                return None
            return {"content": logprob_entries(server.tokenizer, lps), "refusal": None}

        def finish_reason(result: Result, calls: bool) -> str:
            return "tool_calls" if calls and result.finish_reason == "stop" else result.finish_reason

        if not body.stream:
            try:
                texts, lps = await _gather(events, jobs, [""] * n)
            finally:
                watcher.cancel()
                server.cancel(jobs)
            results = [job.result for job in jobs]
            _log_request(request_id, "chat", False, results, start)
            for result in results:
                _raise_if_failed(result)
            choices = []
            for i, (text, result) in enumerate(zip(texts, results, strict=True)):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # an unparsable block stays in the content, as documented
                    thought, content, calls = plan.parse(text)
                message: dict[str, Any] = {"role": "assistant", "content": content if content or not calls else None}
                if thought is not None:
                    message["reasoning_content"] = thought
                if calls:
                    message["tool_calls"] = calls
                choices.append({"index": i, "message": message, "logprobs": choice_logprobs(lps[i]),
                                "finish_reason": finish_reason(result, bool(calls))})
            return {"id": request_id, "object": "chat.completion", "created": created, "model": model_name,
                    "system_fingerprint": None, "choices": choices, "usage": _usage(results, n)}

        async def stream() -> AsyncIterator[str]:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                parsers = [plan.parser() for _ in range(n)]
            n_calls = [0] * n
            held: list[list[TokenLogprob]] = [[] for _ in range(n)]  # logprobs of tokens not shown yet

            def deltas(i: int, kind_values) -> list[dict]:
                out = []
                for kind, value in kind_values:
                    if kind == "content":
                        out.append({"content": value})
                    elif kind == "reasoning":
                        out.append({"reasoning_content": value})
                    else:
                        calls = []
                        for call in value:
                            calls.append({"index": n_calls[i], **call})
                            n_calls[i] += 1
                        out.append({"tool_calls": calls})
                return out

            def feed(i: int, piece: str) -> list[dict]:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    return deltas(i, parsers[i].feed(piece))

            def send(i: int, out: list[dict]) -> Iterable[str]:
                for delta in out:  # a piece's logprobs ride on its first delta
                    lps, held[i] = held[i], []
                    yield _sse(chunk(i, delta, lps=lps))

            failed: Result | None = None
            try:
                for i in range(n):
                    yield _sse(chunk(i, {"role": "assistant", "content": ""}, lps=None))
                while any(job.result is None for job in jobs):
                    kind, i, value = await events.get()
                    if kind == "text":
                        held[i] += value[1]
                        for line in send(i, feed(i, value[0])):
                            yield line
                        continue
                    jobs[i].result = value
                    if value.finish_reason in ("error", "cancelled"):
                        failed = value
                        break
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        for line in send(i, deltas(i, parsers[i].finish())):
                            yield line
                    rest, held[i] = held[i], []
                    yield _sse(chunk(i, {}, finish_reason(value, n_calls[i] > 0), lps=rest if rest else None))
                if failed is not None:
                    yield _sse(_failure(failed).body())
                    return
                if include_usage:
                    yield _sse({"id": request_id, "object": "chat.completion.chunk", "created": created,
                                "model": model_name, "system_fingerprint": None, "choices": [],
                                "usage": _usage([job.result for job in jobs], n)})
                yield _sse("[DONE]")
            finally:
                watcher.cancel()
                server.cancel(jobs)
                _log_request(request_id, "chat", True, [job.result for job in jobs], start)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions", response_model=None, responses={200: {"model": Completion}})
    async def completions(body: CompletionRequest, http: HTTPRequest):
        start = time.perf_counter()
        params, stop = server.validate(body)
        n = server.check_n(body.n)
        server.check_max_tokens(body.max_tokens, "max_tokens")
        prompts, texts = await asyncio.to_thread(released(server.completion_prompts), body)
        output = server.output_format(body)
        grammar = None if output is None else await asyncio.to_thread(released(server.grammar), output)
        budgets = [server.token_budget(len(p), body.max_tokens, "max_tokens", "prompt", COMPLETION_MAX_TOKENS)
                   for p in prompts]
        if len(prompts) * n > engine.max_batch + engine.max_queue:
            raise APIError(400, f"{len(prompts)} prompts x n={n} choices exceed what the server holds at once "
                           f"({engine.max_batch + engine.max_queue})", param="n", code="invalid_value")
        # choice k is prompt k // n, as in OpenAI's API
        prompts, texts, budgets = ([x for x in xs for _ in range(n)] for xs in (prompts, texts, budgets))
        echo_logprobs = body.logprobs if body.echo else None
        jobs, events = server.submit(prompts, params, budgets, stop, body.ignore_eos, grammar, logprobs=body.logprobs,
                                     prompt_logprobs=echo_logprobs, n=n)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        watcher = asyncio.create_task(_watch_disconnect(http.receive, lambda: server.cancel(jobs)))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        offsets = [0] * len(jobs)  # where each choice's next token starts in its text

        def chunk(choices: list[dict], usage: dict | None = None) -> dict:
            out = {"id": request_id, "object": "text_completion", "created": created, "model": model_name,
                   "system_fingerprint": None, "choices": choices}
            if usage is not None:
                out["usage"] = usage
            return out

        def choice(i: int, text: str, finish: str | None, lps: dict | None = None) -> dict:
            return {"index": i, "text": text, "logprobs": lps, "finish_reason": finish}

        def legacy(i: int, items: list[TokenLogprob | None], tokens: list[int]) -> dict | None:
            if body.logprobs is None:
                return None
            out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            for token, item in zip(tokens, items, strict=True):
                text = token_text(server.tokenizer, token)
                out["tokens"].append(text)
                out["token_logprobs"].append(None if item is None else item.logprob)
                out["top_logprobs"].append(None if item is None else
                                           {token_text(server.tokenizer, t): lp for t, lp in item.top})
                out["text_offset"].append(offsets[i])
                offsets[i] += len(text)
            return out

        def prompt_part(i: int) -> dict | None:
            """The echoed prompt's logprobs (its first token has none), without the BOS that tokenizing a
            text prompt added: the tokens spell the echoed text, and `text_offset` indexes into it."""
            items, tokens = jobs[i].request.prompt_token_logprobs, list(prompts[i])
            bos, bos_text = server.tokenizer.bos_id, server.tokenizer.bos_token
            if tokens and bos is not None and tokens[0] == bos and not texts[i].startswith(bos_text or "\0"):
                items, tokens = items[1:], tokens[1:]
            return legacy(i, items, tokens)

        def generated(i: int, lps: list[TokenLogprob]) -> dict | None:
            return legacy(i, list(lps), [x.token for x in lps])

        if not body.stream:
            try:
                outs, lps = await _gather(events, jobs, [texts[i] if body.echo else "" for i in range(len(jobs))])
            finally:
                watcher.cancel()
                server.cancel(jobs)
            results = [job.result for job in jobs]
            _log_request(request_id, "completions", False, results, start)
            for result in results:
                _raise_if_failed(result)
            choices = []
            for i, r in enumerate(results):
                part = _join_legacy(prompt_part(i) if body.echo else None, generated(i, lps[i]))
                choices.append(choice(i, outs[i], r.finish_reason, part))
            return chunk(choices, _usage(results, n))

        async def stream() -> AsyncIterator[str]:
            failed: Result | None = None
            echoed = [not body.echo] * len(jobs)
            try:
                if body.echo and echo_logprobs is None:  # the prompts' text is known now
                    for i, text in enumerate(texts):
                        yield _sse(chunk([choice(i, text, None)]))
                    echoed = [True] * len(jobs)
                while any(job.result is None for job in jobs):
                    kind, i, value = await events.get()
                    if not echoed[i]:  # with logprobs, the prompt's are known once it is prefilled
                        echoed[i] = True
                        yield _sse(chunk([choice(i, texts[i], None, prompt_part(i))]))
                    if kind == "text":
                        yield _sse(chunk([choice(i, value[0], None, generated(i, value[1]))]))
                        continue
                    jobs[i].result = value
                    if value.finish_reason in ("error", "cancelled"):
                        failed = value
                        break
                    yield _sse(chunk([choice(i, "", value.finish_reason)]))
                if failed is not None:
                    yield _sse(_failure(failed).body())
                    return
                if include_usage:
                    yield _sse(chunk([], _usage([job.result for job in jobs], n)))
                yield _sse("[DONE]")
            finally:
                watcher.cancel()
                server.cancel(jobs)
                _log_request(request_id, "completions", True, [job.result for job in jobs], start)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    responses.add_routes(app, server, app.state.responses)  # /v1/responses: lfm2/responses.py
    return app


async def _gather(events: asyncio.Queue, jobs: list[_Job],
                  texts: list[str]) -> tuple[list[str], list[list[TokenLogprob]]]:
    """A non-streamed reply: every job's text (appended to `texts`, its start) and logprobs, until
    all have finished (each job's `result` set)."""
    lps: list[list[TokenLogprob]] = [[] for _ in jobs]
    while any(job.result is None for job in jobs):
        kind, i, value = await events.get()
        if kind == "done":
            jobs[i].result = value
        else:
            texts[i] += value[0]
            lps[i] += value[1]
    return texts, lps


def _join_legacy(a: dict | None, b: dict | None) -> dict | None:
    """Two parts of a choice's legacy logprobs (echoed prompt, then completion) as one."""
    if a is None or b is None:
        return a if b is None else b
    return {k: a[k] + b[k] for k in a}


def _prometheus(load: dict[str, Any]) -> str:
    """`/metrics`: the engine's load and counters and the prefix cache's, in Prometheus' text format."""
    gauges = {"active": "requests holding a row", "queued": "requests waiting for a row",
              "max_batch": "rows decoded together", "max_len": "slots per row"}
    counters = {"decode_steps": "decode steps run", "prefill_chunks": "prefill forward passes run"}
    cache = load["prefix_cache"]
    cache_gauges = {"entries": "states stored", "bytes": "bytes stored", "max_bytes": "bound on bytes stored"}
    cache_counters = {"hits": "requests resumed from a stored prefix", "misses": "requests with no stored prefix",
                      "hit_tokens": "prompt tokens resumed instead of prefilled", "evictions": "states evicted"}
    images = load["image_cache"]
    image_gauges = {"entries": "encoded images kept", "bytes": "bytes of encoded images kept",
                    "max_bytes": "bound on bytes of encoded images"}
    image_counters = {"hits": "images reused instead of encoded", "misses": "images encoded"}
    lines = []
    for group, kind, values, prefix in ((gauges, "gauge", load, "lfm2_"), (counters, "counter", load, "lfm2_"),
                                        (cache_gauges, "gauge", cache, "lfm2_prefix_cache_"),
                                        (cache_counters, "counter", cache, "lfm2_prefix_cache_"),
                                        (image_gauges, "gauge", images, "lfm2_image_cache_"),
                                        (image_counters, "counter", images, "lfm2_image_cache_")):
        for key, text in group.items():
            name = prefix + key + ("_total" if kind == "counter" else "")
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {values[key]}"]
    return "\n".join(lines) + "\n"


def _failure(result: Result) -> APIError:
    if result.finish_reason == "cancelled":
        return APIError(503, "the request was cancelled (the server is shutting down)", type="server_error",
                        code="cancelled")
    return APIError(500, f"generation failed: {result.error}", type="server_error", code="internal_error")


def _raise_if_failed(result: Result) -> None:
    if result.finish_reason in ("error", "cancelled"):
        raise _failure(result)


# -- command line -------------------------------------------------------------------------------


def serve(
    model: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 16,
    max_queue: int = 64,
    max_len: int | None = None,
    dtype: str | None = None,
    device: str = "cpu",
    model_name: str | None = None,
    log_level: str = "info",
    adapter: str | None = None,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    quantize: str | None = None,
    prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES,
    compile: bool | None = None,
    responses_store_bytes: int = DEFAULT_RESPONSES_STORE_BYTES,
    remote_images: int = 0,
    image_options: argparse.Namespace | None = None,
    mmproj: str | None = None,
) -> None:
    """Load `model` (default: the bundled one), with a LoRA `adapter` if given, quantized if asked
    (`quantize` "int8" / "int4", as `lfm2.load`), with the vision part in `mmproj` beside a .gguf
    LFM2-VL text model, and serve it until interrupted.

    Clients name it `model_name` (default: `model` as given, or the bundled model's name). The
    address is taken first, so that a port in use fails at once, before the model loads.
    """
    import uvicorn

    import lfm2

    sock = _bind(host, port)
    try:
        logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO), format="%(message)s")
        warning = _exposed(host, api_key)
        if warning:
            log.warning(warning)
        llm = lfm2.load(model, dtype=dtype, device=device, adapter=adapter, quantize=quantize, compile=compile,
                        mmproj=mmproj)
        warm(llm.model, 1, min(max_batch, 2))  # the one-row and batched steps, before the first request
        if image_options is not None:
            from lfm2.cli import apply_image_args

            apply_image_args(llm, image_options)
        from lfm2.bundled import NAME

        name = model_name or (str(model) if model else NAME)
        app = create_app(llm, name, max_batch=max_batch, max_queue=max_queue, max_len=max_len, api_key=api_key,
                         max_body_bytes=max_body_bytes, prefix_cache_bytes=prefix_cache_bytes,
                         responses_store_bytes=responses_store_bytes, remote_images=remote_images)
        uvicorn.Server(uvicorn.Config(app, log_level=log_level)).run(sockets=[sock])
    finally:
        sock.close()


def _bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (uvicorn listens on it), or one LFM2Error saying why not."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise LFM2Error(f"--host {host}: not an address this machine can listen on ({exc})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restarts need not wait
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        why = ("the address is in use (is another server running there?)" if exc.errno == errno.EADDRINUSE
               else exc.strerror)
        raise LFM2Error(f"cannot listen on {host}:{port}: {why}; choose another --port or --host") from None
    sock.set_inheritable(True)
    return sock


def _exposed(host: str, api_key: str | None) -> str | None:
    """The warning to give when `host` lets other machines in and no API key keeps them out."""
    if api_key is not None or host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:  # a host name: it may resolve to anything
        pass
    return (f"lfm2 serve: listening on {host} without an API key: anyone who can reach it can use the model. "
            "Pass --api-key KEY (or set LFM2_API_KEY), or listen on 127.0.0.1.")


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port: expected 0-65535 (0: any free port)")
    return int(text)


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def _bytes(text: str) -> int:
    """A byte count: digits with an optional K, M or G (binary units)."""
    digits, unit = (text[:-1], text[-1].lower()) if text[-1:].isalpha() else (text, "")
    if not digits.isdigit() or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: expected bytes, optionally with K, M or G (512M)")
    return int(digits) * _UNITS[unit]


def _size(text: str) -> int:
    size = _bytes(text)
    if size < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: expected a positive number of bytes")
    return size


def add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """`lfm2 serve`: the arguments of `serve`, for the CLI's subcommand table. Every help line says
    the option's default."""
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    from lfm2.cli import add_image_args, add_model_args

    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; any other than loopback wants --api-key (default: %(default)s)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port, 0 for any free one (default: %(default)s)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every route but /health and the docs "
                        "(default: $LFM2_API_KEY, else none)")
    p.add_argument("--max-body-bytes", type=_size, default=DEFAULT_MAX_BODY_BYTES, metavar="N",
                   help="larger request bodies get HTTP 413, unread (default: %(default)s, 4 MiB)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: --model)")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together (default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait; beyond, HTTP 429 (default: %(default)s)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help=f"prompt + completion tokens per request (default: the context, at most {DEFAULT_MAX_LEN})")
    p.add_argument("--prefix-cache-bytes", type=_bytes, default=DEFAULT_PREFIX_CACHE_BYTES, metavar="N",
                   help="memory for reusing prompt prefixes (multi-turn chats, shared system prompts): states are "
                        "kept at the ends of turns and prompts, the least recently used dropped; 0 turns reuse "
                        "off; K, M, G suffixes (default: %(default)s, 1 GiB)")
    p.add_argument("--responses-store-bytes", type=_bytes, default=DEFAULT_RESPONSES_STORE_BYTES, metavar="N",
                   help="memory for /v1/responses' stored responses (previous_response_id, GET /v1/responses/ID): "
                        "each keeps its whole conversation, the least recently used dropped first; 0 stores none; "
                        "K, M, G suffixes (default: %(default)s, 64 MiB)")
    add_image_args(p)
    p.add_argument("--allow-remote-images", action="store_true",
                   help="fetch image parts given as http(s) URLs (vision models); without it only data URLs are "
                        "read (default: off)")
    p.add_argument("--max-image-bytes", type=_size, default=MAX_IMAGE_BYTES, metavar="N",
                   help="largest remote image fetched, K, M, G suffixes (default: %(default)s, 32 MiB)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the decode steps at start-up (about a minute the first time, seconds once "
                        "cached on disk). Default: the fused decode step (lfm2.step, nothing to compile) where it fits "
                        "the model, else compiled on the CPU for models of 50M+ weights; --compile: for any model; "
                        "--no-compile: never, and no fused step (eager Python)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="how much the server logs (default: %(default)s)")
    p.set_defaults(handler=cmd_serve)
    return p


def cmd_serve(args: argparse.Namespace) -> None:
    """`lfm2 serve`; the API key is --api-key, else $LFM2_API_KEY (an empty one means none)."""
    api_key = args.api_key if args.api_key is not None else os.environ.get("LFM2_API_KEY") or None
    if api_key is not None and not api_key.strip():
        raise LFM2Error("--api-key is empty: give the key clients must send, or leave the option out")
    serve(args.model, host=args.host, port=args.port, max_batch=args.max_batch, max_queue=args.max_queue,
          max_len=args.max_model_len, dtype=args.dtype, device=args.device, model_name=args.served_model_name,
          log_level=args.log_level, adapter=args.adapter, api_key=api_key, max_body_bytes=args.max_body_bytes,
          quantize=args.quantize, prefix_cache_bytes=args.prefix_cache_bytes, compile=args.compile,
          responses_store_bytes=args.responses_store_bytes, mmproj=args.mmproj,
          remote_images=args.max_image_bytes if args.allow_remote_images else 0, image_options=args)
