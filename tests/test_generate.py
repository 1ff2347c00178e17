"""Generation: greedy parity with transformers' generate, streaming, stop strings, seeds, timing."""

from __future__ import annotations

import pytest
import torch

import lfm2
from lfm2.errors import GenerationError
from lfm2.generate import TextStream

transformers = pytest.importorskip("transformers")

PROMPTS = ["The quick brown", "Hello, how are you today? I am fine and the weather", "今天天气"]


@pytest.fixture(scope="module")
def llm(chat_checkpoint):
    return lfm2.load(chat_checkpoint)


@pytest.fixture(scope="module")
def hf(chat_checkpoint):
    model = transformers.AutoModelForCausalLM.from_pretrained(chat_checkpoint, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(chat_checkpoint)
    tok.padding_side = "left"
    return model, tok


def _hf_greedy(hf, prompts, n=48):
    model, tok = hf
    enc = tok(prompts, return_tensors="pt", padding=True)
    out = model.generate(**enc, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=tok.pad_token_id)
    return out[:, enc["input_ids"].shape[1] :].tolist()


def _our_greedy(llm, prompts, n=48):
    from conftest import engine_decode

    ids = [llm.tokenizer.encode(p, add_special_tokens=True) for p in prompts]
    params = llm.sampling_params(temperature=0, repetition_penalty=1.0)
    return engine_decode(llm.model, ids, params, n, llm.tokenizer.stop_ids, ignore_eos=True)


def test_greedy_matches_transformers_single(llm, hf):
    ours, theirs = _our_greedy(llm, PROMPTS[:1]), _hf_greedy(hf, PROMPTS[:1])
    assert len(ours[0]) == 48
    assert ours == theirs
    assert len(set(ours[0])) > 8  # the fixture does not just repeat a token


def test_greedy_matches_transformers_left_padded_batch(llm, hf):
    ours, theirs = _our_greedy(llm, PROMPTS), _hf_greedy(hf, PROMPTS)
    assert ours == theirs
    assert ours == [_our_greedy(llm, [p])[0] for p in PROMPTS]  # rows do not depend on neighbours


def test_repetition_penalty_matches_transformers(llm, hf):
    from conftest import engine_decode

    model, tok = hf
    prompt = PROMPTS[1]
    enc = tok([prompt], return_tensors="pt")
    ref = model.generate(**enc, do_sample=False, max_new_tokens=32, min_new_tokens=32, repetition_penalty=1.3)
    params = llm.sampling_params(temperature=0, repetition_penalty=1.3)
    ids = [llm.tokenizer.encode(prompt, add_special_tokens=True)]
    got = engine_decode(llm.model, ids, params, 32, ignore_eos=True)[0]
    assert got == ref[0, enc["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize("prompt", ["今天天气很好", "مرحبا بك", "Emoji 😀🎉", "Привет"])
def test_stream_equals_generate(llm, prompt):
    kw = dict(temperature=0.8, seed=7, max_new_tokens=40, ignore_eos=True)
    pieces = list(llm.stream(prompt, **kw))
    assert "".join(pieces) == llm.generate(prompt, **kw)
    assert len(pieces) > 1


def test_seed_reproduces_sampling(llm):
    kw = dict(temperature=1.0, top_k=50, top_p=0.9, min_p=0.05, max_new_tokens=30, ignore_eos=True)
    a = llm.generate(PROMPTS[0], seed=1, **kw)
    assert a == llm.generate(PROMPTS[0], seed=1, **kw)
    assert a != llm.generate(PROMPTS[0], seed=2, **kw)


def test_stop_string_split_across_tokens(llm):
    full = llm.generate(PROMPTS[1], temperature=0, max_new_tokens=40, ignore_eos=True)
    ids = llm.tokenizer.encode(full)
    # A stop string that starts inside one token and ends inside a later one.
    pieces = [llm.tokenizer.decode(ids[:i]) for i in range(len(ids) + 1)]
    i = next(i for i in range(4, len(ids)) if len(pieces[i + 1]) - len(pieces[i - 1]) >= 4)
    stop = full[len(pieces[i]) - 2 : len(pieces[i]) + 2]
    streamed = list(llm.stream(PROMPTS[1], temperature=0, max_new_tokens=40, ignore_eos=True, stop=[stop]))
    text = "".join(streamed)
    assert text == full[: full.find(stop)]
    assert llm.last_stats[0].finish_reason == "stop"


def test_text_stream_never_prints_partial_stop(chat_checkpoint):
    tok = lfm2.load(chat_checkpoint).tokenizer
    ts = TextStream(tok, stop=["STOP"])
    out = []
    for t in tok.encode("abc ST then STO and STOP tail"):
        out.append(ts.push(t))
    out.append(ts.finish())
    assert "".join(out) == "abc ST then STO and "
    printed = ""
    ts = TextStream(tok, stop=["STOP"])
    for t in tok.encode("xx STOP"):
        printed += ts.push(t)
        assert "S" not in printed  # the partial "S", "ST", "STO" is held back
    assert ts.stopped


def test_stats_and_batch(llm):
    outs = llm.generate(PROMPTS, temperature=0, max_new_tokens=12, ignore_eos=True)
    assert isinstance(outs, list) and len(outs) == 3
    st = llm.last_stats
    assert [s.completion_tokens for s in st] == [12, 12, 12]
    assert all(s.finish_reason == "length" and s.time_to_first_token_s > 0 for s in st)
    assert st[0].prompt_tokens == len(llm.tokenizer.encode(PROMPTS[0], add_special_tokens=True))
    assert st[0].decode_tokens_per_s > 0


def test_stops_on_end_of_turn(llm):
    """Make <|im_end|> the most likely token from the 4th step on: generation stops there."""
    eos = llm.tokenizer.token_to_id("<|im_end|>")
    calls = []

    def force_eos(module, args, out):
        calls.append(1)
        if len(calls) >= 4:
            out[..., eos] = 1e4
        return out

    llm.prefix_cache.clear()  # the prompt's prefill is the first of the counted calls
    handle = llm.model.lm_head.register_forward_hook(force_eos)
    try:
        text = llm.generate(PROMPTS[0], temperature=0, max_new_tokens=10)
    finally:
        handle.remove()
    st = llm.last_stats[0]
    assert st.finish_reason == "stop" and st.completion_tokens == 4  # the stop id counts, as in the server
    assert "<|im_end|>" not in text
    assert text == llm.generate(PROMPTS[0], temperature=0, max_new_tokens=3, ignore_eos=True)


def test_bad_requests(llm):
    with pytest.raises(GenerationError, match="temperature"):
        llm.generate("x", temperature=-1)
    with pytest.raises(GenerationError, match="context"):
        llm.generate("word " * 600, max_new_tokens=5)
    with pytest.raises(GenerationError, match="stop strings"):
        llm.generate("x", stop=[""])
    for bad in (0, -5, 2.5):
        with pytest.raises(GenerationError, match=f"max_new_tokens={bad} must be a positive integer"):
            llm.generate("x", max_new_tokens=bad)


def test_chunked_prefill_gives_the_same_tokens(chat_checkpoint, monkeypatch):
    """A prompt longer than the prefill chunk runs in pieces through the cache, with the same result."""
    from conftest import engine_decode

    import lfm2
    from lfm2 import engine

    llm = lfm2.load(chat_checkpoint)
    prompts = [list(range(5, 45)), list(range(7, 30))]
    params = llm.sampling_params(temperature=0)
    whole = engine_decode(llm.model, prompts, params, 12, ignore_eos=True)
    monkeypatch.setattr(engine, "PREFILL_CHUNK", 7)
    chunked = engine_decode(llm.model, prompts, params, 12, ignore_eos=True)
    assert chunked == whole and len({t for row in whole for t in row}) > 3
