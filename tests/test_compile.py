"""The compiled decode step (lfm2.compile): same logits as eager, and an eager fallback that keeps the cache right."""

from __future__ import annotations

import pytest
import torch
from conftest import engine_decode, random_model, tiny_config, write_checkpoint

from lfm2.compile import compile_decode
from lfm2.quant import quantize_model
from lfm2.sampling import SamplingParams


def _decode_logits(model, step, prompt: list[int], n: int) -> torch.Tensor:
    """Logits of n teacher-forced decode steps after a prefill, through `step`, on a cache as the
    engine passes it (a masked view)."""
    out = []
    with torch.inference_mode():
        cache = model.make_cache(1, len(prompt) + n + 1).narrow(1)
        model(torch.tensor([prompt]), cache, last_only=True)
        for t in range(n):
            out.append(step(torch.tensor([[prompt[t % len(prompt)]]]), cache)[:, -1])
    return torch.cat(out)


WIDE = dict(hidden_size=1024, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=2)


@pytest.mark.slow  # torch.compile: 10-20 s a case on 2 cores
@pytest.mark.parametrize("quantize,wide", [(None, False), ("int8", False), (None, True)])
def test_compiled_decode_equals_eager(quantize, wide):
    """`wide`: the float32 GEMV and the decode attention kernels traced into the compiled step."""
    model = random_model(tiny_config(**(WIDE if wide else {}))).eval()
    if quantize:
        quantize_model(model, quantize, 32)
    prompt = [5, 17, 99, 3, 250, 41]
    eager = _decode_logits(model, model, prompt, 6)
    step = compile_decode(model, progress=False)
    compiled = _decode_logits(model, step, prompt, 6)  # lengths 7..12: one dynamic-shape compile serves all
    assert step.failed is None and step.compile_seconds is not None
    assert step.refused == 0  # the graph compiled on its own cache took every real step
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
    # and through generation, where the compiled step is picked up by the engine
    params = SamplingParams(temperature=0.0)
    tokens = engine_decode(model, [prompt], params, 8, ignore_eos=True)
    del model.decode_step
    assert tokens == engine_decode(model, [prompt], params, 8, ignore_eos=True)


@pytest.mark.slow  # torch.compile: ~30 s
def test_moe_experts_without_kernels_compile_with_graph_breaks(monkeypatch):
    """Experts without lfm2's kernels route through `grouped`, whose host sync breaks the graph. The step
    then compiles with the modules' guards on: without them a resumed `DecoderLayer.forward` compiled for a
    conv layer ran for an attention layer (`KeyError: 'conv'`, and an eager fallback)."""
    from lfm2 import kernels

    monkeypatch.setattr(kernels, "ops", lambda: None)
    model = random_model(tiny_config(model_type="lfm2_moe", num_experts=6, num_experts_per_tok=2,
                                     moe_intermediate_size=32, num_dense_layers=1)).eval()
    prompt = [5, 17, 99, 3, 250, 41]
    eager = _decode_logits(model, model, prompt, 5)
    step = compile_decode(model, progress=False)
    compiled = _decode_logits(model, step, prompt, 5)
    assert step.failed is None and step.refused == 0
    assert not step._graphs[1].fullgraph  # it did take the graph-break path
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)


@pytest.mark.slow  # torch.compile
def test_two_models_in_one_process_keep_their_own_compiled_steps():
    """With the modules' guards off, one model's compiled graph must not be taken for another of the
    same class (another vocabulary failed at run time: "expected size 567==512")."""
    prompt = [5, 17, 99, 3]
    for vocab in (300, 355):
        model = random_model(tiny_config(vocab_size=vocab)).eval()
        eager = _decode_logits(model, model, prompt, 3)
        step = compile_decode(model, progress=False)
        compiled = _decode_logits(model, step, prompt, 3)
        assert step.failed is None and compiled.shape[-1] == vocab
        torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)


def test_failed_compile_falls_back_to_eager_with_the_cache_intact():
    model = random_model(tiny_config()).eval()
    prompt = [5, 17, 99, 3]
    eager = _decode_logits(model, model, prompt, 3)
    step = compile_decode(model, progress=False)

    def broken(*args, **kwargs):
        # what a missing compiler looks like: the cache was touched before the failure surfaced
        args[-1].reserve(torch.ones(1, 1, dtype=torch.bool))  # (model, input_ids, cache)
        raise RuntimeError("no C++ compiler found\nlong inductor traceback")

    step.compiled = broken
    with pytest.warns(UserWarning, match="torch.compile failed .*RuntimeError: no C\\+\\+ compiler found"):
        fallback = _decode_logits(model, step, prompt, 3)
    assert step.failed and step.compile_seconds is None
    torch.testing.assert_close(fallback, eager, atol=0, rtol=0)


