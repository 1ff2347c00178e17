"""Continuous batching: concurrent generation requests share every forward pass.

A `Scheduler` owns the model and one large `Cache` of `max_batch` rows, and runs a loop in a
background thread (torch releases the GIL inside its kernels, so an asyncio server stays
responsive). Each iteration of the loop:

1. retires the rows whose requests were cancelled (a client that went away frees its row at the
   next step boundary, not when its generation would have ended);
2. admits waiting requests while rows are free: their prompts are prefilled together in a small
   left-padded cache of their own, each samples its first token from the prefill logits (the
   time to first token does not wait for a decode step), and each row of that cache is copied
   into a free row of the batch cache, right-aligned to the batch's shared slot counter
   (`Cache.put_row`; `Cache.shift` first moves everyone right when a prompt is longer than the
   batch so far). Any placement before the counter would attend the same (empty slots are masked,
   RoPE positions are per row); right-aligning puts the row's empty slots in front, where a
   compaction can reclaim them;
3. runs one decode step for every active row at once, on `cache.narrow(n)`: active rows are kept
   packed at the top of the cache (a retiring row is replaced by the last one), so a step costs
   the active rows only, and a lone request runs at batch-1 speed;
4. samples each row with its own parameters, generator and penalty history (rows with greedy and
   no penalties share one argmax), hands each token to its request's `on_token`, and retires the
   rows that finished: a stop id, `on_token` asking to stop (stop strings), or `max_new_tokens`.

Rows never see each other: the cache's per-row `valid` mask, RoPE positions and conv states keep
them apart, so a row's logits differ from a batch-1 run by float rounding only. When the shared
slot counter reaches `max_len`, the slots that every row has left are reclaimed by shifting
(`Cache.shift`); a request fits by construction (prompt + max_new_tokens <= max_len).

The scheduler knows nothing about text or HTTP: it takes token ids and callbacks, which run in
the engine thread and must be quick (the server's callbacks push a piece of text onto an asyncio queue with
`loop.call_soon_threadsafe`). Waiting requests are held in a bounded queue; `submit` raises
`SchedulerBusy` when it is full, which a server turns into HTTP 429.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lfm2.cache import Cache
from lfm2.constrain import apply_masks, choose_tool_names, name_room
from lfm2.errors import GenerationError, SchedulerBusy
from lfm2.models.lfm2 import Lfm2ForCausalLM
from lfm2.sampling import SamplingParams, TokenHistory, make_generator, sample_next

log = logging.getLogger("lfm2.scheduler")


@dataclass
class Result:
    """How a request ended, with its timings (seconds, measured from `submit`)."""

    finish_reason: str  # "stop" (stop id or on_token), "length", "cancelled" or "error"
    prompt_tokens: int
    completion_tokens: int  # sampled tokens, a final stop id included
    queued_s: float  # until the request was admitted to the batch
    time_to_first_token_s: float
    total_s: float
    error: str | None = None

    @property
    def tokens_per_s(self) -> float:
        """Decode rate: tokens after the first one, per second after the first one."""
        decode_s = self.total_s - self.time_to_first_token_s
        return (self.completion_tokens - 1) / decode_s if self.completion_tokens > 1 and decode_s > 0 else 0.0


def _ignore_token(token: int) -> bool:
    return False


def _ignore_result(result: Result) -> None:
    return None


@dataclass(eq=False)
class Request:
    """One generation: a prompt of token ids, how to sample, and where the tokens go.

    `on_token(token) -> bool` is called in the engine thread with every sampled token except a
    stop id; returning True ends the request with finish reason "stop" (how stop strings work).
    `on_finish(result)` is called once, in the engine thread (or in `close`/`cancel`'s caller
    when the request never started), whatever the outcome.
    """

    prompt: Sequence[int]
    params: SamplingParams
    max_new_tokens: int
    on_token: Callable[[int], bool] = _ignore_token
    on_finish: Callable[[Result], None] = _ignore_result
    stop_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    constraint: Any = None  # a `lfm2.constrain.ToolCallConstraint` for this request's tool calls
    cancelled: bool = field(default=False, init=False)
    submitted_at: float = field(default=0.0, init=False)
    admitted_at: float = field(default=0.0, init=False)
    first_token_at: float = field(default=0.0, init=False)


class _Row:
    """Per-sequence state of an active request (its cache row is its index in `Scheduler._rows`)."""

    def __init__(self, request: Request, vocab_size: int, device: torch.device) -> None:
        self.request = request
        params = request.params
        self.generator = None if params.greedy else make_generator(params.seed, device)
        self.history = None
        if params.needs_history:
            self.history = TokenHistory(torch.tensor([list(request.prompt)], device=device), vocab_size)
        self.generated = 0
        self.last = 0  # the token to feed at the next decode step
        self.finish: str | None = None
        self.error: str | None = None


class Scheduler:
    """Batches concurrent requests on one model; see the module docstring for the design.

    `max_batch`: rows decoded together. `max_queue`: requests that may wait for a row.
    `max_len`: slots per row (prompt + generated tokens), by default the model's context.
    `max_prefill_tokens`: padded prompt tokens admitted in one prefill call (at least one
    request is always admitted), which bounds how long a wave of newcomers stalls the batch.
    """

    def __init__(
        self,
        model: Lfm2ForCausalLM,
        max_batch: int = 16,
        max_queue: int = 64,
        max_len: int | None = None,
        max_prefill_tokens: int = 4096,
        pad_id: int = 0,
    ) -> None:
        context = model.config.max_position_embeddings
        max_len = context if max_len is None else max_len
        if max_batch < 1 or max_queue < 0 or not 2 <= max_len <= context:
            raise GenerationError(
                f"Scheduler: max_batch={max_batch} must be >= 1, max_queue={max_queue} >= 0 and "
                f"max_len={max_len} in [2, {context}] (the model's context)"
            )
        self.model = model
        self.max_batch, self.max_queue, self.max_len = max_batch, max_queue, max_len
        self.max_prefill_tokens = max_prefill_tokens
        self.pad_id = pad_id
        self.device = model.model.embed_tokens.weight.device
        self._cache: Cache | None = None  # allocated in the engine thread, under inference mode
        self._rows: list[_Row] = []
        self._waiting: collections.deque[Request] = collections.deque()
        self._cond = threading.Condition()
        self._running = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode steps run so far (tests and benchmarks read these counters)
        self.shifts = 0  # times the rows were moved right to make room for a longer prompt
        self.compactions = 0  # times the slots every row had left were reclaimed (moved left)

    # -- public API, called from any thread ---------------------------------------------------

    @property
    def active(self) -> int:
        """Requests holding a cache row now."""
        return len(self._rows)

    @property
    def queued(self) -> int:
        """Requests waiting for a row."""
        return len(self._waiting)

    def submit(self, request: Request) -> Request:
        """Queue `request`; raises GenerationError if it can never run, SchedulerBusy if the queue is full."""
        prompt, vocab = request.prompt, self.model.config.vocab_size
        if len(prompt) == 0:
            raise GenerationError("the prompt is empty: a request needs at least one token")
        if not isinstance(request.max_new_tokens, int) or request.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens={request.max_new_tokens!r} must be an integer >= 1")
        if len(prompt) + request.max_new_tokens > self.max_len:
            raise GenerationError(
                f"prompt of {len(prompt)} tokens plus max_new_tokens={request.max_new_tokens} exceeds the "
                f"context of {self.max_len} tokens"
            )
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise GenerationError(f"token id {bad[0]} is outside the vocabulary (size {vocab})")
        with self._cond:
            if not self._running:
                raise GenerationError("the scheduler is not running: call start() first")
            if len(self._rows) + len(self._waiting) >= self.max_batch + self.max_queue:
                raise SchedulerBusy(
                    f"the server is busy: {len(self._rows)} requests running and {len(self._waiting)} waiting "
                    f"(max_queue={self.max_queue}); retry shortly"
                )
            request.submitted_at = time.perf_counter()
            self._waiting.append(request)
            self._cond.notify()
        return request

    def cancel(self, request: Request) -> None:
        """Stop `request` at the next step boundary and free its row (finish reason "cancelled")."""
        request.cancelled = True
        with self._cond:
            self._cond.notify()

    def start(self) -> Scheduler:
        with self._cond:
            if self._running:
                return self
            self._running = True
        self._thread = threading.Thread(target=self._run, name="lfm2-scheduler", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the engine thread; requests still waiting or running end as "cancelled"."""
        with self._cond:
            self._running = False
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        leftovers = [row.request for row in self._rows] + list(self._waiting)
        self._rows.clear()
        self._waiting.clear()
        for request in leftovers:
            self._finish(request, "cancelled", 0)

    def __enter__(self) -> Scheduler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- engine thread ------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            self._cache = self.model.make_cache(self.max_batch, self.max_len)
            while True:
                with self._cond:
                    while self._running and not self._rows and not self._waiting:
                        self._cond.wait()
                    if not self._running:
                        return
                    newcomers, dropped = self._take_newcomers()
                for request in dropped:
                    self._finish(request, "cancelled", 0)
                try:
                    self._iteration(newcomers)
                except Exception as exc:  # a bug must not kill the thread: fail the batch, keep serving
                    log.exception("scheduler step failed; ending the %d active requests", len(self._rows))
                    self._fail_all(newcomers, f"{type(exc).__name__}: {exc}")

    def _take_newcomers(self) -> tuple[list[Request], list[Request]]:
        """Pop the waiting requests that fit in the free rows and the prefill budget (under the lock)."""
        newcomers: list[Request] = []
        dropped: list[Request] = []
        longest = 0
        while self._waiting and len(self._rows) + len(newcomers) < self.max_batch:
            request = self._waiting[0]
            if request.cancelled:
                dropped.append(self._waiting.popleft())
                continue
            padded = (len(newcomers) + 1) * max(longest, len(request.prompt))
            if newcomers and padded > self.max_prefill_tokens:
                break
            longest = max(longest, len(request.prompt))
            newcomers.append(self._waiting.popleft())
        return newcomers, dropped

    def _iteration(self, newcomers: list[Request]) -> None:
        self._retire([i for i, row in enumerate(self._rows) if row.request.cancelled], "cancelled")
        if newcomers:
            self._prefill(newcomers)
        if self._rows:
            self._decode()

    def _prefill(self, requests: list[Request]) -> None:
        """Prefill the newcomers together, sample their first tokens, and add them to the batch."""
        cache = self._cache
        now = time.perf_counter()
        k, T = len(requests), max(len(r.prompt) for r in requests)
        ids = torch.full((k, T), self.pad_id, dtype=torch.long)
        mask = torch.zeros(k, T, dtype=torch.bool)
        for j, request in enumerate(requests):  # left padding: every prompt ends at slot T-1
            request.admitted_at = now
            ids[j, T - len(request.prompt) :] = torch.tensor(list(request.prompt))
            mask[j, T - len(request.prompt) :] = True
        ids, mask = ids.to(self.device), mask.to(self.device)
        # tool_choice "required" puts the reply at a call's name: room to score the listed names there
        prefill = self.model.make_cache(k, T + name_room(r.constraint for r in requests))
        logits = self.model(ids, prefill, attention_mask=None if bool(mask.all()) else mask, last_only=True)[:, -1]
        rows = [_Row(r, self.model.config.vocab_size, self.device) for r in requests]
        self._choose_names(logits, rows, prefill)
        tokens = self._sample(logits, rows)
        n = len(self._rows)
        if n == 0:
            cache.length = T  # every row is clear: start the slot counter afresh
        elif cache.length < T:
            cache.shift(T - cache.length)
            self.shifts += 1
        for j, row in enumerate(rows):
            cache.put_row(n + j, prefill, j)
            self._rows.append(row)
        self._deliver(range(n, n + k), tokens)

    def _decode(self) -> None:
        cache, n = self._cache, len(self._rows)
        free = cache.leading_free_slots()
        # Reclaim slots every row has left: needed when the counter is at max_len, and worth it
        # when they are a large share of the attention span.
        if free and (cache.length >= self.max_len or (free >= 64 and free * 4 >= cache.length)):
            cache.shift(-free)
            self.compactions += 1
        view = cache.narrow(n)
        last = torch.tensor([[row.last] for row in self._rows], device=self.device)  # (n, 1)
        logits = self.model(last, view)[:, -1]
        cache.length = view.length
        self.steps += 1
        self._choose_names(logits, self._rows, view)
        self._deliver(range(n), self._sample(logits, self._rows))

    def _choose_names(self, logits: torch.Tensor, rows: list[_Row], cache: Any) -> None:
        """Rows at the start of a tool call's name get it chosen whole (`lfm2.constrain.choose_tool_names`)."""
        constraints = [row.request.constraint for row in rows]
        if any(c is not None and c.at_name() for c in constraints):
            choose_tool_names(self.model, cache, logits, constraints, [row.request.params for row in rows],
                              [row.generator for row in rows])

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> list[int | None]:
        """One token per row of `logits` (n, V), each row with its own parameters.

        A row whose sampling fails (e.g. extreme parameters that overflow to NaN) gets None and
        ends with an error; its neighbours carry on.
        """
        out: list[int | None] = [0] * len(rows)
        masks = [None if row.request.constraint is None else row.request.constraint.mask() for row in rows]
        plain = [i for i, row in enumerate(rows)
                 if row.request.params.greedy and row.history is None and masks[i] is None]
        if plain:
            index = torch.tensor(plain, device=logits.device)
            for i, token in zip(plain, logits.index_select(0, index).argmax(dim=-1).tolist(), strict=True):
                out[i] = token
        plain_set = set(plain)
        for i, row in enumerate(rows):
            if i in plain_set:
                continue
            try:
                row_logits = logits[i : i + 1]
                if masks[i] is not None:
                    row_logits = apply_masks(row_logits, [masks[i]])
                out[i] = int(sample_next(row_logits, row.request.params, row.generator, row.history))
            except Exception as exc:
                log.warning("sampling failed for one request (%s: %s); ending it", type(exc).__name__, exc)
                row.finish, row.error, out[i] = "error", f"sampling failed: {type(exc).__name__}: {exc}", None
        for token, row in zip(out, rows, strict=True):
            if token is not None and row.request.constraint is not None:
                row.request.constraint.advance(token)
        return out

    def _deliver(self, indices: range, tokens: list[int | None]) -> None:
        """Hand each row its token, note which rows finished, and retire them."""
        now = time.perf_counter()
        done: list[int] = []
        for i, token in zip(indices, tokens, strict=True):
            row = self._rows[i]
            request = row.request
            if token is None:  # sampling failed: `_sample` set the error
                done.append(i)
                continue
            row.generated += 1
            if row.generated == 1:
                request.first_token_at = now
            if not request.ignore_eos and token in request.stop_ids:
                row.finish = "stop"
            else:
                try:
                    if request.on_token(token):
                        row.finish = "stop"
                except Exception as exc:  # a consumer's bug ends its own request only
                    log.exception("on_token failed; ending that request")
                    row.finish, row.error = "error", f"{type(exc).__name__}: {exc}"
            if row.finish is None and row.generated >= request.max_new_tokens:
                row.finish = "length"
            if row.finish is None:
                row.last = token
                if row.history is not None:
                    row.history.update(torch.tensor([token], device=self.device))
            else:
                done.append(i)
        self._retire(done)

    def _retire(self, indices: list[int], reason: str | None = None) -> None:
        """Free the rows at `indices`, keeping the active rows packed at the top of the cache."""
        cache = self._cache
        for i in sorted(indices, reverse=True):
            row = self._rows[i]
            last = len(self._rows) - 1
            if i != last:  # move the last row into the hole
                cache.put_row(i, cache, last)
                self._rows[i] = self._rows[last]
            cache.clear_row(last)
            self._rows.pop()
            self._finish(row.request, reason or row.finish or "stop", row.generated, row.error)
        if not self._rows:
            cache.length = 0

    def _fail_all(self, newcomers: list[Request], message: str) -> None:
        requests = [row.request for row in self._rows]
        requests += [r for r in newcomers if r not in requests]
        self._rows.clear()
        self._cache = self.model.make_cache(self.max_batch, self.max_len)
        for request in requests:
            self._finish(request, "error", 0, message)

    def _finish(self, request: Request, reason: str, generated: int, error: str | None = None) -> None:
        now = time.perf_counter()
        start = request.submitted_at or now
        result = Result(
            finish_reason=reason,
            prompt_tokens=len(request.prompt),
            completion_tokens=generated,
            queued_s=(request.admitted_at or now) - start,
            time_to_first_token_s=(request.first_token_at or now) - start,
            total_s=now - start,
            error=error,
        )
        try:
            request.on_finish(result)
        except Exception:
            log.exception("on_finish failed")
