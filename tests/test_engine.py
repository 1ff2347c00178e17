"""The engine (continuous batching, chunked prefill, prefix reuse) and the cache methods it relies on.

Reference outputs come from `conftest.solo_decode`, the plainest decode loop, run on one prompt at
a time: the engine must give every request exactly those tokens however requests join, leave and
share the batch. Greedy comparisons are only meaningful where top-1 margins are
far above float rounding; `greedy_path` measures them and the tests assert they are (see
docs/testing.md).
"""

from __future__ import annotations

import itertools
import threading
import time

import pytest
import torch

import lfm2
from lfm2.engine import Engine, Request
from lfm2.errors import GenerationError, SchedulerBusy
from lfm2.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0)
ROUNDING = 5e-6  # bound on |batched - alone| logits (float32 rounding; measured ~7e-7 on this fixture)
MARGIN = 20 * ROUNDING  # a top-1 margin this large cannot be flipped by rounding


@pytest.fixture(scope="module")
def llm(chat_checkpoint):
    return lfm2.load(chat_checkpoint)


def prompts_for(llm, n: int) -> list[list[int]]:
    """n prompts of different lengths (4 to ~60 tokens) and content."""
    words = "the quick brown fox jumps over a lazy dog while numbers 12345 and emoji appear".split()
    return [
        llm.tokenizer.encode(f"{i}: " + " ".join(words[(i * 7 + j) % len(words)] for j in range(2 + 3 * i)),
                             add_special_tokens=True)
        for i in range(n)
    ]


@torch.inference_mode()
def greedy_path(model, prompt: list[int], steps: int) -> tuple[list[int], float]:
    """Greedy tokens (no stop ids) and the smallest top-1 minus top-2 logit margin along the way."""
    cache = model.make_cache(1, len(prompt) + steps)
    logits = model(torch.tensor([prompt]), cache, last_only=True)[:, -1]
    tokens, margin = [], float("inf")
    for _ in range(steps):
        top = logits.topk(2).values[0]
        margin = min(margin, float(top[0] - top[1]))
        tokens.append(int(logits.argmax()))
        logits = model(torch.tensor([[tokens[-1]]]), cache)[:, -1]
    return tokens, margin


def alone(llm, prompt, params=GREEDY, max_new_tokens=20, stop_ids=frozenset()) -> list[int]:
    from conftest import solo_decode

    return solo_decode(llm.model, prompt, params, max_new_tokens, stop_ids)


class Collector:
    """Submits requests and gathers their tokens and results; `wait()` blocks until all finished."""

    def __init__(self, scheduler: Engine) -> None:
        self.scheduler = scheduler
        self.tokens: list[list[int]] = []
        self.results: list = []
        self.done = threading.Semaphore(0)

    def submit(self, prompt, params=GREEDY, max_new_tokens=20, **kw) -> Request:
        i = len(self.tokens)
        self.tokens.append([])
        self.results.append(None)

        def on_token(token):
            self.tokens[i].append(token)
            return False

        def on_finish(result):
            self.results[i] = result
            self.done.release()

        return self.scheduler.submit(Request(prompt, params, max_new_tokens, on_token, on_finish, **kw))

    def wait(self, n: int | None = None, timeout: float = 60.0) -> None:
        for _ in range(len(self.tokens) if n is None else n):
            assert self.done.acquire(timeout=timeout), "a request never finished"


# -- cache methods ----------------------------------------------------------------------------


@torch.inference_mode()
def test_put_row_joins_a_running_batch_at_the_shared_slot(llm):
    """A sequence prefilled alone, copied into a batch whose counter is further on, decodes as alone."""
    model = llm.model
    a, b = prompts_for(llm, 6)[5], prompts_for(llm, 2)[1]
    batch = model.make_cache(3, 128)
    model(torch.tensor([a, a, a]), batch)  # rows advance to len(a) slots
    solo = model.make_cache(1, 64)
    first = model(torch.tensor([b]), solo, last_only=True)[:, -1]
    batch.put_row(1, solo, 0)
    assert batch.valid[1].sum() == len(b) and batch.valid[1, batch.length - len(b) : batch.length].all()
    assert int(batch.positions[1]) == len(b)
    nxt = first.argmax(-1)
    got = model(torch.tensor([[7], [int(nxt)], [7]]), batch)[:, -1]
    want = model(nxt[:, None], solo)[:, -1]
    torch.testing.assert_close(got[1:2], want, atol=ROUNDING, rtol=0)
    with pytest.raises(ValueError, match="shift"):
        model.make_cache(1, 64).put_row(0, solo, 0)  # a target with fewer filled slots than the source


