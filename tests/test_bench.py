"""`lfm2 bench`'s measuring child process, on a small checkpoint: eager and compiled lfm2 rows."""

from __future__ import annotations

import argparse
import json

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
    monkeypatch.setattr(bench, "random_checkpoint", lambda preset, out, notes: ckpt)
    monkeypatch.setattr(bench, "bandwidth_gbs", lambda: (10.0, 20.0))
    speeds = {"lfm2-eager": [50.0, 40.0], "lfm2": [60.0, 44.0], "transformers": [9.0, 9.0], "llama": [50.0, 50.0]}
    calls: list[tuple[str, str]] = []

    def fake_run(engine, path, args):
        calls.append((engine, path.name))
        decode = speeds[engine][sum(e == engine and p == path.name for e, p in calls) - 1]
        return {"prefill": 100.0, "decode": decode, "ttft": 0.5, "rss": 2**30, "tokens": args.new,
                "compile_s": 3.0 if engine == "lfm2" else None}

    monkeypatch.setattr(bench, "run", fake_run)
    monkeypatch.setattr(bench, "engines_for", lambda ck, args, notes: [
        bench.Row("lfm2 int4", "lfm2", ck / "lfm2-int4", "int4", 1e9),
        bench.Row("lfm2 int4 eager", "lfm2-eager", ck / "lfm2-int4", "int4", 1e9),
        bench.Row("transformers float32", "transformers", ck, "f32", 4e9),
        bench.Row("llama.cpp Q4_0", "llama", ck / "q4.gguf", "int4", 1e9)])
    chart = tmp_path / "chart.png"
    bench.main(["--rounds", "2", "--precision", "int4", "--chart", str(chart)])
    out = capsys.readouterr().out
    assert "| lfm2 int4 | 100.0 | 1.00x | 52.0 | 1.00x | 500 ms | 1.00 GiB | 260% of 20 tok/s |" in out
    assert f"chart: {chart}" in out and chart.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert "| lfm2 int4 eager | 100.0 | 1.00x | 45.0 | 0.87x |" in out
    assert "- lfm2 int4 / llama.cpp Q4_0: 1.20, 0.88 (median 1.04x)" in out
    assert "- lfm2 int4 eager / llama.cpp Q4_0: 1.00, 0.80 (median 0.90x)" in out
    assert "compile time of the decode step, per round" in out and "lfm2 int4 3 / 3 s" in out
    assert "transformers float32 |" in out and "/ transformers" not in out  # no float32 lfm2 row to pair with
    with pytest.raises(SystemExit, match="choose from f32, int8, int4"):
        bench.main(["--precision", "int3"])


def test_precision_picks_the_rows(tmp_path):
    from lfm2.bench import engines_for
    from lfm2.quant import quantize_checkpoint

    ckpt = write_checkpoint(tmp_path / "m", tiny_config())
    args = argparse.Namespace(precision="int8", no_compile=True, no_transformers=True, no_llama=True)
    notes: list[str] = []
    assert [row.label for row in engines_for(ckpt, args, notes)] == ["lfm2 int8"]
    assert not (ckpt / "lfm2-int4").exists()  # nothing written for precisions not asked for
    # quantized in a child process whose peak memory is reported against the files' size
    assert len(notes) == 1 and notes[0].startswith("`lfm2 quantize` to int8:") and "x the int8 files'" in notes[0]
    args.precision, args.no_transformers = None, False
    quantize_checkpoint(ckpt, ckpt / "lfm2-int4", "int4")  # in this process: one child is enough for the test
    assert [row.label for row in engines_for(ckpt, args)] == [
        "lfm2 float32", "transformers float32", "lfm2 int8", "lfm2 int4"]


MOE = dict(model_type="lfm2_moe", num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32, num_dense_layers=1)


