"""An OpenAI-compatible HTTP server: `lfm2 serve --model M --host 127.0.0.1 --port 8000`.

Endpoints, in OpenAI's wire format so that the official clients work unchanged:
`GET /v1/models`, `POST /v1/chat/completions` and `POST /v1/completions` (both streamed as
server-sent events or not), and `GET /health` (load: active and queued requests).

How a request flows: the handler validates the body (pydantic models, strict types), renders
the chat template and tokenizes in the event loop, then submits one `scheduler.Request` per
choice to the `Scheduler`, which decodes every client's rows together in its own thread. The
request's callbacks run in that thread: `on_token` pushes the token through a `TextStream`
(incremental detokenizer + stop strings, which ends the request when a stop string appears) and
hands the text to the event loop with `loop.call_soon_threadsafe`; the handler turns it into
deltas, with tool calls parsed out by `ToolCallStreamParser` as they close. A client that goes
away is noticed by a watcher on the ASGI `receive` channel, which cancels its requests, so its
row is free at the next decode step.

Every failure a client can cause gets OpenAI's error body, `{"error": {"message", "type",
"param", "code"}}`, with status 400 (bad body or values, prompt longer than the context), 404
(unknown model or route), 405, or 429 with `Retry-After` when the wait queue is full; anything
else is a 500 in the same shape, logged with its traceback, and the server keeps serving.
Each request is logged as one JSON line on the `lfm2.server` logger (id, tokens in and out,
time to first token, tokens/s).

Extensions beyond OpenAI's fields, as vLLM names them: `top_k`, `min_p`, `repetition_penalty`
and `ignore_eos`. Unset sampling fields take the checkpoint's defaults (generation_config.json,
else the LFM2 model card), not OpenAI's.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at definition
# time, and the handlers live in `create_app`, which imports FastAPI lazily (so that `lfm2
# generate` does not pay for it).
import argparse
import asyncio
import dataclasses
import json
import logging
import math
import time
import uuid
import warnings
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lfm2.errors import GenerationError, LFM2Error, SchedulerBusy
from lfm2.generate import TextStream
from lfm2.sampling import SamplingParams
from lfm2.scheduler import Request, Result, Scheduler
from lfm2.tools import ToolCallStreamParser, parse_tool_calls

log = logging.getLogger("lfm2.server")

DEFAULT_MAX_LEN = 4096  # slots per row when the model's context is longer: 16 rows of 128k would not fit
MAX_STOP_STRINGS = 16
GREEDY_BELOW = 1e-5  # smaller temperatures overflow the logits to inf: treated as 0 (greedy), as vLLM does


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


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDefinition(_Body):
    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.\-]{0,63}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: FunctionName


class StreamOptions(_Body):
    include_usage: bool = False


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
    n: int | None = Field(None, ge=1)
    user: str | None = None
    # Extensions (vLLM's names).
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, ge=0.01, le=10)  # tinier ones overflow the logits
    ignore_eos: bool = False


class ChatCompletionRequest(_GenerationBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_GenerationBody):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


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
    """pydantic's ('body', 'messages', 0, 'content') -> OpenAI's 'messages[0].content'.

    Parts naming which member of a union pydantic tried ('str', 'list[int]', 'NamedToolChoice',
    "literal['none','auto']") are left out: they are not fields.
    """
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not part.isidentifier() or part[:1].isupper() or part in _TYPE_TAGS:
            continue
        else:
            out += f".{part}" if out else part
    return out


def _validation_error(errors: list[dict]) -> APIError:
    """The first of pydantic's errors, spelled for a client (malformed JSON has its own message)."""
    if not errors:
        return APIError(400, "the request body is invalid")
    # Of a union's failed members, the one that got furthest into the value says the most.
    first = max(errors, key=lambda e: len(e.get("loc", ())))
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return APIError(400, f"the request body is not valid JSON ({detail})", code="invalid_json")
    param = _param_path(tuple(first.get("loc", ())))
    if not param and isinstance(first.get("input"), bytes):  # a body sent without a JSON content type
        try:
            json.loads(first["input"])
        except ValueError as exc:
            return APIError(400, f"the request body is not valid JSON ({exc})", code="invalid_json")
        return APIError(400, "send the request body with 'Content-Type: application/json'", code="invalid_json")
    if not param:
        kind = type(first.get("input")).__name__
        return APIError(400, f"the request body must be a JSON object, got {kind}: {first.get('msg')}")
    if first.get("type") == "missing":
        return APIError(400, f"missing required parameter '{param}'", param=param, code="missing_required_parameter")
    found = json.dumps(first.get("input"), default=str)
    found = found if len(found) <= 80 else found[:77] + "..."
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return APIError(400, f"invalid value for '{param}': {first.get('msg')}; found {found}{more}", param=param,
                    code="invalid_value")