@torch.inference_mode()
def test_shift_and_narrow_change_no_output(llm):
    model = llm.model
    p = prompts_for(llm, 4)
    ids = torch.tensor([p[3][-8:], p[2][-8:]])
    ref, moved = model.make_cache(2, 64), model.make_cache(4, 64)
    model(ids, ref)
    model(ids, moved.narrow(2))
    moved.length = 8
    moved.shift(+5)  # room in front, as for a longer newcomer
    assert moved.length == 13 and moved.leading_free_slots() == 5
    step = torch.tensor([[3], [4]])
    view = moved.narrow(2)
    torch.testing.assert_close(model(step, view), model(step, ref), atol=ROUNDING, rtol=0)
    moved.length = view.length
    moved.shift(-5)  # and reclaim it
    assert moved.length == 9 and moved.leading_free_slots() == 0
    view = moved.narrow(2)
    torch.testing.assert_close(model(step, view), model(step, ref), atol=ROUNDING, rtol=0)
    with pytest.raises(ValueError, match="leading slots"):
        moved.shift(-1)
    with pytest.raises(ValueError, match="max_len"):
        moved.shift(64)


def test_clear_row_and_leading_free_slots(llm):
    cache = llm.model.make_cache(2, 16)
    cache.reserve(torch.tensor([[False, True, True], [False, False, True]]))
    assert cache.leading_free_slots() == 1
    cache.clear_row(0)
    assert cache.leading_free_slots() == 2 and int(cache.positions[0]) == 0 and not cache.valid[0].any()
    assert all(not s[0].any() for s in cache.conv.values())
    cache.clear_row(1)
    assert cache.leading_free_slots() == cache.length == 3


def _rss() -> int | None:
    try:
        with open("/proc/self/status") as f:
            return int(f.read().split("VmRSS:")[1].split()[0]) * 1024
    except (OSError, IndexError):
        return None


def test_a_large_cache_is_resident_only_where_written(llm):
    """A server's cache (16 rows x 4096 slots by default; here 128 x 512, the fixture's context) costs the slots
    its requests use, not its whole size: its K/V come zero from the system a page at a time
    (`lfm2.cache.lazy_zeros`), and decode the same tokens."""
    before = _rss()
    cache = llm.model.make_cache(128, 512)
    nominal = sum(t.nbytes for t in [*cache.keys.values(), *cache.values.values()])
    if before is not None:
        assert _rss() - before < nominal // 8
    assert nominal >= 16 * 2**20 and not any(t.any() for t in cache.keys.values())
    prompt = prompts_for(llm, 3)[2]
    want = list(Engine(llm.model, max_batch=1, max_len=64).generate([prompt], GREEDY, 12, ignore_eos=True))
    assert list(Engine(llm.model, max_batch=128, max_len=512).generate([prompt], GREEDY, 12, ignore_eos=True)) == want


# -- scheduler ----------------------------------------------------------------------------------


