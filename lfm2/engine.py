"""The engine: the one place where tokens are produced, for the Python API, the CLI and the server.

An `Engine` owns the model, one `Cache` of `max_batch` rows and (optionally) a `PrefixCache`.
Requests are token ids plus callbacks. Each `step()`:

1. retires the rows whose requests were cancelled (a client that went away frees its row at the
   next step boundary, not when its generation would have ended);
2. admits waiting requests while rows are free, and prefills them one at a time in chunks, each
   in a small cache of its own. A request first resumes from the longest stored prefix of its
   prompt (`lfm2.prefix_cache`: exact reuse on the hybrid cache), then reads the rest chunk by
   chunk, storing the state at the request's checkpoints (the ends of chat turns), at every
   `PREFILL_CHUNK` tokens and at the prompt's end. While other rows are decoding, a step
   prefills at most `max_prefill_tokens` prompt tokens, so a long prompt does not stall running
   streams; with nothing decoding, it prefills everything waiting. A request whose prefill is
   done samples its first token from the prefill logits and its row is copied into the batch
   cache, right-aligned to the shared slot counter (`Cache.put_row`; `Cache.shift` first moves
   everyone right when its prompt is longer than the batch so far);
3. runs one decode step for every active row at once, on `cache.narrow(n)`: active rows are kept
   packed at the top of the cache (a retiring row is replaced by the last one), so a step costs
   the active rows only, and a lone request runs at batch-1 speed. The step is the model's
   compiled one where `lfm2.compile` installed it;
4. samples each row with its own parameters, generator, penalty history and logits processor
   (rows whose parameters differ only in their seed are filtered in one call, then drawn apart),
   hands each token to its request's `on_token`, and retires the rows that finished (a stop id,
   `on_token` asking to stop, `max_new_tokens`), storing the state a finished row reached so a
   follow-up turn resumes from it.

Rows never see each other: the cache's per-row `valid` mask, RoPE positions and conv states keep
them apart, so a row's logits differ from a batch-1 run by float rounding only. When the shared
slot counter reaches `max_len`, the slots every row has left are reclaimed (`Cache.shift`).

Two ways to drive it: `start()` runs `step()` in a background thread (the server: torch releases
the GIL inside its kernels, so an asyncio server stays responsive) and `submit` feeds it from any
thread; `run(requests)` drives it in the caller's thread for a synchronous caller (`LLM.generate`,
`LLM.chat`, `lfm2 chat`), yielding after every step so that callers can stream.

The engine knows tokens only. Text, templates and tools live in the chat layer (`lfm2.llm`,
`lfm2.server`); constraints reach the engine as logits processors (`Request.constraint`):
    mask() -> bool tensor (V,) of allowed tokens, or None;   advance(token) -> None;
    look_ahead_room() -> cache slots its look-ahead needs (0: it needs none now);
    look_ahead(model, cache, logits, processors, params, generators): a static method run, for the
    rows whose room is > 0, before their token is sampled (tool-name choice in `lfm2.constrain`);
    each kind of processor gets its own rows (`run_look_ahead`). A wrapper such as
    `lfm2.reasoning.AfterReasoning` (a constraint applied to the answer only, after the thought)
    follows the same protocol and delegates to the processor it wraps.
    prepare() (optional): start computing the next mask, called just before the decode step's
    forward pass so the two overlap (grammars in `lfm2.structured`).
Callbacks run in the engine's thread and must be quick. `submit` raises `SchedulerBusy` when the
wait queue is full, which a server turns into HTTP 429.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lfm2.cache import Cache
from lfm2.compile import warm
from lfm2.errors import GenerationError, SchedulerBusy
from lfm2.models.lfm2 import Lfm2ForCausalLM
from lfm2.prefix_cache import PrefixCache
from lfm2.sampling import SamplingParams, TokenHistory, draw, filtered_probs, make_generator, process_logits
from lfm2.threads import release_openmp_workers

log = logging.getLogger("lfm2.engine")

PREFILL_CHUNK = 512  # prompt tokens per forward pass during prefill (and a prefix-cache boundary)
MAX_LOGPROBS = 20  # top_logprobs: OpenAI's limit


@dataclass
class Result:
    """How a request ended, with its timings (seconds, measured from `submit`)."""

    finish_reason: str  # "stop" (stop id or on_token), "length", "cancelled" or "error"
    prompt_tokens: int
    completion_tokens: int  # sampled tokens, a final stop id included
    queued_s: float  # until the request was admitted
    time_to_first_token_s: float
    total_s: float
    error: str | None = None
    cached_tokens: int = 0  # prompt tokens resumed from the prefix cache instead of prefilled

    @property
    def decode_tokens_per_s(self) -> float:
        """Decode rate: tokens after the first one, per second after the first one."""
        decode_s = self.total_s - self.time_to_first_token_s
        return (self.completion_tokens - 1) / decode_s if self.completion_tokens > 1 and decode_s > 0 else 0.0

    tokens_per_s = decode_tokens_per_s

    @property
    def prefill_tokens_per_s(self) -> float:
        """Prompt tokens per second until the first token (queueing included)."""
        return self.prompt_tokens / self.time_to_first_token_s if self.time_to_first_token_s > 0 else 0.0


@dataclass
class TokenLogprob:
    """A token's log-probability under the model (raw logits, before sampling's filters), with the
    `top` most likely alternatives as (token, logprob), most likely first."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


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
    `logprobs`: None, or how many alternatives to report with each sampled token (0..20): the
    engine appends a `TokenLogprob` to `token_logprobs` before calling `on_token`.
    `prompt_logprobs`: likewise for the prompt's tokens (`prompt_token_logprobs`, None for the first).
    `checkpoints`: prompt lengths after which to keep the state in the prefix cache (chat turns).
    `embed(start, end)`: the input embeddings (1, end - start, hidden) of `prompt[start:end]`, for a
    prompt some of whose tokens are placeholders (an image's `<image>` tokens, whose embeddings are
    the vision model's features): prefill feeds them to the model instead of the tokens' own. Since
    equal placeholder ids do not mean equal content, the prefix cache keeps such a prompt's states
    under `embed.key` (ids naming the content: `lfm2.models.lfm2_vl.PromptEmbedder`), or not at all
    where the embedder has no `key`.
    """

    prompt: Sequence[int]
    params: SamplingParams
    max_new_tokens: int
    on_token: Callable[[int], bool] = _ignore_token
    on_finish: Callable[[Result], None] = _ignore_result
    stop_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    constraint: Any = None  # a logits processor (see the module docstring), e.g. `lfm2.constrain`'s
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    checkpoints: Sequence[int] = ()
    embed: Callable[[int, int], torch.Tensor] | None = None
    cancelled: bool = field(default=False, init=False)
    submitted_at: float = field(default=0.0, init=False)
    admitted_at: float = field(default=0.0, init=False)
    first_token_at: float = field(default=0.0, init=False)
    result: Result | None = field(default=None, init=False)
    token_logprobs: list[TokenLogprob] = field(default_factory=list, init=False)
    prompt_token_logprobs: list[TokenLogprob | None] = field(default_factory=list, init=False)


def _cache_key(request: Request) -> list[int] | None:
    """The ids the prefix cache keeps `request`'s prompt under (see `Request`), or None for none."""
    if request.embed is None:
        return list(request.prompt)
    key = getattr(request.embed, "key", None)
    return None if key is None else list(key)


class _Row:
    """Per-sequence state of a request being prefilled or decoded."""

    def __init__(self, request: Request, vocab_size: int, device: torch.device) -> None:
        self.request = request
        params = request.params
        self.generator = None if params.greedy else make_generator(params.seed, device)
        self.history = None
        if params.needs_history:
            self.history = TokenHistory(torch.tensor([list(request.prompt)], device=device), vocab_size)
        self.tokens: list[int] = []  # sampled so far
        self.last = 0  # the token to feed at the next decode step
        self.finish: str | None = None
        self.error: str | None = None
        # prefill state (until the row joins the batch)
        self.cache: Cache | None = None
        self.done = 0  # prompt tokens read into `cache`
        self.cached = 0  # of which resumed from the prefix cache
        self.logits: torch.Tensor | None = None  # (1, V) after the whole prompt: ready to join
        self.last_logits: torch.Tensor | None = None  # (1, V) after the last chunk read


class Engine:
    """Batches requests on one model; see the module docstring for the design.

    `max_batch`: rows decoded together. `max_queue`: requests that may wait for a row.
    `max_len`: slots per row (prompt + generated tokens), by default the model's context.
    `max_prefill_tokens`: prompt tokens prefilled between two decode steps while rows are decoding.
    `prefix_cache`: where states are kept for reuse (None: no reuse).
    """

    def __init__(
        self,
        model: Lfm2ForCausalLM,
        max_batch: int = 16,
        max_queue: int = 64,
        max_len: int | None = None,
        max_prefill_tokens: int = PREFILL_CHUNK,
        pad_id: int = 0,
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        context = model.config.max_position_embeddings
        max_len = context if max_len is None else max_len
        if max_batch < 1 or max_queue < 0 or not 2 <= max_len <= context or max_prefill_tokens < 1:
            raise GenerationError(
                f"Engine: max_batch={max_batch} must be >= 1, max_queue={max_queue} >= 0, max_prefill_tokens="
                f"{max_prefill_tokens} >= 1 and max_len={max_len} in [2, {context}] (the model's context)"
            )
        self.model = model
        self.max_batch, self.max_queue, self.max_len = max_batch, max_queue, max_len
        self.max_prefill_tokens = max_prefill_tokens
        self.pad_id = pad_id
        self.prefix_cache = prefix_cache
        self.device = model.device
        self._cache: Cache | None = None  # allocated at the first step, under inference mode
        self._rows: list[_Row] = []  # decoding, packed at the top of `_cache`
        self._prefilling: list[_Row] = []  # admitted, prompt being read
        self._waiting: collections.deque[Request] = collections.deque()
        self._cond = threading.Condition()
        # One step at a time, whoever drives. Reentrant: a Ctrl-C landing between a step's acquire and its
        # `with` block leaves the lock held by the interrupted thread, whose `run` then retires the
        # cancelled rows with one more step; a plain lock would hang there (the likely cause of a Ctrl-C
        # test that hung once in CI).
        self._step_lock = threading.RLock()
        self._running = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode steps run so far (tests and benchmarks read these counters)
        self.prefill_chunks = 0  # prefill forward passes run so far
        self.shifts = 0  # times the rows were moved right to make room for a longer prompt
        self.compactions = 0  # times the slots every row had left were reclaimed (moved left)

    # -- public API, called from any thread ---------------------------------------------------

    @property
    def active(self) -> int:
        """Requests holding a row now (decoding or being prefilled)."""
        return len(self._rows) + len(self._prefilling)

    @property
    def queued(self) -> int:
        """Requests waiting for a row."""
        return len(self._waiting)

    def check(self, request: Request) -> None:
        """Raise GenerationError if `request` can never run here (the one place requests are validated)."""
        prompt, vocab = request.prompt, self.model.config.vocab_size
        if len(prompt) == 0:
            raise GenerationError("the prompt is empty: a request needs at least one token")
        if not isinstance(request.max_new_tokens, int) or request.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens={request.max_new_tokens!r} must be an integer >= 1")
        if len(prompt) + request.max_new_tokens > self.max_len:
            raise GenerationError(
                f"prompt of {len(prompt)} tokens plus max_new_tokens={request.max_new_tokens} exceeds the "
                f"context of {self.max_len} tokens; shorten the prompt or lower max_new_tokens"
            )
        bad = [t for t in prompt if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise GenerationError(f"token id {bad[0]!r} is outside the vocabulary (size {vocab})")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(request, name)
            if k is not None and (not isinstance(k, int) or not 0 <= k <= MAX_LOGPROBS):
                raise GenerationError(f"{name}={k!r} must be an integer in [0, {MAX_LOGPROBS}]")

    def submit(self, request: Request) -> Request:
        """Queue `request`; raises GenerationError if it can never run, SchedulerBusy if the queue is full."""
        self.check(request)
        with self._cond:
            if self.active + len(self._waiting) >= self.max_batch + self.max_queue:
                raise SchedulerBusy(
                    f"the server is busy: {self.active} requests running and {len(self._waiting)} waiting "
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

    def run(self, requests: Sequence[Request]) -> Iterator[None]:
        """Submit `requests` and drive the engine until all of them have finished, yielding after
        every step (their callbacks have run): a synchronous caller's loop. Leaving the loop early
        cancels the requests still running. With the background thread running, it waits on that."""
        if self.max_batch + self.max_queue < len(requests):
            raise GenerationError(f"{len(requests)} requests do not fit max_batch + max_queue")
        done = threading.Event()  # set by the requests' callbacks: something to hand the caller
        for r in requests:
            self._wrap(r, done)
            self.submit(r)
        try:
            while not all(r.result is not None for r in requests):
                if self._running:
                    done.wait()
                    done.clear()
                else:
                    self.step()
                yield
        finally:
            for r in requests:
                if r.result is None:
                    self.cancel(r)
            if not self._running and any(r.result is None for r in requests):
                self.step()  # retire the cancelled rows now

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, max_new_tokens: int,
                 stop_ids: frozenset[int] | set[int] = frozenset(), ignore_eos: bool = False,
                 ) -> Iterator[tuple[int, int]]:
        """Token ids in, (row, token) out as they are sampled: `run` for callers that want tokens
        only (benchmarks, tests). A stop id ends its row and is not yielded."""
        out: collections.deque[tuple[int, int]] = collections.deque()

        def push(row: int) -> Callable[[int], bool]:
            def on_token(token: int) -> bool:
                out.append((row, token))
                return False
            return on_token

        requests = [Request(list(p), params, max_new_tokens, push(r), stop_ids=frozenset(stop_ids),
                            ignore_eos=ignore_eos) for r, p in enumerate(prompts)]
        for _ in self.run(requests):
            while out:
                yield out.popleft()
        failed = next((r.result for r in requests if r.result.finish_reason == "error"), None)
        if failed is not None:
            raise GenerationError(f"generation failed: {failed.error}")

    def start(self) -> Engine:
        """Run `step()` in a background thread until `close()`.

        The calling thread (the one that loaded the model, in a server) gives back its OpenMP
        workers: left idle, they would slow every parallel region of the engine thread ~3x
        (`lfm2.threads`)."""
        with self._cond:
            if self._running:
                return self
            self._running = True
        self._thread = threading.Thread(target=self._loop, name="lfm2-engine", daemon=True)
        self._thread.start()
        release_openmp_workers()
        return self

    def close(self) -> None:
        """Stop the engine thread; requests still waiting or running end as "cancelled"."""
        with self._cond:
            self._running = False
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        leftovers = [row.request for row in self._rows + self._prefilling] + list(self._waiting)
        self._rows.clear()
        self._prefilling.clear()
        self._waiting.clear()
        self._cache = None  # a later step starts from a clear one
        for request in leftovers:
            self._finish(request, "cancelled", 0)

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def step(self) -> bool:
        """One iteration (admit, prefill, decode, retire); False when there was nothing to do."""
        with self._step_lock, torch.inference_mode():
            if self._cache is None:
                self._cache = self.model.make_cache(self.max_batch, self.max_len)
            with self._cond:
                dropped = self._admit()
            for request in dropped:
                self._finish(request, "cancelled", 0)
            if not self._rows and not self._prefilling:
                return bool(dropped)
            try:
                self._iteration()
            except Exception as exc:  # a bug must not kill the engine: fail the batch, keep serving
                log.exception("engine step failed; ending the %d active requests", self.active)
                self._fail_all(f"{type(exc).__name__}: {exc}")
            return True

    # -- engine thread ------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._running and not self._rows and not self._prefilling and not self._waiting:
                    self._cond.wait()
                if not self._running:
                    return
            self.step()

    @staticmethod
    def _wrap(request: Request, event: threading.Event) -> None:
        """Make `request`'s callbacks also set `event` (a synchronous caller waiting on the thread)."""
        on_token, on_finish = request.on_token, request.on_finish

        def token(t: int) -> bool:
            try:
                return on_token(t)
            finally:
                event.set()

        def finish(result: Result) -> None:
            try:
                on_finish(result)
            finally:
                event.set()

        request.on_token, request.on_finish = token, finish

    def _admit(self) -> list[Request]:
        """Move waiting requests into free rows (under the lock); returns the cancelled ones."""
        dropped: list[Request] = []
        vocab = self.model.config.vocab_size
        while self._waiting and self.active < self.max_batch:
            request = self._waiting.popleft()
            if request.cancelled:
                dropped.append(request)
                continue
            request.admitted_at = time.perf_counter()
            self._prefilling.append(_Row(request, vocab, self.device))
        return dropped

    def _iteration(self) -> None:
        self._retire([i for i, row in enumerate(self._rows) if row.request.cancelled], "cancelled")
        for row in [r for r in self._prefilling if r.request.cancelled]:
            self._prefilling.remove(row)
            self._finish(row.request, "cancelled", 0)
        if self._prefilling:
            # A compiled decode step not built yet is built now, before these prompts' first tokens, so that no
            # stream stops for the compiler between its first and second token (the first time, a minute) and
            # its decode speed is the step's (`lfm2 generate` reported 31 tok/s for 65 with it inside).
            warm(self.model, len(self._rows) + len(self._prefilling))
        budget = self.max_prefill_tokens if self._rows else None  # nothing decoding: prefill all
        while self._prefilling and (budget is None or budget > 0):
            row = self._prefilling[0]
            budget = self._prefill_chunk(row, budget)
            if row.logits is not None:
                self._prefilling.pop(0)
                self._join(row)
        if self._rows:
            self._decode()

    # -- prefill --------------------------------------------------------------------------------

    def _boundaries(self, row: _Row) -> list[int]:
        """Prompt lengths past `row.done` whose state goes into the prefix cache: every
        PREFILL_CHUNK tokens (so long prompts that share a beginning meet at the same lengths),
        the checkpoints (ends of chat turns) and the prompt's end; only the end without the cache."""
        n = len(row.request.prompt)
        cuts = {n}
        if self.prefix_cache is not None and self.prefix_cache.max_bytes:
            cuts.update(range(PREFILL_CHUNK, n, PREFILL_CHUNK))
            cuts.update(c for c in row.request.checkpoints if isinstance(c, int) and 0 < c < n)
        return sorted(c for c in cuts if c > row.done)

    def _prefill_chunk(self, row: _Row, budget: int | None) -> int | None:
        """Read the next chunk of `row`'s prompt (starting with a prefix-cache lookup); returns
        the budget left. Sets `row.logits` once the whole prompt has been read.

        A chunk is up to PREFILL_CHUNK tokens from where the row stands, ending at a boundary;
        the boundaries inside it are kept from the same forward pass (`Cache.marks`), so a
        follow-up turn that resumes a few tokens before a turn's end and the prompt's end reads
        its new tokens in one pass, not one per boundary."""
        request, pc = row.request, self.prefix_cache
        prompt = list(request.prompt)
        key = _cache_key(request)
        if key is None:
            pc = None  # placeholder ids with no name for their content: a state under them may hold other images
        if row.cache is None:
            room = 0 if request.constraint is None else request.constraint.look_ahead_room()
            row.cache = self.model.make_cache(1, len(prompt) + room)
            entry = pc.lookup(key) if pc is not None and request.prompt_logprobs is None else None
            if entry is not None:
                pc.restore(entry, row.cache)
                row.done = row.cached = len(entry.key)
                if row.done == len(prompt):
                    row.logits = entry.logits.to(self.device)[None].clone()
                    return budget
        bounds = [b for b in self._boundaries(row) if b <= row.done + PREFILL_CHUNK]
        cut = bounds[-1] if bounds else row.done + PREFILL_CHUNK
        inner = bounds[:-1] if pc is not None and pc.max_bytes else []
        ids = torch.tensor([prompt[row.done : cut]], device=self.device)
        want_prompt = request.prompt_logprobs is not None
        extra = {} if request.embed is None else {"inputs_embeds": request.embed(row.done, cut)}
        row.cache.marks = tuple(b - row.done for b in inner)
        try:
            logits = self.model(ids, row.cache, last_only=not want_prompt, **extra)[0]  # (1 or T, V)
        finally:
            row.cache.marks, marked = (), row.cache.marked
            row.cache.marked = {}
        self.prefill_chunks += 1
        if want_prompt:
            self._prompt_logprobs(row, logits, prompt, cut)
        last = logits[-1:]
        row.last_logits = last
        if pc is not None and pc.max_bytes:
            if marked.keys() == row.cache.conv.keys():  # every conv layer kept its states (else keep none)
                for j, b in enumerate(inner):
                    pc.store(key[:b], row.cache, end=b, conv={i: states[j][0] for i, states in marked.items()})
            pc.store(key[:cut], row.cache, logits=last[0] if cut == len(prompt) else None)
        row.done = cut
        if cut == len(prompt):
            row.logits = last
        return None if budget is None else budget - ids.shape[1]

    def _prompt_logprobs(self, row: _Row, logits: torch.Tensor, prompt: list[int], end: int) -> None:
        """Logprobs of prompt[start .. end) for a chunk read from `start` (its logits predict the
        tokens after each of its own; the chunk's first token was predicted by the chunk before)."""
        request, start = row.request, row.done
        if start == 0:
            request.prompt_token_logprobs.append(None)
        else:
            target = torch.tensor([prompt[start]], device=logits.device)
            request.prompt_token_logprobs.extend(_logprobs(row.last_logits, target, request.prompt_logprobs))
        if end - start > 1:
            targets = torch.tensor(prompt[start + 1 : end], device=logits.device)
            request.prompt_token_logprobs.extend(_logprobs(logits[:-1], targets, request.prompt_logprobs))

    def _join(self, row: _Row) -> None:
        """A prefilled row: its first token from the prefill logits, then into the batch cache."""
        cache = self._cache
        self._look_ahead(row.logits, [row], row.cache)
        token = self._sample(row.logits, [row])
        n = len(self._rows)
        length = row.cache.length
        if n == 0:
            cache.length = length  # every row is clear: start the slot counter afresh
        elif cache.length < length:
            cache.shift(length - cache.length)
            self.shifts += 1
        cache.put_row(n, row.cache, 0)
        row.cache = None
        self._rows.append(row)
        self._deliver(range(n, n + 1), token)

    # -- decode ---------------------------------------------------------------------------------

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
        step = getattr(self.model, "decode_step", None) or self.model  # lfm2.compile's compiled step
        for row in self._rows:  # processors that can, compute their next mask while the model runs
            prepare = getattr(row.request.constraint, "prepare", None)
            if prepare is not None:
                prepare()
        logits = step(last, view)[:, -1]
        cache.length = view.length
        self.steps += 1
        self._look_ahead(logits, self._rows, view)
        self._deliver(range(n), self._sample(logits, self._rows))

    def _look_ahead(self, logits: torch.Tensor, rows: list[_Row], cache: Cache) -> None:
        """Let the processors that want to look ahead (tool names chosen whole) do so."""
        run_look_ahead(self.model, cache, logits, [row.request.constraint for row in rows],
                       [row.request.params for row in rows], [row.generator for row in rows])

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> list[int | None]:
        """One token per row of `logits` (n, V), each row with its own parameters.

        A row whose sampling fails (e.g. extreme parameters that overflow to NaN) gets None and
        ends with an error; its neighbours carry on.
        """
        out: list[int | None] = [0] * len(rows)
        masks = [None if row.request.constraint is None else row.request.constraint.mask() for row in rows]
        plain = [i for i, row in enumerate(rows)
                 if row.request.params.greedy and row.history is None and masks[i] is None]
        if len(plain) == 1:  # one greedy row (single-stream decode): no index tensor, no gather
            out[plain[0]] = int(logits[plain[0]].argmax())
        elif plain:
            index = torch.tensor(plain, device=logits.device)
            for i, token in zip(plain, logits.index_select(0, index).argmax(dim=-1).tolist(), strict=True):
                out[i] = token
        plain_set = set(plain)
        # The other rows in groups that share their parameters (seeds aside) and have no mask: each group
        # filtered in one call (16 rows with the model card's settings: one pass over (16, V) instead of 16),
        # then each row drawn with its own generator.
        groups: dict[Any, list[int]] = {}
        for i, row in enumerate(rows):
            if i not in plain_set:
                key = dataclasses.replace(row.request.params, seed=None) if masks[i] is None else i
                groups.setdefault(key, []).append(i)
        for members in groups.values():
            params = rows[members[0]].request.params
            try:
                if len(members) == 1:
                    block, history = logits[members[0] : members[0] + 1], rows[members[0]].history
                    if masks[members[0]] is not None:
                        block = _apply_mask(block, masks[members[0]])
                else:
                    block = logits.index_select(0, torch.tensor(members, device=logits.device))
                    history = _stack_histories([rows[i].history for i in members], params)
                if params.greedy:
                    tokens = process_logits(block, params, history).argmax(dim=-1).tolist()
                else:
                    probs = filtered_probs(block, params, history)
            except Exception as exc:
                for i in members:
                    self._sampling_failed(rows[i], exc)
                    out[i] = None
                continue
            for j, i in enumerate(members):
                try:
                    out[i] = tokens[j] if params.greedy else int(draw(probs[j : j + 1], rows[i].generator))
                except Exception as exc:
                    self._sampling_failed(rows[i], exc)
                    out[i] = None
        for i, (token, row) in enumerate(zip(out, rows, strict=True)):
            if token is None:
                continue
            if row.request.constraint is not None:
                row.request.constraint.advance(token)
            if row.request.logprobs is not None:
                target = torch.tensor([token], device=logits.device)
                row.request.token_logprobs.extend(_logprobs(logits[i : i + 1], target, row.request.logprobs))
        return out

    @staticmethod
    def _sampling_failed(row: _Row, exc: Exception) -> None:
        log.warning("sampling failed for one request (%s: %s); ending it", type(exc).__name__, exc)
        row.finish, row.error = "error", f"sampling failed: {type(exc).__name__}: {exc}"

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
            row.tokens.append(token)
            if len(row.tokens) == 1:
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
            if row.finish is None and len(row.tokens) >= request.max_new_tokens:
                row.finish = "length"
            if row.finish is None:
                row.last = token
                if row.history is not None:
                    row.history.update(torch.tensor([token], device=self.device))
            else:
                done.append(i)
        self._retire(done)

    def _retire(self, indices: list[int], reason: str | None = None) -> None:
        """Free the rows at `indices`, keeping the active rows packed at the top of the cache.
        A row that finished normally leaves its state (prompt and reply read) in the prefix cache."""
        cache = self._cache
        for i in sorted(indices, reverse=True):
            row = self._rows[i]
            prompt = _cache_key(row.request)
            if (reason is None and row.finish in ("stop", "length") and self.prefix_cache is not None
                    and prompt is not None):
                key = prompt + row.tokens[:-1]  # the last token was never fed
                if int(cache.positions[i]) == len(key):
                    self.prefix_cache.store(key, cache, row=i)
            last = len(self._rows) - 1
            if i != last:  # move the last row into the hole
                cache.put_row(i, cache, last)
                self._rows[i] = self._rows[last]
            cache.clear_row(last)
            self._rows.pop()
            self._finish(row.request, reason or row.finish or "stop", len(row.tokens), row.error, row.cached)
        if not self._rows:
            cache.length = 0

    def _fail_all(self, message: str) -> None:
        rows = self._rows + self._prefilling
        self._rows, self._prefilling = [], []
        self._cache = self.model.make_cache(self.max_batch, self.max_len)
        for row in rows:
            self._finish(row.request, "error", 0, message)

    def _finish(self, request: Request, reason: str, generated: int, error: str | None = None,
                cached: int = 0) -> None:
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
            cached_tokens=cached,
        )
        request.result = result
        try:
            request.on_finish(result)
        except Exception:
            log.exception("on_finish failed")


def run_look_ahead(model: Lfm2ForCausalLM, cache: Cache, logits: torch.Tensor, processors: Sequence[Any],
                   params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]) -> None:
    """Run the look-ahead of every row whose processor wants one now (`look_ahead_room() > 0`).

    Each kind of processor's static `look_ahead` gets the rows of its own kind (the others None),
    so rows with different processors (a wrapper such as `lfm2.reasoning.AfterReasoning` beside a
    bare tool-call constraint) share a batch.
    """
    groups: dict[Any, list[Any]] = {}
    for i, p in enumerate(processors):
        if p is not None and p.look_ahead_room() > 0:
            groups.setdefault(type(p).look_ahead, [None] * len(processors))[i] = p
    for look_ahead, rows in groups.items():
        look_ahead(model, cache, logits, rows, params, generators)


def _stack_histories(histories: list[TokenHistory | None], params: SamplingParams) -> Any:
    """The penalty histories of rows filtered together, as one (n, V) history: only what `params` reads."""
    if not params.needs_history:
        return None
    penalties = params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
    return types.SimpleNamespace(
        seen=torch.cat([h.seen for h in histories]) if params.repetition_penalty != 1.0 else None,
        counts=torch.cat([h.counts for h in histories]) if penalties else None)


def _apply_mask(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """`logits` (1, V) with the tokens `allowed` (V,) forbids at -inf (and any beyond its length)."""
    out = logits.clone()
    allowed = allowed.to(logits.device)
    V = min(out.shape[-1], allowed.shape[0])
    out[0, :V].masked_fill_(~allowed[:V], float("-inf"))
    out[0, V:] = float("-inf")
    return out


def _logprobs(logits: torch.Tensor, targets: torch.Tensor, top: int) -> list[TokenLogprob]:
    """Per row of `logits` (N, V): the log-probability of `targets[i]` and the `top` best tokens."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, targets[:, None])[:, 0].tolist()
    if top:
        values, ids = lp.topk(top, dim=-1)
        tops = [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
    else:
        tops = [[] for _ in chosen]
    return [TokenLogprob(t, c, k) for t, c, k in zip(targets.tolist(), chosen, tops, strict=True)]
