"""Exact prefix reuse (`lfm2.prefix_cache`) through the engine: logits after resuming from a stored
prefix equal a full prefill within float rounding, for dense and MoE models, with concurrent requests
sharing prefixes, and after eviction; and the reuse reaches `LLM.chat` across calls.

References are full prefills of the whole prompt on a fresh cache (`full_logprobs`), never the
engine; comparisons are of log-probabilities (1e-5), which is what the engine reports.
"""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import random_model, solo_decode, tiny_config

import lfm2
from lfm2.engine import Engine, Request
from lfm2.prefix_cache import PrefixCache
from lfm2.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0)
MOE = dict(model_type="lfm2_moe", num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32,
           num_dense_layers=1, intermediate_size=80)
TOL = 1e-5  # absolute, plus 1e-6 relative: logprobs near -30 differ by a few float32 ulps


@pytest.fixture(scope="module", params=["dense", "moe"])
def model(request):
    return random_model(tiny_config(**(MOE if request.param == "moe" else {})), seed=3)


@torch.inference_mode()
def full_logprobs(model, prompt: list[int]) -> torch.Tensor:
    """log_softmax of the next-token logits after a single full prefill of `prompt`."""
    cache = model.make_cache(1, len(prompt))
    return torch.log_softmax(model(torch.tensor([prompt]), cache, last_only=True)[0, -1].float(), dim=-1)


def first_token(engine: Engine, prompt: list[int], checkpoints=()) -> Request:
    """Run one request for a single token with 20 logprobs; returns it (with its result)."""
    request = Request(prompt, GREEDY, 1, logprobs=20, checkpoints=checkpoints)
    for _ in engine.run([request]):
        pass
    return request


def assert_matches_full(model, request: Request) -> None:
    ref = full_logprobs(model, list(request.prompt))
    got = request.token_logprobs[0]
    assert got.token == int(ref.argmax())
    ids = torch.tensor([t for t, _ in got.top])
    torch.testing.assert_close(torch.tensor([lp for _, lp in got.top]), ref[ids], atol=TOL, rtol=1e-6)
    assert abs(got.logprob - float(ref[got.token])) < TOL