def test_requests_joining_and_leaving_get_their_solo_tokens(llm):
    """More requests than rows, joining a running batch at different slots, through both kinds of shift.

    A short prompt starts the batch, so the longer ones that join next move it right
    (`shifts`); max_len leaves no spare slot, so the batch, kept busy by a slowed model, must
    reclaim the slots of finished rows to go on (`compactions`).
    """
    prompts = prompts_for(llm, 12)
    lengths = [8 + 3 * (i % 5) for i in range(12)]
    order = [0, *range(11, 0, -1)]
    refs = []
    for p, n in zip(prompts, lengths, strict=True):
        tokens, margin = greedy_path(llm.model, p, n)
        assert margin > MARGIN, f"fixture margin {margin:.2e} too small for a greedy comparison"
        refs.append(alone(llm, p, max_new_tokens=n))
        assert refs[-1] == tokens  # the two solo engines agree
    assert len({t for r in refs for t in r}) > 30, "degenerate fixture: outputs are not diverse"
    max_len = max(len(p) + n for p, n in zip(prompts, lengths, strict=True))
    slow = llm.model.register_forward_hook(lambda *a: time.sleep(0.002))
    try:
        with Engine(llm.model, max_batch=5, max_queue=12, max_len=max_len) as sched:
            c = Collector(sched)
            for k, i in enumerate(order):
                c.submit(prompts[i], max_new_tokens=lengths[i])
                while k == 0 and not c.tokens[0]:  # the short one is running before the others arrive
                    time.sleep(0.001)
                if k % 4 == 3:
                    time.sleep(0.01)
            c.wait()
    finally:
        slow.remove()
    assert c.tokens == [refs[i] for i in order]
    assert [r.finish_reason for r in c.results] == ["length"] * 12
    assert [r.completion_tokens for r in c.results] == [lengths[i] for i in order]
    assert sched.shifts >= 1 and sched.compactions >= 1, (sched.shifts, sched.compactions)
    assert sched.steps < sum(lengths) / 2  # rows shared steps
    assert sched.active == 0 and sched.queued == 0


def test_per_row_sampling_params_and_seeds(llm):
    """Each row samples with its own params and generator: batched equals alone, seed for seed."""
    p = prompts_for(llm, 3)
    hot = SamplingParams(temperature=1.5, top_k=50, top_p=0.95, seed=7)
    penal = SamplingParams(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.5)
    with Engine(llm.model, max_batch=4) as sched:
        c = Collector(sched)
        c.submit(p[0], hot)
        c.submit(p[1], penal)
        c.submit(p[2], GREEDY)
        c.wait()
    assert c.tokens == [alone(llm, p[0], hot), alone(llm, p[1], penal), alone(llm, p[2])]
    assert c.tokens[0] != alone(llm, p[0], SamplingParams(temperature=1.5, top_k=50, top_p=0.95, seed=8))


def test_rows_that_share_parameters_are_filtered_together_and_equal_alone(llm, monkeypatch):
    """Rows whose parameters differ only in their seed are filtered in one call, penalty histories stacked,
    then drawn each with its own generator: batched equals alone, seed for seed."""
    import lfm2.engine as engine_module

    calls = []
    real = engine_module.filtered_probs
    monkeypatch.setattr(engine_module, "filtered_probs",
                        lambda logits, *a: calls.append(len(logits)) or real(logits, *a))
    p = prompts_for(llm, 4)
    card = [SamplingParams(temperature=0.8, min_p=0.05, repetition_penalty=1.3, presence_penalty=0.5, seed=s)
            for s in (1, 2, 3)]
    with Engine(llm.model, max_batch=4) as sched:
        c = Collector(sched)
        for prompt, params in zip(p, card, strict=False):
            c.submit(prompt, params, max_new_tokens=12)
        c.submit(p[3], SamplingParams(temperature=0.8, seed=4), max_new_tokens=12)
        c.wait()
    assert max(calls) == 3  # the three rows of one kind, together
    monkeypatch.setattr(engine_module, "filtered_probs", real)
    assert c.tokens == [*(alone(llm, prompt, params, max_new_tokens=12) for prompt, params in zip(p, card,
                                                                                                 strict=False)),
                        alone(llm, p[3], SamplingParams(temperature=0.8, seed=4), max_new_tokens=12)]
    assert len({tuple(t) for t in c.tokens}) == 4


def test_stop_ids_on_token_stop_and_ignore_eos(llm):
    p = prompts_for(llm, 1)[0]
    ref = alone(llm, p, max_new_tokens=10)
    with Engine(llm.model, max_batch=2) as sched:
        c = Collector(sched)
        c.submit(p, max_new_tokens=10, stop_ids=frozenset({ref[3]}))
        c.submit(p, max_new_tokens=10, stop_ids=frozenset({ref[3]}), ignore_eos=True)
        c.wait()
        seen, ended = [], threading.Event()

        def stop_at_second(token):  # what a stop string does: the consumer says "enough"
            seen.append(token)
            return len(seen) == 2

        results = []
        sched.submit(Request(p, GREEDY, 10, stop_at_second, lambda r: results.append(r) or ended.set()))
        assert ended.wait(10)
    first_stop = ref.index(ref[3])
    assert c.tokens[0] == ref[:first_stop] and c.results[0].finish_reason == "stop"
    assert c.results[0].completion_tokens == first_stop + 1  # the stop id counts as generated
    assert c.tokens[1] == ref and c.results[1].finish_reason == "length"
    assert seen == ref[:2] and results[0].finish_reason == "stop" and results[0].completion_tokens == 2