def test_load_compiles_real_size_models_by_default(tmp_path, monkeypatch):
    """`lfm2.load()` compiles decode steps by default for models of LFM2-350M's size (a smaller
    threshold stands in for it here), never for small ones or with LFM2_COMPILE=0; nothing compiles
    before the first decode step."""
    import lfm2
    from lfm2 import compile as compile_module
    from lfm2.compile import CompiledDecode, auto_compile

    ckpt = write_checkpoint(tmp_path / "m", tiny_config())
    monkeypatch.delenv("LFM2_COMPILE", raising=False)
    assert not hasattr(lfm2.load(ckpt).model, "decode_step")  # far below AUTO_MIN_WEIGHTS
    monkeypatch.setattr(compile_module, "AUTO_MIN_WEIGHTS", 1000)
    llm = lfm2.load(ckpt)
    assert isinstance(llm.model.decode_step, CompiledDecode) and not llm.model.decode_step.ready(1)
    assert compile_module.state(llm.model) == "pending"
    assert not hasattr(lfm2.load(ckpt, compile=False).model, "decode_step")
    monkeypatch.setenv("LFM2_COMPILE", "0")
    assert not auto_compile(llm.model) and not hasattr(lfm2.load(ckpt).model, "decode_step")
    assert isinstance(lfm2.load(ckpt, compile=True).model.decode_step, CompiledDecode)


def test_wide_float32_layers_decode_through_the_kernel(monkeypatch):
    """hidden_size >= 1024: decode-time float32 products run lfm2's GEMV and attention lfm2's decode
    attention, with F.linear's and SDPA's results."""
    from lfm2 import kernels

    ops = kernels.ops()
    if ops is None:
        pytest.skip(f"no C++ kernels here: {kernels.build_error()}")
    model = random_model(tiny_config(**WIDE)).eval()
    prompt = [5, 17, 99, 3, 250, 41]
    calls, attention = [], []

    class Counting:
        def __getattr__(self, name):
            if name == "fgemv":
                return lambda *a: calls.append(a[1].shape) or ops.fgemv(*a)
            if name == "decode_attention":
                return lambda *a: attention.append(a[1].shape) or ops.decode_attention(*a)
            return getattr(ops, name)

    monkeypatch.setattr(kernels, "ops", lambda: Counting())
    fast = _decode_logits(model, model, prompt, 4)
    assert len(calls) >= 4 * 4 * 3  # every wide projection of every decode step (and the head)
    n_attention = sum(t == "full_attention" for t in model.config.layer_types)
    assert n_attention and len(attention) == 4 * n_attention  # every decode step
    assert [k[2] for k in attention[::n_attention]] == [7, 8, 9, 10]  # the whole filled cache each step
    monkeypatch.setenv("LFM2_NO_KERNELS", "1")
    monkeypatch.setattr(kernels, "ops", lambda: None)
    torch.testing.assert_close(fast, _decode_logits(model, model, prompt, 4), atol=1e-4, rtol=1e-4)
    x = torch.randn(2, 1024, requires_grad=True)  # training: autograd through F.linear, never the kernel
    model.model.layers[0].feed_forward.w1(x).sum().backward()
    assert x.grad is not None


@pytest.mark.slow  # torch.compile
def test_the_engine_uses_the_compiled_step_at_every_batch_size():
    """The server's engine runs the compiled step as rows join and leave (batch sizes 1..3), with the
    tokens of eager decoding; one dynamic-shape compile serves them all."""
    import threading

    from lfm2.engine import Engine, Request

    model = random_model(tiny_config()).eval()
    params = SamplingParams(temperature=0.0)
    prompts = [[5, 17, 99, 3], [250, 41, 7, 8, 9, 10, 11], [1, 2]]
    lengths = [12, 6, 9]  # rows finish at different steps: the batch shrinks 3 -> 2 -> 1

    def run() -> list[list[int]]:
        out: list[list[int]] = [[] for _ in prompts]
        done = threading.Semaphore(0)
        with Engine(model, max_batch=3, max_len=64) as engine:
            for i, (p, n) in enumerate(zip(prompts, lengths, strict=True)):
                engine.submit(Request(p, params, n, lambda t, i=i: out[i].append(t) or False,
                                      lambda r: done.release(), ignore_eos=True))
            for _ in prompts:
                assert done.acquire(timeout=300)
        return out

    eager = run()
    step = compile_decode(model, progress=False)
    calls = []
    real = step.__call__
    step_calls = lambda ids, cache: calls.append(ids.shape[0]) or real(ids, cache)  # noqa: E731
    model.decode_step = step_calls
    compiled = run()
    assert step.failed is None and step.ready(1) and step.ready(3)
    assert step.refused == 0  # the one-row and the batch graphs took every step
    assert compiled == eager
    assert {1, 2, 3} <= set(calls) or len(set(calls)) >= 2, calls


