"""A compiled decode step: `torch.compile` on the single-token forward pass, with an eager fallback.

At decode, a step of a small model is dozens of matrix-vector products (memory-bound kernels)
around a thousand tiny element-wise operators (norms, gates, RoPE, residual adds, cache
writes), each a Python call and a dispatcher round trip. Inductor fuses those into a few
generated C++ loops and runs the whole step from one wrapper; the matrix-vector products stay
what they were (our quantized kernels are custom operators with shape-only implementations, so
they trace as opaque calls). `docs/benchmarks.md` has the measured effect.

Only decode steps are compiled: prefill runs eagerly, so its shapes never cause a compile. The
step is traced with dynamic shapes, so one compile serves every cache length and batch size.
Compiling costs time once per process (inductor also keeps an on-disk cache, which makes later
processes faster); the first call reports it. Without a working compiler, or if tracing fails
for any reason, the first call warns, puts the cache back as it was, and every step runs
eagerly from then on: the results are the same either way.
"""

from __future__ import annotations

import sys
import time
import types
import warnings

import torch

from lfm2.cache import Cache

# No guards on the modules' attributes: checking them costs ~0.7 ms per step on LFM2-350M (hundreds
# of parameters), and a loaded model's modules do not change. Changing the model after compiling
# (quantizing, adding adapters) therefore needs a new `compile_decode`.
# `cpp_wrapper`: the step's ~200 kernel and operator calls are made from generated C++ rather than
# a Python wrapper, and `cpp.threads=1`: the fused element-wise loops, a few thousand values each,
# run without an OpenMP region per loop (the matrix products keep their threads). Together 3-6%
# faster decode on LFM2-350M int4 (8.8-9.0 vs 9.3-9.4 ms per token, same process, alternating);
# the first compile takes longer (about 45 s instead of 10 s; inductor's disk cache serves later ones).
OPTIONS = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe, "cpp_wrapper": True,
           "cpp.threads": 1}


def _step(model: torch.nn.Module, input_ids: torch.Tensor, cache: Cache) -> torch.Tensor:
    return model(input_ids, cache)


class CompiledDecode:
    """`step(input_ids (B, 1), cache) -> logits (B, 1, vocab)`, compiled on first use.

    Dynamo keeps compiled graphs per code object, and with the modules' guards off (`OPTIONS`) a graph
    compiled for one model would also be taken for another of the same class (another vocabulary:
    "expected size 567==512" at run time). So each step compiles its own copy of `_step`'s code, and
    two models in one process (a server and a test, a target and a draft) keep their own graphs."""

    def __init__(self, model: torch.nn.Module, progress: bool = True) -> None:
        self.model = model
        self.progress = progress
        step = types.FunctionType(_step.__code__.replace(), _step.__globals__, "decode_step")
        self.compiled = torch.compile(step, dynamic=True, options=OPTIONS)
        self.compile_seconds: float | None = None  # set by the first call
        self.failed: str | None = None  # why the eager fallback is in use

    def __call__(self, input_ids: torch.Tensor, cache: Cache) -> torch.Tensor:
        if self.failed is not None:
            return self.model(input_ids, cache)
        if self.compile_seconds is not None:
            return self.compiled(self.model, input_ids, cache)
        if self.progress:
            print("lfm2: compiling the decode step (once per process: seconds to a minute) ...",
                  file=sys.stderr, flush=True)
        snapshot = cache.snapshot()
        t0 = time.perf_counter()
        try:
            out = self.compiled(self.model, input_ids, cache)
        except Exception as e:  # noqa: BLE001 - any failure to compile means: run eagerly
            cache.restore(snapshot)
            self.failed = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            warnings.warn(f"lfm2: torch.compile failed ({self.failed}); decoding eagerly instead", stacklevel=2)
            return self.model(input_ids, cache)
        self.compile_seconds = time.perf_counter() - t0
        if self.progress:
            print(f"lfm2: decode step compiled in {self.compile_seconds:.1f} s", file=sys.stderr, flush=True)
        return out


def compile_decode(model: torch.nn.Module, progress: bool = True) -> CompiledDecode:
    """Make `model`'s decode steps (in `lfm2.generate`) go through `torch.compile`; returns the step."""
    step = CompiledDecode(model, progress)
    model.decode_step = step
    return step