# -- one choice's bridge between the engine thread and the event loop ----------------------------


class _Job:
    """Callbacks for one `scheduler.Request`, run in the engine thread; events go to an asyncio queue.

    Events are (kind, index, value): ("text", i, piece) and, last, ("done", i, Result).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, events: asyncio.Queue, index: int, tokenizer,
                 stop: list[str]) -> None:
        self.loop, self.events, self.index = loop, events, index
        self.text = TextStream(tokenizer, stop)
        self.request: Request | None = None
        self.result: Result | None = None

    def on_token(self, token: int) -> bool:
        piece = self.text.push(token)
        if piece:
            self._send("text", piece)
        return self.text.stopped

    def on_finish(self, result: Result) -> None:
        if result.finish_reason in ("stop", "length"):
            tail = self.text.finish()
            if tail:
                self._send("text", tail)
        self._send("done", result)

    def _send(self, kind: str, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, self.index, value))
        except RuntimeError:  # the event loop is closed: the server is shutting down, nobody listens
            pass


# -- the app ------------------------------------------------------------------------------------


class _Server:
    """State shared by the handlers: the model, its scheduler, defaults."""

    def __init__(self, llm, model_name: str, scheduler: Scheduler) -> None:
        if llm.tokenizer is None:
            raise GenerationError(f"{llm.path}: the checkpoint has no tokenizer.json, so it cannot be served")
        self.llm, self.model_name, self.scheduler = llm, model_name, scheduler
        self.tokenizer = llm.tokenizer
        self.defaults = llm.sampling_params()  # read generation_config.json once
        self.created = int(time.time())

    # -- validation shared by both endpoints ------------------------------------------------

    def validate(self, body: _GenerationBody) -> tuple[SamplingParams, list[str]]:
        """What both endpoints check first: the model name, unsupported features, sampling values
        and stop strings. Returns the sampling parameters and the stop strings."""
        self.check_model(body.model)
        _unsupported(body)
        return self.sampling(body), self.stop_strings(body.stop)

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

    def token_budget(self, prompt_len: int, max_tokens: int | None, param: str, prompt_param: str) -> int:
        """max_new_tokens for a prompt: the request's, or the rest of the context; 400 if it cannot fit."""
        limit = self.scheduler.max_len
        if max_tokens is not None and max_tokens >= limit:
            raise APIError(400, f"'{param}' is too large: {max_tokens}. This model's context holds {limit} tokens, "
                           "prompt included", param=param, code="invalid_value")
        wanted = max_tokens if max_tokens is not None else 1
        if prompt_len + wanted > limit:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + wanted} tokens ({prompt_len} in the prompt, {wanted} in the completion). "
                "Please reduce the length of the prompt or the completion.",
                param=prompt_param, code="context_length_exceeded",
            )
        return max_tokens if max_tokens is not None else limit - prompt_len

    def submit(self, prompts: list[list[int]], params: SamplingParams, max_tokens: list[int], stop: list[str],
               ignore_eos: bool, constraint: Any = None) -> tuple[list[_Job], asyncio.Queue]:
        """Queue one request per prompt, all or none; 429 when the queue cannot take them.
        `constraint` (tool calls, see `lfm2.constrain`) is copied fresh for each request."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        sched = self.scheduler
        if sched.active + sched.queued + len(prompts) > sched.max_batch + sched.max_queue:
            raise _busy(sched)
        jobs = []
        try:
            for i, (ids, budget) in enumerate(zip(prompts, max_tokens, strict=True)):
                job = _Job(loop, events, i, self.tokenizer, stop)
                job.request = Request(ids, params, budget, job.on_token, job.on_finish, self.tokenizer.stop_ids,
                                      ignore_eos, None if constraint is None else constraint.fresh())
                sched.submit(job.request)
                jobs.append(job)
        except SchedulerBusy as exc:
            self.cancel(jobs)
            raise _busy(sched) from exc
        except GenerationError as exc:
            self.cancel(jobs)
            raise APIError(400, str(exc), code="invalid_value") from exc
        return jobs, events

    def cancel(self, jobs: list[_Job]) -> None:
        for job in jobs:
            if job.request is not None and job.result is None:
                self.scheduler.cancel(job.request)

    # -- prompts -----------------------------------------------------------------------------

    def chat_prompt(self, body: ChatCompletionRequest) -> tuple[list[int], str, list[dict] | None, Any]:
        """Prompt ids, forced reply prefix, the tools the reply is parsed against (None: plain text),
        and the constraint on its tool calls (None: unconstrained; see `LLM.chat`'s `strict_tools`)."""
        messages = [_message_dict(m, i) for i, m in enumerate(body.messages)]
        tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
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
        try:
            return self.llm._chat_prompt(messages, tools, choice)
        except LFM2Error as exc:
            raise APIError(400, f"could not build the prompt: {exc}", param="messages", code="invalid_value") from exc

    def completion_prompts(self, body: CompletionRequest) -> tuple[list[list[int]], list[str]]:
        """Token ids and text of each prompt (strings get BOS, as `llm.generate` does)."""
        prompt = body.prompt
        if isinstance(prompt, str):
            prompt = [prompt]
        elif prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "'prompt' must not be empty", param="prompt", code="invalid_value")
        ids, texts = [], []
        vocab = self.llm.config.vocab_size
        for i, p in enumerate(prompt):
            if isinstance(p, str):
                ids.append(self.tokenizer.encode(p, add_special_tokens=True))
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