def test_compiled_code_is_kept_in_lfm2s_cache_not_the_temporary_directory(monkeypatch, tmp_path):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from lfm2 import compile as lfm2_compile

    # what importing torch._dynamo leaves: inductor's default, in the temporary directory
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    monkeypatch.setenv("HOME", str(tmp_path))
    compile_decode(random_model(tiny_config()), progress=False)  # nothing compiles until the first step
    # one directory per instruction set: code compiled under one and run under another corrupts the heap
    ours = tmp_path / ".cache" / "lfm2" / "inductor" / torch.backends.cpu.get_cpu_capability().lower()
    assert lfm2_compile.cache_dir() == str(ours)
    from torch._inductor.runtime.cache_dir_utils import cache_dir as inductor_cache_dir

    assert inductor_cache_dir() == str(ours)  # where inductor writes
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert lfm2_compile.cache_dir() == str(tmp_path / "mine")  # a directory the user chose is kept


def test_inductor_cache_is_keyed_by_the_kernel_build(monkeypatch):
    """A graph cached against other kernels (an older lfm2) is not loaded: it may call them with arguments
    they no longer take, which crashed the process. The build's key joins the user's own tag, once."""
    from lfm2 import compile as lfm2_compile
    from lfm2 import kernels

    # (config.patch, not monkeypatch: undoing monkeypatch.setattr deletes a torch config entry for good)
    before = torch.compiler.config.cache_key_tag
    with torch.compiler.config.patch(cache_key_tag="mine"):
        compile_decode(random_model(tiny_config()), progress=False)
        ours = f"lfm2-kernels-{kernels.build_key()}"
        assert torch.compiler.config.cache_key_tag == f"mine {ours}"
        assert lfm2_compile.tag_cache_key() == f"mine {ours}"  # not added twice
        monkeypatch.setattr(kernels, "_state", {**kernels._state, "key": "0123456789ab"})
        assert lfm2_compile.tag_cache_key().endswith("lfm2-kernels-0123456789ab")  # another build, another key
    assert torch.compiler.config.cache_key_tag == before


@pytest.mark.slow  # torch.compile in processes of their own: ~10-60 s
@pytest.mark.parametrize("model", ["int8", "wide float32"])
def test_a_fresh_process_compiles_the_step_as_one_graph(model):
    """`lfm2 serve` compiles the step before any eager forward, so the trace was where the kernels were first
    asked for: the loader's lock (a float model: the kernels not loaded yet) or a first `kernels.has_vnni()` (a
    bool from an operator; an int8 model) broke the step into per-layer pieces, 13.7 ms a token against 10 on a
    Q8_0 file. Each case in a fresh process, so that nothing has asked before."""
    import subprocess
    import sys
    from pathlib import Path

    from lfm2 import kernels

    if kernels.ops() is None:
        pytest.skip("needs lfm2's kernels")
    make = ("model = random_model(tiny_config()).eval(); quantize_model(model, 'int8', 32)" if model == "int8" else
            "model = random_model(tiny_config(hidden_size=1024, intermediate_size=1024, num_attention_heads=8, "
            "num_key_value_heads=2)).eval()")
    code = (
        "from conftest import random_model, tiny_config\n"
        "from lfm2.compile import compile_decode\n"
        "from lfm2.quant import quantize_model\n"
        f"{make}\n"
        "step = compile_decode(model, progress=False)\n"
        "step.warm(1)\n"
        "print('failed', step.failed, 'one graph', step._graphs[1].fullgraph)\n"
    )
    tests = Path(__file__).resolve().parent
    out = subprocess.run([sys.executable, "-c", code], cwd=tests, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "failed None one graph True" in out.stdout, out.stdout + out.stderr[-2000:]