def test_random_checkpoint_is_sharded_bfloat16_that_lfm2_and_transformers_load(tmp_path):
    """The bench's writer on a tiny MoE: Hugging Face shards + index, bfloat16, the same files for the same
    seed whatever the shard size, and both lfm2 and transformers load it to the same logits."""
    import json

    import torch
    import transformers
    from safetensors import safe_open

    import lfm2
    from lfm2.random_checkpoint import is_complete, write_random_checkpoint

    config = tiny_config(**MOE)
    ckpt = write_random_checkpoint(config, tmp_path / "moe", shard_bytes=60_000)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    files = sorted({*index["weight_map"].values()})
    assert len(files) >= 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert sorted(p.name for p in ckpt.glob("*.safetensors")) == files and is_complete(ckpt)
    dtypes, total = {}, 0
    for f in files:
        with safe_open(str(ckpt / f), "pt") as st:
            for name in st.keys():
                assert index["weight_map"][name] == f
                t = st.get_tensor(name)
                dtypes[name], total = t.dtype, total + t.numel() * t.element_size()
    assert index["metadata"]["total_size"] == total
    assert set(dtypes.values()) == {torch.bfloat16}
    assert "lm_head.weight" not in dtypes  # tied: stored once, as the embedding
    one = write_random_checkpoint(config, tmp_path / "one")  # one file, same seed: the same tensors
    with safe_open(str(one / "model.safetensors"), "pt") as st:
        name = "model.layers.1.feed_forward.experts.3.w2.weight"
        with safe_open(str(ckpt / index["weight_map"][name]), "pt") as sharded:
            assert torch.equal(st.get_tensor(name), sharded.get_tensor(name))
    assert not (one / "model.safetensors.index.json").exists()

    ours = lfm2.load(ckpt).model
    theirs = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ids = torch.randint(3, config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = theirs(ids).logits, ours(ids)
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert ref.std() > 0.1  # the random weights keep activations alive through the layers


def test_random_int4_checkpoint_loads_quantized(tmp_path):
    """The int4 checkpoint written directly (for a model whose bfloat16 files would not fit on disk):
    lfm2's quantized format, loaded as int4 layers whose weights have the float checkpoint's spread."""
    import torch

    import lfm2
    from lfm2.quant import QuantLinear, read_quantization
    from lfm2.random_checkpoint import write_random_checkpoint

    ckpt = write_random_checkpoint(tiny_config(**MOE), tmp_path / "q", kind="int4", shard_bytes=20_000)
    assert read_quantization(ckpt) == {"type": "int4", "group_size": 32,
                                       "embedding": {"type": "int8", "group_size": 32}}
    assert (ckpt / "model.safetensors.index.json").is_file()
    llm = lfm2.load(ckpt)
    w2 = llm.model.model.layers[1].feed_forward.experts[0].w2
    assert isinstance(w2, QuantLinear) and w2.kind == "int4"
    bound = 1 / w2.in_features**0.5  # the float checkpoint's uniform(-bound, bound)
    assert abs(w2.dequantize().std().item() / (bound / 3**0.5) - 1) < 0.1
    out = llm.model(torch.tensor([[5, 6, 7]]))
    assert torch.isfinite(out).all() and out.std() > 0.1


def test_streamed_quantization_of_shards_matches_quantizing_the_loaded_model(tmp_path):
    """`quantize_checkpoint` and `lfm2.load(quantize=)` read a sharded bfloat16 checkpoint tensor by tensor:
    byte for byte what quantizing the whole loaded model gives."""
    import torch

    import lfm2
    from lfm2.quant import quantize_checkpoint, quantize_model
    from lfm2.random_checkpoint import write_random_checkpoint

    ckpt = write_random_checkpoint(tiny_config(**MOE), tmp_path / "moe", shard_bytes=20_000)
    reference = quantize_model(lfm2.load(ckpt, dtype="bfloat16").model, "int4")
    quantize_checkpoint(ckpt, tmp_path / "int4", "int4")
    for model in (lfm2.load(tmp_path / "int4").model, lfm2.load(ckpt, quantize="int4").model):
        ref_state, state = reference.state_dict(), model.state_dict()
        assert ref_state.keys() == state.keys()
        for name, t in ref_state.items():
            assert torch.equal(state[name].to(t.dtype), t), name


def test_rows_that_do_not_fit_in_memory_are_left_out_with_a_note(tmp_path, monkeypatch):
    from lfm2 import bench
    from lfm2.quant import quantize_checkpoint

    ckpt = write_checkpoint(tmp_path / "m", tiny_config())
    quantize_checkpoint(ckpt, ckpt / "lfm2-int8", "int8")
    monkeypatch.setattr(bench, "memory_available", lambda: 600_000)  # float32 weights of tiny_config: ~0.5 MB
    notes: list[str] = []
    args = argparse.Namespace(precision="f32,int8", no_compile=True, no_transformers=False, no_llama=True)
    assert [row.label for row in bench.engines_for(ckpt, args, notes)] == ["lfm2 int8"]
    assert [n.split(" left out")[0] for n in notes if "left out" in n] == ["lfm2 float32", "transformers float32"]


def test_random_checkpoint_goes_int4_when_the_disk_lacks_room(tmp_path, monkeypatch, capsys):
    """Too little disk for the bfloat16 files: the int4 checkpoint is written directly, and said so; too little
    even for that: a clear error naming the sizes and what to do."""
    import shutil
    from collections import namedtuple

    from lfm2 import bench
    from lfm2.config import PRESETS
    from lfm2.errors import ConfigError
    from lfm2.quant import read_quantization

    monkeypatch.setitem(PRESETS, "tiny-moe", {**tiny_config(**MOE).__dict__})
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**12, 0, 2 * 10**9 + 200_000))  # int4 fits only
    notes: list[str] = []
    ckpt = bench.random_checkpoint("tiny-moe", tmp_path / "b", notes)
    assert ckpt == tmp_path / "b" / "lfm2-int4" and read_quantization(ckpt)["type"] == "int4"
    assert "would take" in notes[0] and "written directly" in notes[0] and "GB free" in notes[0]
    assert not (tmp_path / "b" / "config.json").exists()
    args = argparse.Namespace(precision=None, no_compile=True, no_transformers=False, no_llama=True)
    assert [row.label for row in bench.engines_for(ckpt, args)] == ["lfm2 int4"]
    assert bench.random_checkpoint("tiny-moe", tmp_path / "b", notes) == ckpt  # found again, not rewritten
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**12, 0, 10**6))
    with pytest.raises(ConfigError, match=r"needs 0\.0 GB even written as int4.*--dir"):
        bench.random_checkpoint("tiny-moe", tmp_path / "c", [])