def _busy(sched: Scheduler) -> APIError:
    return APIError(
        429,
        f"The server is busy ({sched.active} requests running, {sched.queued} waiting, max_queue={sched.max_queue}); "
        "retry after a moment",
        type="rate_limit_error", code="server_busy", headers={"Retry-After": "1"},
    )


def _message_dict(message: ChatMessage, i: int) -> dict[str, Any]:
    """An OpenAI message as the chat template wants it (text parts joined, developer -> system)."""
    content = message.content
    if isinstance(content, list):
        content = "".join(part.text for part in content)
    role = "system" if message.role == "developer" else message.role
    if message.tool_calls and role != "assistant":
        raise APIError(400, f"messages[{i}]: only assistant messages may have tool_calls, found role '{role}'",
                       param=f"messages[{i}].tool_calls", code="invalid_value")
    if content is None and not message.tool_calls:
        raise APIError(400, f"messages[{i}]: a '{role}' message needs 'content'", param=f"messages[{i}].content",
                       code="invalid_value")
    out: dict[str, Any] = {"role": role, "content": content}
    if message.tool_calls:
        out["tool_calls"] = [call.model_dump(exclude_none=True) for call in message.tool_calls]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        out["name"] = message.name
    return out


def _unsupported(body: _GenerationBody) -> None:
    """Refuse, by name, the OpenAI features this server does not implement (rather than ignore them)."""
    if body.n not in (None, 1):
        raise APIError(400, f"n={body.n}: only one choice per request is supported (n=1)", param="n",
                       code="unsupported_value")
    if isinstance(body, ChatCompletionRequest):
        if body.logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs", code="unsupported_value")
        fmt = body.response_format
        if fmt is not None and fmt.get("type") != "text":
            raise APIError(400, f"response_format {fmt.get('type')!r} is not supported; only 'text'",
                           param="response_format", code="unsupported_value")
    else:
        for name in ("logprobs", "suffix"):
            if getattr(body, name) is not None:
                raise APIError(400, f"'{name}' is not supported", param=name, code="unsupported_value")
        if body.best_of not in (None, 1):
            raise APIError(400, "best_of > 1 is not supported", param="best_of", code="unsupported_value")


def _usage(results: list[Result]) -> dict[str, int]:
    prompt = sum(r.prompt_tokens for r in results)
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