def prompt_of(seed: int, n: int) -> list[int]:
    return torch.randint(1, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_resumed_prefill_equals_a_full_one(model):
    """A long shared prefix (split at a checkpoint and at chunk ends) then different tails."""
    pc = PrefixCache()
    engine = Engine(model, max_batch=2, max_len=200, prefix_cache=pc)
    system = prompt_of(1, 90)
    first = first_token(engine, system + prompt_of(2, 20), checkpoints=[60, 90])
    assert first.result.cached_tokens == 0 and pc.misses == 1
    assert_matches_full(model, first)
    for seed in (3, 4):
        again = first_token(engine, system + prompt_of(seed, 15))
        assert again.result.cached_tokens == 90  # resumed from the checkpoint at the end of the shared part
        assert_matches_full(model, again)
    partial = first_token(engine, system[:75] + prompt_of(5, 5))
    assert partial.result.cached_tokens == 60
    assert_matches_full(model, partial)
    same = first_token(engine, system + prompt_of(2, 20))  # the whole prompt: its stored logits, no forward
    assert same.result.cached_tokens == 110
    assert_matches_full(model, same)


def test_a_follow_up_resumes_after_the_reply(model):
    """The state a finished request reached (prompt + reply) is kept: a next turn that repeats the reply
    prefills only its own tokens, with the logits of a full prefill."""
    pc = PrefixCache()
    engine = Engine(model, max_batch=1, max_len=200, prefix_cache=pc)
    prompt = prompt_of(6, 40)
    reply: list[int] = []
    request = Request(prompt, GREEDY, 12, on_token=lambda t: reply.append(t) or False, ignore_eos=True)
    for _ in engine.run([request]):
        pass
    assert reply == solo_decode(model, prompt, GREEDY, 12, ignore_eos=True)
    chunks = engine.prefill_chunks
    follow = first_token(engine, prompt + reply + prompt_of(7, 6))
    assert follow.result.cached_tokens == 40 + 11  # the last reply token was never fed
    assert engine.prefill_chunks == chunks + 1  # one chunk: the 7 new tokens
    assert_matches_full(model, follow)


def test_boundaries_inside_a_chunk_cost_no_extra_forward_pass(model, monkeypatch):
    """A follow-up whose new tokens cross turn ends and a PREFILL_CHUNK multiple reads them in one
    forward pass; the states kept at those boundaries (conv states taken inside the pass,
    `Cache.marks`) resume exactly, the first one a single token past the resumed prefix."""
    import lfm2.engine as engine_module

    monkeypatch.setattr(engine_module, "PREFILL_CHUNK", 32)
    pc = PrefixCache()
    engine = Engine(model, max_batch=1, max_len=200, prefix_cache=pc)
    base = prompt_of(50, 28)
    first_token(engine, base)
    chunks = engine.prefill_chunks
    prompt = base + prompt_of(51, 12)  # 40 tokens: past the chunk multiple 32
    follow = first_token(engine, prompt, checkpoints=[29, 35])
    assert follow.result.cached_tokens == 28
    assert engine.prefill_chunks == chunks + 1
    assert_matches_full(model, follow)
    for n in (29, 32, 35):
        resumed = first_token(engine, prompt[:n] + prompt_of(60 + n, 4))
        assert resumed.result.cached_tokens == n
        assert_matches_full(model, resumed)


def test_concurrent_requests_sharing_prefixes_get_their_solo_tokens(model):
    """Requests with a shared system prompt, decoded together in the engine's thread, each get the
    tokens of a solo run (greedy, where the fixture's margins are far above rounding)."""
    pc = PrefixCache()
    system = prompt_of(8, 70)
    prompts = [system + prompt_of(10 + i, 5 + 3 * i) for i in range(6)]
    refs = [solo_decode(model, p, GREEDY, 10, ignore_eos=True) for p in prompts]
    got: list[list[int]] = [[] for _ in prompts]
    done = threading.Semaphore(0)
    with Engine(model, max_batch=3, max_queue=8, max_len=200, prefix_cache=pc) as engine:
        for i, p in enumerate(prompts):
            engine.submit(Request(p, GREEDY, 10, on_token=lambda t, i=i: got[i].append(t) or False,
                                  on_finish=lambda r: done.release(), ignore_eos=True, checkpoints=[70]))
        for _ in prompts:
            assert done.acquire(timeout=60)
    assert got == refs
    assert pc.hits >= 5 and pc.hit_tokens >= 5 * 70


def test_eviction_keeps_results_exact_and_memory_bounded(model):
    """A cache too small for everything evicts least recently used leaves; whatever it resumes from
    is still exact, and its bytes never pass the bound."""
    probe = PrefixCache()
    first_token(Engine(model, max_batch=1, max_len=200, prefix_cache=probe), prompt_of(20, 60))
    bound = probe.bytes * 2  # room for about two prompts' states
    pc = PrefixCache(bound)
    engine = Engine(model, max_batch=1, max_len=200, prefix_cache=pc)
    prompts = [prompt_of(30 + i, 50) + prompt_of(40 + i, 10) for i in range(5)]
    for p in prompts:
        first_token(engine, p, checkpoints=[50])
        assert pc.bytes <= bound
    assert pc.evictions > 0
    for p in prompts[::-1]:  # early ones were evicted (a miss), late ones resume
        assert_matches_full(model, first_token(engine, p[:50] + prompt_of(99, 4)))
        assert pc.bytes <= bound
    assert pc.hits > 0


def test_llm_chat_prefills_only_the_new_turn(chat_checkpoint):
    llm = lfm2.load(chat_checkpoint)
    convo = [{"role": "system", "content": "You are terse. " * 20}, {"role": "user", "content": "Hi there"}]
    reply = llm.chat(convo, temperature=0, max_new_tokens=8)
    first = llm.last_stats[0]
    assert first.cached_tokens == 0
    convo += [reply, {"role": "user", "content": "And then?"}]
    llm.chat(convo, temperature=0, max_new_tokens=8)
    second = llm.last_stats[0]
    assert second.cached_tokens >= first.prompt_tokens  # the first turn's prompt at least
    off = lfm2.load(chat_checkpoint)
    off.prefix_cache = PrefixCache(0)
    assert off.chat(convo, temperature=0, max_new_tokens=8) == llm.chat(convo, temperature=0, max_new_tokens=8)
    assert off.last_stats[0].cached_tokens == 0


def test_n_choices_share_one_prefill(chat_checkpoint):
    llm = lfm2.load(chat_checkpoint)
    outs = llm.generate("Once upon a time", n=3, temperature=1.0, seed=5, max_new_tokens=8)
    assert len(outs) == 3 and all(isinstance(o, str) for o in outs)
    assert [s.cached_tokens for s in llm.last_stats][1:] == [llm.last_stats[0].prompt_tokens] * 2
    assert len({o for o in outs}) > 1  # rows sample with their own generators


def test_bundled_model_chat_resumes_after_its_reply():
    """On a trained model, whose reply text tokenizes back to the tokens it generated, the next turn
    resumes after the reply: only the end-of-turn marker and the new user turn are prefilled."""
    llm = lfm2.load()
    convo = [{"role": "user", "content": "Hello!"}]
    reply = llm.chat(convo, temperature=0, max_new_tokens=40)
    first = llm.last_stats[0]
    assert first.finish_reason == "stop"
    convo += [reply, {"role": "user", "content": "What color is snow?"}]
    llm.chat(convo, temperature=0, max_new_tokens=8)
    second = llm.last_stats[0]
    new_turn = llm.tokenizer.encode("<|im_end|>\n<|im_start|>user\nWhat color is snow?<|im_end|>\n"
                                    "<|im_start|>assistant\n", add_special_tokens=False)
    assert second.cached_tokens == first.prompt_tokens + first.completion_tokens - 1
    assert second.prompt_tokens - second.cached_tokens == len(new_turn)
