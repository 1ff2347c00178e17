"""One thread computes: the others give back their OpenMP workers.

PyTorch's CPU wheels parallelise with OpenMP (libgomp, shipped in torch/lib). libgomp keeps a pool
of worker threads for every native thread that has opened a parallel region, for as long as that
thread lives, sleeping or not. Once the process holds more such threads than it has CPUs, a worker
waiting at a barrier spins only ~100 times before it sleeps (`gomp_throttled_spin_count_var` in
libgomp/env.c, read by `do_spin` in libgomp/config/linux/wait.h), so each of the hundreds of
parallel regions of a decode step then waits for its workers to wake up.

That is what happens when the thread that loaded a model (and ran parallel work while loading and
warming up) hands decoding to another thread, as `lfm2 serve` does: measured on a random LFM2-350M
Q4_0 file on 2 cores, one eager decode step took 28 ms in the loading thread and 84-99 ms in a
second thread; with the loading thread's workers given back first, 26-28 ms in either. The server
decoded at 15-31 tok/s for one client where `LLM.generate` ran at 40-44.

So a thread that hands its computing to another (`Engine.start`), or that ran torch work on the
side (the server's worker threads: templates, images, grammars), calls `release_openmp_workers()`.
A later parallel region in that thread builds its pool again; nothing is lost but a thread start.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

# The OpenMP runtimes a torch build may run on: GNU (Linux wheels), LLVM, Intel.
_RUNTIMES = ("libgomp.so.1", "libomp.so", "libiomp5.so")
_OMP_PAUSE_SOFT = 1  # omp_pause_soft in omp.h (OpenMP 5.0): free the threads, keep nothing else


@functools.cache
def _pause() -> Callable[[int], int] | None:
    """`omp_pause_resource_all` of the OpenMP runtime torch loaded, or None (no such runtime
    loaded, or one older than OpenMP 5.0). RTLD_NOLOAD: never load a second runtime."""
    import torch  # noqa: F401  (its runtime must be loaded first)

    for name in _RUNTIMES:
        try:
            lib = ctypes.CDLL(name, mode=os.RTLD_NOW | os.RTLD_NOLOAD)
        except OSError:
            continue
        fn = getattr(lib, "omp_pause_resource_all", None)
        if fn is not None:
            fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
            return fn
    return None


def release_openmp_workers() -> bool:
    """End the OpenMP worker threads the calling thread holds; True when a runtime did so.

    Cheap when the thread holds none. Must not be called inside a parallel region (nothing in
    lfm2 does: it is called between pieces of work)."""
    pause = _pause()
    return pause is not None and pause(_OMP_PAUSE_SOFT) == 0


def released(fn: Callable[..., T]) -> Callable[..., T]:
    """`fn`, giving back the calling thread's OpenMP workers when it returns (for work run in a
    pool thread beside the one that decodes: `asyncio.to_thread(released(fn), ...)`)."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        finally:
            release_openmp_workers()

    return run