def create_app(llm, model_name: str, max_batch: int = 16, max_queue: int = 64, max_len: int | None = None):
    """The FastAPI app serving `llm` as `model_name`; its scheduler runs while the app does (lifespan).

    `max_len` (slots per request: prompt + completion) defaults to the model's context, capped
    at 4096; the KV cache holds `max_batch * max_len` slots per attention layer.
    """
    import contextlib

    from fastapi import FastAPI
    from fastapi import Request as HTTPRequest
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    context = llm.config.max_position_embeddings
    max_len = min(context, DEFAULT_MAX_LEN) if max_len is None else max_len
    pad = llm.tokenizer.pad_id if llm.tokenizer is not None and llm.tokenizer.pad_id is not None else 0
    scheduler = Scheduler(llm.model, max_batch=max_batch, max_queue=max_queue, max_len=max_len, pad_id=pad)
    server = _Server(llm, model_name, scheduler)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.close()

    app = FastAPI(title="lfm2", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible server for Liquid AI's LFM2 models")
    app.state.server = server
    app.state.scheduler = scheduler

    def error_response(exc: APIError, request: HTTPRequest) -> JSONResponse:
        log.info(json.dumps({"event": "request_error", "path": request.url.path, "status": exc.status,
                             "code": exc.code, "message": exc.message}))
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(APIError)
    async def _api_error(request: HTTPRequest, exc: APIError):
        return error_response(exc, request)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: HTTPRequest, exc: RequestValidationError):
        return error_response(_validation_error(list(exc.errors())), request)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: HTTPRequest, exc: StarletteHTTPException):
        if exc.status_code == 404:
            err = APIError(404, f"no route {request.method} {request.url.path}", code="not_found")
        elif exc.status_code == 405:
            err = APIError(405, f"method {request.method} is not allowed on {request.url.path}",
                           code="method_not_allowed")
        else:
            err = APIError(exc.status_code, str(exc.detail))
        err.headers = dict(exc.headers or {}) or None
        return error_response(err, request)

    @app.exception_handler(Exception)
    async def _internal(request: HTTPRequest, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        err = APIError(500, f"internal server error ({type(exc).__name__}); see the server log", type="server_error",
                       code="internal_error")
        return JSONResponse(err.body(), status_code=500)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "active": scheduler.active, "queued": scheduler.queued,
                "max_batch": scheduler.max_batch, "max_queue": scheduler.max_queue, "max_len": scheduler.max_len}

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": server.created, "owned_by": "lfm2",
                "max_model_len": scheduler.max_len}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        server.check_model(model_id)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: HTTPRequest):
        start = time.perf_counter()
        params, stop = server.validate(body)
        ids, forced, tools, constraint = server.chat_prompt(body)
        max_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        wanted = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        budget = server.token_budget(len(ids), wanted, max_param, "messages")
        jobs, events = server.submit([ids], params, [budget], stop, body.ignore_eos, constraint)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        watcher = asyncio.create_task(_watch_disconnect(http.receive, lambda: server.cancel(jobs)))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(delta: dict, finish: str | None = None) -> dict:
            return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "system_fingerprint": None,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        def finish_reason(result: Result, calls: bool) -> str:
            return "tool_calls" if calls and result.finish_reason == "stop" else result.finish_reason

        if not body.stream:
            try:
                text, result = await _collect_one(events, jobs[0])
            finally:
                watcher.cancel()
                server.cancel(jobs)
            _log_request(request_id, "chat", False, [result], start)
            _raise_if_failed(result)
            content, calls = forced + text, []
            if tools is not None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # an unparsable block stays in the content, as documented
                    content, calls = parse_tool_calls(content, tools)
            message: dict[str, Any] = {"role": "assistant", "content": content if content or not calls else None}
            if calls:
                message["tool_calls"] = calls
            return {"id": request_id, "object": "chat.completion", "created": created, "model": model_name,
                    "system_fingerprint": None,
                    "choices": [{"index": 0, "message": message, "logprobs": None,
                                 "finish_reason": finish_reason(result, bool(calls))}],
                    "usage": _usage([result])}

        async def stream() -> AsyncIterator[str]:
            result: Result | None = None
            parser = ToolCallStreamParser(tools) if tools is not None else None
            n_calls = 0

            def deltas(kind_values) -> list[dict]:
                nonlocal n_calls
                out = []
                for kind, value in kind_values:
                    if kind == "content":
                        out.append({"content": value})
                    else:
                        calls = []
                        for call in value:
                            calls.append({"index": n_calls, **call})
                            n_calls += 1
                        out.append({"tool_calls": calls})
                return out

            def feed(piece: str) -> list[dict]:
                if parser is None:
                    return [{"content": piece}] if piece else []
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    return deltas(parser.feed(piece))

            try:
                yield _sse(chunk({"role": "assistant", "content": ""}))
                for delta in feed(forced):
                    yield _sse(chunk(delta))
                while True:
                    kind, _, value = await events.get()
                    if kind == "done":
                        result = jobs[0].result = value
                        break
                    for delta in feed(value):
                        yield _sse(chunk(delta))
                if parser is not None:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        for delta in deltas(parser.finish()):
                            yield _sse(chunk(delta))
                if result.finish_reason in ("error", "cancelled"):
                    yield _sse(_failure(result).body())
                    return
                yield _sse(chunk({}, finish_reason(result, n_calls > 0)))
                if include_usage:
                    yield _sse({"id": request_id, "object": "chat.completion.chunk", "created": created,
                                "model": model_name, "system_fingerprint": None, "choices": [],
                                "usage": _usage([result])})
                yield _sse("[DONE]")
            finally:
                watcher.cancel()
                server.cancel(jobs)
                _log_request(request_id, "chat", True, [result], start)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        start = time.perf_counter()
        params, stop = server.validate(body)
        prompts, texts = server.completion_prompts(body)
        budgets = [server.token_budget(len(p), body.max_tokens, "max_tokens", "prompt") for p in prompts]
        jobs, events = server.submit(prompts, params, budgets, stop, body.ignore_eos)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        watcher = asyncio.create_task(_watch_disconnect(http.receive, lambda: server.cancel(jobs)))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(choices: list[dict], usage: dict | None = None) -> dict:
            out = {"id": request_id, "object": "text_completion", "created": created, "model": model_name,
                   "system_fingerprint": None, "choices": choices}
            if usage is not None:
                out["usage"] = usage
            return out

        def choice(i: int, text: str, finish: str | None) -> dict:
            return {"index": i, "text": text, "logprobs": None, "finish_reason": finish}

        if not body.stream:
            outs = [texts[i] if body.echo else "" for i in range(len(jobs))]
            try:
                while any(job.result is None for job in jobs):
                    kind, i, value = await events.get()
                    if kind == "done":
                        jobs[i].result = value
                    else:
                        outs[i] += value
            finally:
                watcher.cancel()
                server.cancel(jobs)
            results = [job.result for job in jobs]
            _log_request(request_id, "completions", False, results, start)
            for result in results:
                _raise_if_failed(result)
            return chunk([choice(i, outs[i], r.finish_reason) for i, r in enumerate(results)], _usage(results))

        async def stream() -> AsyncIterator[str]:
            failed: Result | None = None
            try:
                if body.echo:
                    for i, text in enumerate(texts):
                        yield _sse(chunk([choice(i, text, None)]))
                while any(job.result is None for job in jobs):
                    kind, i, value = await events.get()
                    if kind == "text":
                        yield _sse(chunk([choice(i, value, None)]))
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
                    yield _sse(chunk([], _usage([job.result for job in jobs])))
                yield _sse("[DONE]")
            finally:
                watcher.cancel()
                server.cancel(jobs)
                _log_request(request_id, "completions", True, [job.result for job in jobs], start)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


