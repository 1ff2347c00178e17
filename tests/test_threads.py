"""A thread that hands its computing to another gives back its OpenMP workers (lfm2/threads.py).

Left alive, they count against the CPUs and make libgomp's workers sleep at every barrier: the
server decoded at a third to two thirds of `LLM.generate`'s speed (docs/benchmarks.md)."""

from __future__ import annotations

import os
import threading

import pytest
import torch

import lfm2
from lfm2.engine import Engine
from lfm2.threads import release_openmp_workers, released

pytestmark = pytest.mark.skipif(
    not os.path.isdir("/proc/self/task") or torch.get_num_threads() < 2
    or "parallel backend: OpenMP" not in torch.__config__.parallel_info(),
    reason="needs Linux, 2+ threads and torch's OpenMP backend")


def _threads() -> set[int]:
    return set(map(int, os.listdir("/proc/self/task")))


def _workers_started_by(fn) -> set[int]:
    """The threads `fn` started: its OpenMP workers. (Sets, not counts: other tests' threads may
    end meanwhile.)"""
    before = _threads()
    fn()
    return _threads() - before


def _parallel_work() -> None:
    torch.ones(1 << 22).add_(1)  # 4M elements: above ATen's grain, so a parallel region


def _in_thread(fn) -> object:
    """fn() in a new thread (whose OpenMP pool is its own, whatever the test process did before); an
    exception inside the thread is raised here, as itself."""
    out: dict = {}

    def target() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test's thread below
            out["error"] = e

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def test_release_ends_the_calling_threads_workers():
    def run() -> tuple[set[int], bool, set[int], set[int]]:
        workers = _workers_started_by(_parallel_work)
        ok = release_openmp_workers()
        after = _threads()
        return workers, ok, after, _workers_started_by(_parallel_work)  # the pool comes back when wanted

    workers, ok, after, again = _in_thread(run)
    assert ok
    assert len(workers) >= torch.get_num_threads() - 1
    assert not workers & after
    assert len(again) >= torch.get_num_threads() - 1


def test_released_wraps_work_run_beside_the_decoding_thread():
    def run() -> set[int]:
        return _workers_started_by(released(_parallel_work))

    assert _in_thread(run) == set()


def test_engine_start_releases_the_starting_threads_workers(chat_checkpoint):
    llm = lfm2.load(chat_checkpoint, compile=False)

    def run() -> tuple[set[int], set[int]]:
        workers = _workers_started_by(_parallel_work)  # as loading a model does
        engine = Engine(llm.model, max_batch=1, max_len=64).start()
        after = _threads()
        engine.close()
        return workers, after

    workers, after = _in_thread(run)
    assert len(workers) >= torch.get_num_threads() - 1
    assert not workers & after  # gone once the engine's own thread took over


def test_loading_gives_back_the_loading_threads_workers(chat_checkpoint):
    """An application that loads in one thread and generates in another gets the speed of one thread."""
    def run() -> tuple[set[int], set[int]]:
        workers = _workers_started_by(_parallel_work)  # the application's own work before loading
        lfm2.load(chat_checkpoint, compile=False)
        return workers, _threads()

    workers, after = _in_thread(run)
    assert workers and not workers & after