def test_cancel_frees_the_row_for_the_next_request(llm):
    """With one row, a cancelled long request must let the waiting one in long before it would end."""
    slow = llm.model.register_forward_hook(lambda *a: time.sleep(0.01))
    try:
        with Engine(llm.model, max_batch=1, max_queue=1) as sched:
            c = Collector(sched)
            long = c.submit(prompts_for(llm, 1)[0], max_new_tokens=400)  # ~4 s if left alone
            while len(c.tokens[0]) < 3:
                time.sleep(0.005)
            c.submit(prompts_for(llm, 2)[1], max_new_tokens=5)
            with pytest.raises(SchedulerBusy, match="busy"):
                c.submit(prompts_for(llm, 2)[1], max_new_tokens=5)
            t0 = time.perf_counter()
            sched.cancel(long)
            c.wait(2, timeout=10)
            waited = time.perf_counter() - t0
    finally:
        slow.remove()
    assert c.results[0].finish_reason == "cancelled" and c.results[0].completion_tokens < 50
    assert c.results[1].finish_reason == "length"
    assert c.tokens[1] == alone(llm, prompts_for(llm, 2)[1], max_new_tokens=5)
    assert waited < 1.0


def test_cancel_while_waiting_and_close(llm):
    with Engine(llm.model, max_batch=1, max_queue=4) as sched:
        c = Collector(sched)
        c.submit(prompts_for(llm, 1)[0], max_new_tokens=200)
        queued = c.submit(prompts_for(llm, 1)[0], max_new_tokens=5)
        sched.cancel(queued)
        c.submit(prompts_for(llm, 1)[0], max_new_tokens=300)
    c.wait()  # close() ends whatever is left
    assert c.results[1].finish_reason == "cancelled" and c.results[1].completion_tokens == 0
    assert {r.finish_reason for r in c.results} <= {"cancelled", "length"}
    assert sched.active == 0 and sched.queued == 0


def test_bad_requests_are_refused_at_submit(llm):
    with Engine(llm.model, max_batch=1, max_len=64) as sched:
        with pytest.raises(GenerationError, match="exceeds the context of 64"):
            sched.submit(Request([1] * 60, GREEDY, 5))
        with pytest.raises(GenerationError, match="empty"):
            sched.submit(Request([], GREEDY, 5))
        with pytest.raises(GenerationError, match="outside the vocabulary"):
            sched.submit(Request([1, 10**6], GREEDY, 5))
        with pytest.raises(GenerationError, match="max_new_tokens"):
            sched.submit(Request([1], GREEDY, 0))
    with pytest.raises(GenerationError, match="max_len"):
        Engine(llm.model, max_len=10**9)


def test_an_engine_failure_ends_the_batch_and_the_scheduler_keeps_serving(llm):
    calls = []

    def explode(module, args):
        calls.append(1)
        if len(calls) == 2:  # the first decode step of the first request
            raise RuntimeError("injected failure")

    hook = llm.model.register_forward_pre_hook(explode)
    try:
        with Engine(llm.model, max_batch=2) as sched:
            c = Collector(sched)
            c.submit(prompts_for(llm, 1)[0], max_new_tokens=5)
            c.wait()
            c.submit(prompts_for(llm, 1)[0], max_new_tokens=5)
            c.wait(1)
    finally:
        hook.remove()
    assert c.results[0].finish_reason == "error" and "injected failure" in c.results[0].error
    assert c.results[1].finish_reason == "length"
    assert c.tokens[1] == alone(llm, prompts_for(llm, 1)[0], max_new_tokens=5)


