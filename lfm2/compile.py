"""A compiled decode step: `torch.compile` on the single-token forward pass, with an eager fallback.

At decode, a step of a small model is dozens of matrix-vector products (memory-bound kernels)
around hundreds of tiny element-wise operators (norms, gates, RoPE, residual adds, cache
writes), each a Python call and a dispatcher round trip. Inductor fuses those into a few
generated C++ loops and runs the whole step from one wrapper; the matrix-vector products stay
what they were (our kernels are custom operators with shape-only implementations, so they trace
as opaque calls). `docs/benchmarks.md` has the measured effect.

Only decode steps are compiled: prefill runs eagerly, so its shapes never cause a compile. The
step is traced with dynamic shapes, so one graph serves every cache length; a batch of one row
and a batch of several are two graphs (PyTorch specializes sizes of 1), compiled separately.

It is the default on the CPU only for models of real size (`auto_compile`) that the fused step (`lfm2.step`,
every block in one C++ call, no compiler) does not take; `compile=True` asks for it on any model. A graph
compiles in the calling thread, on a cache of its own, at the first decode step that needs it; the server
compiles both at start-up and `lfm2 chat` the one-row graph, before the first request or reply.
Not in a background thread: tracing patches `nn.Module.__call__` process-wide (a concurrent eager
step failed with "module is not installed as a submodule") and holds the GIL for seconds (eager
decode fell from 30 to 2-4 tok/s meanwhile). Inductor keeps compiled code on disk (`cache_dir()`,
`~/.cache/lfm2/inductor/<instruction set>` by default):
the first compile of a model takes about a minute on 2 cores, later processes about ten seconds.
A compiled graph never recompiles: a step its guards reject runs eagerly. (Except a step that cannot be one
graph, the MoE experts' generic path with its host sync: it compiles in pieces, with the modules' guards
on, and may recompile, since its earlier pieces have run by then; `_Graph.with_graph_breaks`.) Without a working
compiler, or if tracing fails for any reason, the step warns and decodes eagerly from then on:
the results are the same either way.
"""

from __future__ import annotations

import os
import sys
import time
import types
import warnings
from pathlib import Path

import torch

from lfm2.cache import Cache

ENV = "LFM2_COMPILE"  # "0" turns the default compile off (tests, or a machine without a compiler)

# Models below this many weights (test models, the bundled tiny model) decode eagerly by default: a
# step of theirs is a millisecond or two, and the compile (a minute of CPU the first time) would
# take longer to pay back than they are ever run. LFM2-350M, the smallest of the family, has 354M.
AUTO_MIN_WEIGHTS = 50_000_000

# No guards on the modules' attributes: checking them costs ~0.7 ms per step on LFM2-350M (hundreds
# of parameters), and a loaded model's modules do not change. Changing the model after compiling
# (quantizing, adding adapters) therefore needs a new `compile_decode`.
# `cpp_wrapper`: the step's ~200 kernel and operator calls are made from generated C++ rather than
# a Python wrapper, and `cpp.threads=1`: the fused element-wise loops, a few thousand values each,
# run without an OpenMP region per loop (the matrix products keep their threads). Together 3-6%
# faster decode on LFM2-350M int4 (8.8-9.0 vs 9.3-9.4 ms per token, same process, alternating).
OPTIONS = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe, "cpp_wrapper": True,
           "cpp.threads": 1}

# Past this many weight tensors, the Python wrapper: the generated C++ one grows by a few lines per input
# tensor, and gcc compiled LFM2-8B-A1B's (4,516 inputs: its experts' tensors, 22,884 lines) for over 7 minutes
# at 3 GB without finishing; LFM2-350M's has a few hundred inputs and compiles in under a minute.
CPP_WRAPPER_MAX_TENSORS = 1000

# Sizes of the cache a graph is compiled on: all different from each other and from
# the model's fixed sizes, since PyTorch ties equal sizes together ("duck sizing") and guards on it.
WARM_ROWS = {1: 1, 2: 3}  # graph key (1: one row, 2: several) -> rows
WARM_SLOTS, WARM_FILLED = 45, 29


INDUCTOR_ENV = "TORCHINDUCTOR_CACHE_DIR"


