"""`lfm2 bench`'s measuring child process, on a small checkpoint: eager and compiled lfm2 rows."""

from __future__ import annotations

import argparse

import pytest
from conftest import tiny_config, write_checkpoint

from lfm2.bench import run


@pytest.mark.slow  # two child processes, one of them compiling: about 30 s
def test_bench_child_measures_eager_and_compiled(tmp_path):
    ckpt = write_checkpoint(tmp_path / "m", tiny_config(vocab_size=65536))  # the child draws ids up to 60000
    args = argparse.Namespace(prompt=24, new=6, threads=1)
    eager = run("lfm2", ckpt, args)
    assert eager["tokens"] == 6 and eager["prefill"] > 0 and eager["decode"] > 0 and eager["rss"] > 0
    assert eager["compile_s"] is None
    compiled = run("lfm2-compile", ckpt, args)
    assert compiled["tokens"] == 6 and compiled["compile_s"] > 0


def test_bench_table_and_per_round_ratios(tmp_path, monkeypatch, capsys):
    """The report, with the engines' measurements faked: `--precision` picks rows, the per-round
    ratios pair each lfm2 row with the other engines of its precision, round by round."""
    import pytest

    from lfm2 import bench

    ckpt = write_checkpoint(tmp_path / "m", tiny_config())
    monkeypatch.setattr(bench, "random_checkpoint", lambda preset, out: ckpt)
    monkeypatch.setattr(bench, "bandwidth_gbs", lambda: (10.0, 20.0))
    speeds = {"lfm2": [50.0, 40.0], "lfm2-compile": [60.0, 44.0], "transformers": [9.0, 9.0], "llama": [50.0, 50.0]}
    calls: list[tuple[str, str]] = []

    def fake_run(engine, path, args):
        calls.append((engine, path.name))
        decode = speeds[engine][sum(e == engine and p == path.name for e, p in calls) - 1]
        return {"prefill": 100.0, "decode": decode, "ttft": 0.5, "rss": 2**30, "tokens": args.new,
                "compile_s": 3.0 if engine == "lfm2-compile" else None}

    monkeypatch.setattr(bench, "run", fake_run)
    monkeypatch.setattr(bench, "engines_for", lambda ck, args: [
        row for row in [("lfm2 int4", "lfm2", ck / "lfm2-int4", 18 / 32, "int4"),
                        ("lfm2 int4 +compile", "lfm2-compile", ck / "lfm2-int4", 18 / 32, "int4"),
                        ("transformers float32", "transformers", ck, 4.0, "f32"),
                        ("llama.cpp Q4_0", "llama", ck / "q4.gguf", 18 / 32, "int4")]])
    bench.main(["--rounds", "2", "--precision", "int4"])
    out = capsys.readouterr().out
    assert "| lfm2 int4 +compile | 100.0 | 1.00x | 52.0 | 1.16x |" in out
    assert "- lfm2 int4 +compile / llama.cpp Q4_0: 1.20, 0.88 (median 1.04x)" in out
    assert "- lfm2 int4 / llama.cpp Q4_0: 1.00, 0.80 (median 0.90x)" in out
    assert "transformers float32 |" in out and "/ transformers" not in out  # no float32 lfm2 row to pair with
    with pytest.raises(SystemExit, match="choose from f32, int8, int4"):
        bench.main(["--precision", "int3"])


def test_precision_picks_the_rows(tmp_path):
    from lfm2.bench import engines_for

    ckpt = write_checkpoint(tmp_path / "m", tiny_config())
    args = argparse.Namespace(precision="int8", no_compile=True, no_transformers=True, no_llama=True)
    assert [row[0] for row in engines_for(ckpt, args)] == ["lfm2 int8"]
    assert not (ckpt / "lfm2-int4").exists()  # nothing written for precisions not asked for
    args.precision, args.no_transformers = None, False
    assert [row[0] for row in engines_for(ckpt, args)] == [
        "lfm2 float32", "transformers float32", "lfm2 int8", "lfm2 int4"]