def test_the_compiled_step_is_built_before_a_first_token(llm, monkeypatch):
    """A decode step still to compile is compiled before the prompt's first token, not between the first and
    the second (where it stopped the stream for seconds, a minute the first time, and counted as decode time)."""
    import lfm2.engine as engine_module

    events = []
    monkeypatch.setattr(engine_module, "warm", lambda model, *rows: events.append(("warm", rows)))
    with Engine(llm.model, max_batch=2) as sched:
        c = Collector(sched)
        c.submit(prompts_for(llm, 1)[0], SamplingParams(temperature=0.0), max_new_tokens=3)
        c.wait()
    assert events and events[0] == ("warm", (1,))
    assert c.tokens[0] and len(events) == 1  # asked while prompts wait, not at every step


def test_a_row_whose_sampling_fails_ends_alone(llm, monkeypatch):
    import lfm2.engine as scheduler_module

    real = scheduler_module.draw

    def draw(probs, generator=None):  # the two rows share their parameters: filtered together, drawn apart
        if generator.initial_seed() == 666:
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        return real(probs, generator)

    monkeypatch.setattr(scheduler_module, "draw", draw)
    p = prompts_for(llm, 2)
    with Engine(llm.model, max_batch=2) as sched:
        c = Collector(sched)
        c.submit(p[0], SamplingParams(temperature=1.0, seed=666))
        c.submit(p[1], SamplingParams(temperature=1.0, seed=5))
        c.wait()
    assert c.results[0].finish_reason == "error" and "nan" in c.results[0].error and c.tokens[0] == []
    assert c.results[1].finish_reason == "length" and c.tokens[1] == alone(llm, p[1], SamplingParams(temperature=1.0,
                                                                                                      seed=5))


def test_a_long_prompt_is_prefilled_between_decode_steps(llm, monkeypatch):
    """While a stream is decoding, a newcomer's long prompt is read a chunk per step: the stream gets a
    token between every two chunks instead of waiting for the whole prefill; both get their solo tokens."""
    import lfm2.engine as engine_module

    monkeypatch.setattr(engine_module, "PREFILL_CHUNK", 16)
    short, long = prompts_for(llm, 2)[0], prompts_for(llm, 12)[11] * 2  # ~120 tokens: 8 chunks
    assert len(long) > 6 * 16
    events: list[str] = []
    hook = llm.model.register_forward_pre_hook(lambda m, args: events.append("prefill" if args[0].shape[1] > 1
                                                                              else "decode"))
    try:
        engine = Engine(llm.model, max_batch=2, max_len=200, max_prefill_tokens=16)
        tokens: list[list[int]] = [[], []]
        first = Request(short, GREEDY, 40, lambda t: tokens[0].append(t) or False)
        second = Request(long, GREEDY, 5, lambda t: tokens[1].append(t) or False)
        steps = engine.run([first])
        next(steps)  # the short one is decoding
        engine.submit(second)
        for _ in steps:
            if second.result is None and tokens[1] and len(tokens[0]) >= 40:
                break
        while second.result is None:
            engine.step()
    finally:
        hook.remove()
    chunks = [i for i, e in enumerate(events) if e == "prefill"][1:]  # the long prompt's
    assert len(chunks) >= 7
    assert all(b - a == 2 for a, b in itertools.pairwise(chunks)), events  # one decode step between chunks
    assert tokens == [alone(llm, short, max_new_tokens=40), alone(llm, long, max_new_tokens=5)]


def test_prompt_logprobs_across_prefill_chunks(llm, monkeypatch):
    """Prompt logprobs of a prompt read in several chunks equal those of one full forward pass."""
    import lfm2.engine as engine_module

    monkeypatch.setattr(engine_module, "PREFILL_CHUNK", 7)
    prompt = prompts_for(llm, 6)[5]
    assert len(prompt) > 3 * 7
    request = Request(prompt, GREEDY, 1, prompt_logprobs=2)
    for _ in Engine(llm.model, max_batch=1, max_len=100).run([request]):
        pass
    with torch.inference_mode():
        full = torch.log_softmax(llm.model(torch.tensor([prompt]))[0].float(), dim=-1)
    got = request.prompt_token_logprobs
    assert len(got) == len(prompt) and got[0] is None
    ref = [float(full[i - 1, prompt[i]]) for i in range(1, len(prompt))]
    assert [g.logprob for g in got[1:]] == pytest.approx(ref, abs=1e-4)