def _not_one_graph() -> tuple[type[BaseException], ...]:
    """What tracing a step as one graph (`fullgraph`) raises where the step has a host sync in it. Looked up
    when a step compiles: `torch._dynamo` is ~70 MiB of modules that a process which never compiles (the
    fused step's, `lfm2.step`) should not import."""
    import torch._dynamo
    import torch.fx.experimental.symbolic_shapes

    return torch._dynamo.exc.Unsupported, torch.fx.experimental.symbolic_shapes.GuardOnDataDependentSymNode


def cache_dir() -> str:
    """Where inductor keeps compiled code between processes: `$TORCHINDUCTOR_CACHE_DIR` where set, else
    `~/.cache/lfm2/inductor`, beside lfm2's kernels (`lfm2.kernels.cache_dir`). Inductor's own default
    is in the temporary directory, which a reboot or a tmp cleaner empties: the next start would pay
    the minute-long first compile again. Setting the variable (only where unset) is how inductor takes
    a directory; it reads it at each compile.

    One directory per instruction set that ATen dispatches to (`torch.backends.cpu.get_cpu_capability()`,
    "avx512", "avx2", ...): inductor's cache key leaves it out, and a graph compiled under one, then loaded
    under another, corrupted the heap (LFM2-350M Q4_0, compiled under `ATEN_CPU_CAPABILITY=avx2` and run
    without it, torch 2.13). Machines that share a home directory (a cluster's AVX2 and AVX-512 nodes)
    would do the same."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get(INDUCTOR_ENV)
    # Importing torch._dynamo sets the variable to inductor's default: that is not a user's choice.
    if not current or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        isa = torch.backends.cpu.get_cpu_capability().lower()
        os.environ[INDUCTOR_ENV] = str(Path.home() / ".cache" / "lfm2" / "inductor" / isa)
    return os.environ[INDUCTOR_ENV]


def tag_cache_key() -> str:
    """Add lfm2's kernel build (`lfm2.kernels.build_key`) to inductor's cache key
    (`torch.compiler.config.cache_key_tag`, beside any tag of the user's); returns the tag.

    Inductor's key has the graph and the custom operators' names, not their schemas: after an upgrade
    that gave `moe_experts` one more argument, a graph cached by the older version called it with one
    too few from its C++ wrapper and crashed the process (segmentation fault, torch 2.13)."""
    from lfm2 import kernels

    ours = f"lfm2-kernels-{kernels.build_key()}"
    tag = torch.compiler.config.cache_key_tag
    if ours not in tag.split():
        torch.compiler.config.cache_key_tag = f"{tag} {ours}".strip()
    return torch.compiler.config.cache_key_tag


def auto_compile(model: torch.nn.Module) -> bool:
    """Whether `lfm2.load()` compiles `model`'s decode step by default: on the CPU, for models of
    at least `AUTO_MIN_WEIGHTS` weights, unless `LFM2_COMPILE=0`."""
    if os.environ.get(ENV, "").strip().lower() in ("0", "false", "no", "off"):
        return False
    if getattr(model, "device", torch.device("cpu")).type != "cpu":
        return False  # measured on CPUs only
    weights = sum(t.numel() for t in model.parameters()) + sum(t.numel() for t in model.buffers())
    return weights >= AUTO_MIN_WEIGHTS


def _step(model: torch.nn.Module, input_ids: torch.Tensor, cache: Cache) -> torch.Tensor:
    return model(input_ids, cache)


class _Graph:
    """One compiled copy of the step. Dynamo keeps compiled graphs per code object, and with the
    modules' guards off (`OPTIONS`) a graph compiled for one model would also be taken for another of
    the same class (another vocabulary: "expected size 567==512" at run time). So each graph compiles
    its own copy of `_step`'s code: two models in one process keep their own graphs, and the
    one-row and many-row graphs of a model do not count as recompiles of each other."""

    def __init__(self, name: str, options: dict, fullgraph: bool = True) -> None:
        step = types.FunctionType(_step.__code__.replace(), _step.__globals__, name)
        self.fn = torch.compile(step, dynamic=True, fullgraph=fullgraph, options=options)
        self.name, self.options, self.fullgraph = name, options, fullgraph
        self.seconds: float | None = None  # set once compiled

    def with_graph_breaks(self) -> _Graph:
        """This graph for a step that cannot be one graph (a host sync inside: the generic MoE expert
        path's `tolist`), with the modules' guards on. Past a graph break dynamo compiles each resumed
        frame on its own (a `DecoderLayer.forward`, say), and without guards on the modules a frame
        compiled for one layer would run for the next: for an attention layer, the conv layer's code
        (`KeyError: 'conv'`), for a layer of the same kind its cache index, silently."""
        options = {k: v for k, v in self.options.items() if k != "guard_filter_fn"}
        return _Graph(self.name, options, fullgraph=False)


class CompiledDecode:
    """`step(input_ids (B, 1), cache) -> logits (B, 1, vocab)`, through `torch.compile`.

    A graph compiles at the first step that needs it (or at `warm`), in the calling thread, on a
    cache of its own: a failure leaves the caller's cache untouched and the step decodes eagerly.
    A ready graph never recompiles: a call its guards reject runs eagerly (`refused` counts them),
    so no step ever stalls for a minute in the middle of a stream."""

    def __init__(self, model: torch.nn.Module, progress: bool = True) -> None:
        cache_dir()  # first: compiled code goes to lfm2's cache directory, not the temporary one
        tag_cache_key()  # and under a key of this build of the kernels
        self.model = model
        self.progress = progress
        options = {**OPTIONS, "cpp_wrapper": _inputs(model) <= CPP_WRAPPER_MAX_TENSORS}
        self._graphs = {1: _Graph("decode_step", options), 2: _Graph("decode_step_batch", options)}
        self.compile_seconds: float | None = None  # of the first graph compiled
        self.failed: str | None = None  # why the eager fallback is in use
        self.refused = 0  # steps a ready graph's guards rejected, run eagerly

    @property
    def compiled(self):  # noqa: ANN201 - the one-row graph's compiled function (tests replace it)
        return self._graphs[1].fn

    @compiled.setter
    def compiled(self, fn) -> None:  # noqa: ANN001
        self._graphs[1].fn = fn

    def ready(self, rows: int = 1) -> bool:
        """Whether steps of `rows` rows run compiled."""
        return self.failed is None and self._graphs[_key(rows)].seconds is not None

    def __call__(self, input_ids: torch.Tensor, cache: Cache) -> torch.Tensor:
        rows = input_ids.shape[0]
        if not self.ready(rows):
            self.warm(rows)
            if self.failed is not None:
                return self.model(input_ids, cache)
        graph = self._graphs[_key(rows)]
        if not graph.fullgraph:  # frames before a break have changed the cache when a later one would
            return graph.fn(self.model, input_ids, cache)  # recompile: no eager rerun, it may recompile
        try:
            with torch.compiler.set_stance("fail_on_recompile"):
                return graph.fn(self.model, input_ids, cache)
        except RuntimeError as e:  # raised by the guards, before the step touched the cache
            if "fail_on_recompile" not in str(e):
                raise
            self.refused += 1
            return self.model(input_ids, cache)

    def warm(self, *rows: int) -> None:
        """Compile the graphs for steps of these row counts now (those not compiled yet)."""
        for key in dict.fromkeys(_key(n) for n in rows):
            graph = self._graphs[key]
            if self.failed is not None or graph.seconds is not None:
                continue
            if self.progress:  # first compiles on 2 Zen 1 cores: dense ~70 s; LFM2-8B-A1B 210 s (45 s from the
                # cache), LFM2-24B-A2B 592 s (docs/benchmarks.md)
                moe = any(hasattr(m, "stack_experts") for m in self.model.modules())
                took = ("several minutes the first time (up to ten for the largest on 2 cores), under a minute"
                        if moe else "about a minute the first time, seconds")
                print(f"lfm2: compiling the decode step{'' if key == 1 else ' for batches'} "
                      f"({took} once cached in {cache_dir()}) ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            try:  # the engine's caches are inference tensors: so is this one (guards check it)
                try:
                    self._trace(graph, key)
                except _not_one_graph():  # a graph break, or a size known only at run time: again, in pieces
                    graph = self._graphs[key] = graph.with_graph_breaks()
                    self._trace(graph, key)
            except Exception as e:  # noqa: BLE001 - any failure to compile means: run eagerly
                text = str(e).strip()
                self.failed = f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"
                warnings.warn(f"lfm2: torch.compile failed ({self.failed}); decoding eagerly instead", stacklevel=3)
                return
            graph.seconds = time.perf_counter() - t0
            if self.compile_seconds is None:
                self.compile_seconds = graph.seconds
            if self.progress:
                print(f"lfm2: decode step compiled in {graph.seconds:.1f} s", file=sys.stderr, flush=True)

    def _trace(self, graph: _Graph, key: int) -> None:
        """Compile `graph` by running it once on a cache of its own."""
        from lfm2 import kernels

        # The kernels loaded (built if need be) and their capabilities asked before the trace: in it, the
        # loader's lock and an operator that returns a bool each break the graph into per-layer pieces
        # (a float model's first step in `lfm2 serve` decoded that way).
        kernels.ops()
        for module in self.model.modules():  # MoE blocks: their experts' tensors as one input per kind
            stack = getattr(module, "stack_experts", None)
            if stack is not None and stack():
                # Static sizes, hence a static offset into their storage. Traced with `dynamic=True`, each
                # stacked view's offset was a size symbol of its own: LFM2-8B-A1B's compiled step read 141
                # integers back from tensors every step (its generated code's `aoti_torch_item_int64` calls);
                # now 2. Measured ~0.6 ms of a 30 ms step in a profile; within noise at 72 ms on Zen 1.
                for view in module._stacks[1]:
                    if view is not None:
                        torch._dynamo.mark_static(view)
        with torch.inference_mode(), torch._dynamo.config.patch(specialize_float=True):
            cache = _warm_cache(self.model, WARM_ROWS[key])
            ids = torch.zeros(WARM_ROWS[key], 1, dtype=torch.long, device=cache.valid.device)
            graph.fn(self.model, ids, cache)


def warm(model: torch.nn.Module, *rows: int) -> None:
    """Compile `model`'s decode step for these row counts now, where it has one: the server and
    `lfm2 chat` at start-up, so that no request or reply waits for the compiler."""
    step = getattr(model, "decode_step", None)
    if isinstance(step, CompiledDecode):
        step.warm(*rows)


def state(model: torch.nn.Module) -> str:
    """The decode step's state, for health reports: "fused" (`lfm2.step`, nothing to compile), "off"
    (eager), or the compiled step's: "pending" (compiles at the first step), "ready" or "failed"
    (decoding eagerly)."""
    from lfm2.step import FusedDecode

    step = getattr(model, "decode_step", None)
    if not isinstance(step, CompiledDecode):
        return "fused" if isinstance(step, FusedDecode) else "off"
    if step.failed is not None:
        return "failed"
    return "ready" if step.ready(1) else "pending"


def _inputs(model: torch.nn.Module) -> int:
    """About how many tensors the step's graph takes: the model's, with each MoE block's experts as one tensor
    per kind where they stack (`SparseMoeBlock.stack_experts`: LFM2-8B-A1B 4,516 -> ~430)."""
    count = sum(1 for _ in model.parameters()) + sum(1 for _ in model.buffers())
    for module in model.modules():
        stack = getattr(module, "stack_experts", None)
        if stack is not None and stack():
            experts = list(module.experts.parameters()) + list(module.experts.buffers())
            count -= len(experts) - sum(v is not None for v in module._stacks[1])
    return count


def _key(rows: int) -> int:
    return 1 if rows == 1 else 2


def _warm_cache(model: torch.nn.Module, rows: int) -> Cache:
    """A cache shaped like the engine's (a view of a larger one, rows packed at the top, masked),
    with `WARM_FILLED` slots filled, for compiling a graph without touching any real request."""
    cache = model.make_cache(rows + 2, WARM_SLOTS).narrow(rows)
    cache.valid[:, :WARM_FILLED] = True
    cache.positions.fill_(WARM_FILLED)
    cache.length = WARM_FILLED
    return cache


def compile_decode(model: torch.nn.Module, progress: bool = True) -> CompiledDecode:
    """Make `model`'s decode steps (in `lfm2.engine`) go through `torch.compile`; returns the step."""
    step = CompiledDecode(model, progress)
    model.decode_step = step
    return step