async def _collect_one(events: asyncio.Queue, job: _Job) -> tuple[str, Result]:
    text = ""
    while True:
        kind, _, value = await events.get()
        if kind == "done":
            job.result = value
            return text, value
        text += value


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
) -> None:
    """Load `model` (default: the bundled one), with a LoRA `adapter` if given, and serve it until interrupted.

    Clients name it `model_name` (default: `model` as given, or the bundled model's name).
    """
    import uvicorn

    import lfm2

    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO), format="%(message)s")
    llm = lfm2.load(model, dtype=dtype, device=device, adapter=adapter)
    from lfm2.bundled import NAME

    name = model_name or (str(model) if model else NAME)
    app = create_app(llm, name, max_batch=max_batch, max_queue=max_queue, max_len=max_len)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


def add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """`lfm2 serve`: the arguments of `serve`, for the CLI's subcommand table."""
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    p.add_argument("--model", "-m", default=None, help="checkpoint directory, .gguf file or hub id (default: bundled)")
    p.add_argument("--dtype", default=None, help="float32 (CPU default), bfloat16, float16")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps ...")
    p.add_argument("--adapter", default=None, help="LoRA adapter directory (PEFT format) to apply")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: --model)")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait; beyond, HTTP 429")
    p.add_argument("--max-model-len", type=int, default=None,
                   help=f"prompt + completion tokens per request (default: the context, at most {DEFAULT_MAX_LEN})")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(handler=cmd_serve)
    return p


def cmd_serve(args: argparse.Namespace) -> None:
    serve(args.model, host=args.host, port=args.port, max_batch=args.max_batch, max_queue=args.max_queue,
          max_len=args.max_model_len, dtype=args.dtype, device=args.device, model_name=args.served_model_name,
          log_level=args.log_level, adapter=args.adapter)
