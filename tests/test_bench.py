"""`lfm2 bench`'s measuring child process, on a small checkpoint: eager and compiled lfm2 rows."""

from __future__ import annotations

import argparse

from conftest import tiny_config, write_checkpoint

from lfm2.bench import run


def test_bench_child_measures_eager_and_compiled(tmp_path):
    ckpt = write_checkpoint(tmp_path / "m", tiny_config(vocab_size=65536))  # the child draws ids up to 60000
    args = argparse.Namespace(prompt=24, new=6, threads=1)
    eager = run("lfm2", ckpt, args)
    assert eager["tokens"] == 6 and eager["prefill"] > 0 and eager["decode"] > 0 and eager["rss"] > 0
    assert eager["compile_s"] is None
    compiled = run("lfm2-compile", ckpt, args)
    assert compiled["tokens"] == 6 and compiled["compile_s"] > 0