def test_gguf_mode_with_a_missing_file_is_a_clear_error(tmp_path, capsys):
    """`lfm2 bench --gguf` on a file that is not there: one line naming it and what to give, exit 2, no traceback."""
    from lfm2.cli import main

    with pytest.raises(SystemExit) as e:
        main(["bench", "--gguf", str(tmp_path / "nope.gguf"), "--no-llama"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert err.startswith(f"lfm2: error: --gguf {tmp_path / 'nope.gguf'}: no such file")
    with pytest.raises(SystemExit) as e:
        main(["bench", "--gguf", str(tmp_path / "nope.gguf"), "--llama-bench", str(tmp_path / "llama-bench")])
    assert e.value.code == 2 and "no such file" in capsys.readouterr().err


def test_gguf_mode_rows_and_llama_bench_arguments(tmp_path, monkeypatch):
    """--gguf pairs lfm2 (as lfm2.load runs the file) with llama-bench on the same file; llama-bench's prefill
    and decode runs get the flags the docstring states, and its peak memory is /usr/bin/time's."""
    from lfm2 import bench
    from lfm2.gguf import export_gguf
    from lfm2.random_checkpoint import write_random_checkpoint

    ckpt = write_random_checkpoint(tiny_config(), tmp_path / "m")  # with a tokenizer, which a GGUF file needs
    gguf = export_gguf(ckpt, tmp_path / "m.gguf", "q4_0", progress=False)
    fake = tmp_path / "llama-bench"
    fake.write_text("#!/bin/sh\n")
    args = argparse.Namespace(gguf=gguf, no_compile=True, no_llama=False, llama_bench=str(fake), prompt=64, new=16,
                              threads=2)
    rows = bench.gguf_rows(gguf, args, [])
    assert [(r.label, r.engine, r.precision) for r in rows] == [
        ("lfm2 Q4_0", "lfm2-eager", "Q4_0"), ("llama.cpp Q4_0", "llama-bench", "Q4_0")]  # --no-compile
    assert rows[0].bytes_per_token == rows[1].bytes_per_token < gguf.stat().st_size
    calls = []

    class Done:
        returncode = 0

        def __init__(self, cmd):
            self.stdout = json.dumps([{"avg_ts": 100.0 if "-d" not in cmd else 20.0}])
            self.stderr = f"\tMaximum resident set size (kbytes): {1000 + len(calls)}\n"

    def fake_run(cmd, **kw):
        calls.append(cmd)
        return Done(cmd)

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    got = bench.run("llama-bench", gguf, args)
    assert calls[0][:3] == [bench.TIME, "-v", str(fake)]
    assert calls[0][3:] == ["-m", str(gguf), "-p", "64", "-n", "0", "-t", "2", "-r", "1", "-o", "json"]
    assert calls[1][5:11] == ["-p", "0", "-n", "16", "-d", "64"]
    assert got["prefill"] == 100.0 and got["decode"] == 20.0 and got["rss"] == 1002 * 1024


def test_compiled_and_eager_rows_beside_the_default(tmp_path):
    """`--compiled` / `--eager` add lfm2 rows through torch.compile / eager Python beside the default path (the
    fused step where it fits); `--no-compile` leaves one eager row."""
    from lfm2.bench import lfm2_rows

    both = argparse.Namespace(compiled=True, eager=True, no_compile=False)
    rows = lfm2_rows("lfm2 Q4_0", tmp_path, "int4", 1e9, both)
    assert [(r.label, r.engine) for r in rows] == [
        ("lfm2 Q4_0", "lfm2"), ("lfm2 Q4_0 compiled", "lfm2-compile"), ("lfm2 Q4_0 eager", "lfm2-eager")]
    none = argparse.Namespace(compiled=True, eager=True, no_compile=True)
    assert [r.engine for r in lfm2_rows("lfm2 Q4_0", tmp_path, "int4", 1e9, none)] == ["lfm2-eager"]
