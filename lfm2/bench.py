"""`lfm2 bench`: lfm2 against transformers and llama.cpp on the same random-weight checkpoint, or on a GGUF file.

    lfm2 bench --preset LFM2-350M [--rounds 2] [--prompt 512] [--new 128] [--threads 2]
    lfm2 bench --preset LFM2-8B-A1B --precision int4 --no-transformers --llama-bench PATH/llama-bench
    lfm2 bench --gguf model.gguf [--llama-bench PATH/llama-bench]

Each measurement runs in a fresh process (so peak resident memory is the engine's own), and the
engines are interleaved round by round (so a noisy machine hurts them alike). Every engine gets
the same prompt of random token ids and decodes greedily, ignoring end-of-text:
- prefill tokens/s = prompt tokens / time to first token, after a warm-up run on another prompt of the
  same length (as llama-bench warms up before it measures);
- decode tokens/s = (new tokens - 1) / (time after the first token);
- decode as a fraction of the memory-bandwidth limit = decode tokens/s x weight bytes read per
  token / the machine's measured read bandwidth (`torch.sum` over 1 GiB on 2 MiB huge pages; the
  4 KiB-page figure is printed beside it).
lfm2's rows run its default path: on the CPU, the fused decode step (`lfm2.step`: every block in one
C++ call) where it fits the model, else for a model of LFM2-350M's size or more `torch.compile`
(`lfm2.compile`), compiled at the first step, before the measurement; a compile time is printed
under the table. `--compiled` adds rows decoding through `torch.compile` (`compile=True`), `--eager`
rows decoding eagerly in Python (`compile=False`), and `--no-compile` makes lfm2's rows decode
eagerly instead.
Precisions are matched: lfm2 float32 and transformers float32 against llama.cpp F32, lfm2 int8
against Q8_0, lfm2 int4 against Q4_0; "vs lfm2" compares each row with lfm2 at its precision.
The random checkpoint is written once, in bfloat16 shards as Hugging Face publishes the models
(`lfm2.random_checkpoint`: tensor by tensor, so an 8B model never sits in memory); a model whose
bfloat16 files would not fit the disk (or exceed `DIRECT_INT4_BYTES`: LFM2-24B-A2B) is written as
an int4 checkpoint directly, and only its int4 rows run. lfm2's int8 / int4 checkpoints are written
once by `lfm2 quantize` (group size 32, the layout of Q8_0 / Q4_0) in a child process whose peak
memory is reported, llama.cpp's GGUF files by `lfm2 convert`. Rows whose weights would not fit in
the memory available are skipped, with a note.

llama.cpp runs through `llama-cpp-python` when it is installed (`pip install -e '.[llama]'`), or
through the `llama-bench` binary given with `--llama-bench`: prefill `-p N -n 0`, decode
`-p 0 -n M -d N` (decoding after N tokens of context, as the other engines do), one repetition
each after its warm-up, in two processes run under `/usr/bin/time -v`, whose "maximum resident set
size" is the row's peak memory (llama.cpp maps the file, so weights count once touched).

`--gguf FILE` benchmarks one GGUF file as a user would run it: `lfm2.load(FILE)` with no options
(the file's blocks as stored where lfm2 has kernels for them, see `lfm2.load`) beside llama.cpp.
The table is also drawn as a PNG (`--chart`, default `bench-<name>.png` in the bench's folder).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lfm2.errors import ConfigError

if TYPE_CHECKING:  # imported where used: `lfm2 bench --help` stays quick
    from lfm2.config import ModelConfig
    from lfm2.gguf import GGUFFile

# A bfloat16 checkpoint bigger than this is not written: the int4 one is, directly. LFM2-24B-A2B's is
# 48 GB (its int4 13.5 GB), more than most disks hold next to anything else; LFM2-8B-A1B's is 16.6 GB.
DIRECT_INT4_BYTES = 40 * 10**9
BYTES_PER_WEIGHT = {"f32": 4.0, "int8": 34 / 32, "int4": 18 / 32}  # of the blocks (scales included)
TIME = "/usr/bin/time"

CHILD = r"""
import json, sys, time
engine, path, prompt_len, new, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
import torch
torch.set_num_threads(threads)
g = torch.Generator().manual_seed(0)
prompt = torch.randint(100, 60000, (prompt_len,), generator=g).tolist()
stamps = []
compile_s = None
if engine.startswith("lfm2"):
    import lfm2
    llm = lfm2.load(path, compile={"lfm2": None, "lfm2-compile": True, "lfm2-eager": False}[engine])
    llm.prefix_cache.max_bytes = 0  # every run prefills its whole prompt
    params = llm.sampling_params(temperature=0, repetition_penalty=1.0, min_p=0.0)
    # First-use costs (kernels, compile, the first pass at the prompt's length), on other tokens: the warm-up
    # llama-bench runs before it measures.
    warm = torch.randint(100, 60000, (prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    list(llm.engine(1, prompt_len + 2).generate([warm], params, 2, ignore_eos=True))
    compiled = getattr(llm.model, "decode_step", None)
    if compiled is not None:
        if compiled.failed:
            raise SystemExit(f"compile failed: {compiled.failed}")
        compile_s = compiled.compile_seconds
    t0 = time.perf_counter()
    for _ in llm.engine(1, prompt_len + new).generate([prompt], params, new, ignore_eos=True):
        stamps.append(time.perf_counter() - t0)
elif engine == "transformers":
    import transformers
    from transformers.generation.streamers import BaseStreamer
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    class Clock(BaseStreamer):
        def __init__(self): self.calls = 0
        def put(self, value):
            self.calls += 1
            if self.calls > 1: stamps.append(time.perf_counter() - t0)
        def end(self): pass
    ids = torch.tensor([prompt])
    t0 = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                   do_sample=False, streamer=Clock(), pad_token_id=0)
else:
    import llama_cpp
    llm = llama_cpp.Llama(model_path=path, n_ctx=prompt_len + new + 8, n_threads=threads, n_batch=512,
                          verbose=False)
    t0 = time.perf_counter()
    for i, tok in enumerate(llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True)):
        stamps.append(time.perf_counter() - t0)
        if len(stamps) == new:
            break
ttft = stamps[0]
# VmHWM, not ru_maxrss: the latter survives exec and would start at the parent's size.
hwm = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
# Memory on 2 MiB pages (lfm2 asks for them for its weights; the kernel may not always grant them).
huge = sum(int(line.split()[1]) * 1024 for line in open("/proc/self/smaps_rollup") if line.startswith("AnonHugePages"))
print(json.dumps({"prefill": prompt_len / ttft, "decode": (len(stamps) - 1) / (stamps[-1] - ttft),
                  "ttft": ttft, "tokens": len(stamps), "rss": hwm, "huge_pages": huge, "compile_s": compile_s}))
"""


QUANTIZE_CHILD = r"""
import json, sys, time
from lfm2.quant import quantize_checkpoint
t = time.perf_counter()
quantize_checkpoint(sys.argv[1], sys.argv[2], sys.argv[3], 32)
hwm = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
print(json.dumps({"seconds": time.perf_counter() - t, "rss": hwm}))
"""


@dataclass
class Row:
    """One engine on one file: a row of the table."""

    label: str
    engine: str  # "lfm2" (its default path), "lfm2-eager", "lfm2-compile" (compile=True), "transformers",
    # "llama" (llama-cpp-python) or "llama-bench"
    path: Path
    precision: str  # rows of one precision are compared with each other
    bytes_per_token: float  # weight bytes a decode step reads (active experts only)


def random_checkpoint(preset_name: str, out: Path, notes: list[str] | None = None) -> Path:
    """Write (once) a random checkpoint of `preset_name` into `out` and return it: bfloat16 shards, or an int4
    checkpoint (in `out/lfm2-int4`) where bfloat16 files would not fit the disk (a note in `notes` says so;
    without `notes`, on stderr)."""
    if notes is None:
        said: list[str] = []
        path = random_checkpoint(preset_name, out, said)
        for note in said:
            print(note, file=sys.stderr)
        return path
    from lfm2.config import preset
    from lfm2.random_checkpoint import is_complete, write_random_checkpoint

    direct = out / "lfm2-int4"
    if is_complete(out):
        return out
    if is_complete(direct):
        notes.append(f"{preset_name}: the int4 checkpoint in {direct} was written directly (no bfloat16 copy); "
                     "only lfm2 int4 rows run")
        return direct
    config = preset(preset_name)
    total, embedding = parameter_counts(config)
    bf16, int4 = 2 * total, (total - embedding) * BYTES_PER_WEIGHT["int4"] + embedding * BYTES_PER_WEIGHT["int8"]
    where = next(p for p in (out, *out.parents) if p.exists())
    free = shutil.disk_usage(where).free
    margin = 2 * 10**9
    if bf16 <= DIRECT_INT4_BYTES and free >= bf16 + int4 + margin:
        print(f"writing a random {preset_name} checkpoint to {out} ({bf16 / 1e9:.1f} GB of bfloat16) ...",
              file=sys.stderr, flush=True)
        return write_random_checkpoint(config, out, verbose=True)
    if free < int4 + margin:
        raise ConfigError(f"{out}: a random {preset_name} checkpoint needs {int4 / 1e9:.1f} GB even written as int4, "
                          f"and the disk holding {where} has {free / 1e9:.1f} GB free; free some space or pass "
                          "--dir on a disk with more room")
    why = (f"more than {DIRECT_INT4_BYTES / 1e9:.0f} GB" if bf16 > DIRECT_INT4_BYTES
           else f"the disk holding {where} has {free / 1e9:.1f} GB free, and the bench needs room for the int4 "
                "copy too")
    notes.append(f"{preset_name}: its bfloat16 files would take {bf16 / 1e9:.1f} GB ({why}), so the int4 checkpoint "
                 f"({int4 / 1e9:.1f} GB, random int4 weights in lfm2's quantized format) was written directly to "
                 f"{direct}; only lfm2 int4 rows run")
    print(notes[-1], file=sys.stderr, flush=True)
    return write_random_checkpoint(config, direct, kind="int4", verbose=True)


def parameter_counts(config: ModelConfig) -> tuple[int, int]:
    """(parameters, of which the embedding) of a config, counted on the meta device."""
    from lfm2.models import build_model, count_parameters

    model = build_model(config)
    return count_parameters(model), model.model.embed_tokens.weight.numel()


def bandwidth_gbs() -> tuple[float, float]:
    """Read bandwidth of this machine in GB/s on 4 KiB pages and on 2 MiB huge pages (where lfm2's
    weights sit, see `lfm2.weights`): the best of a few sums over 1 GiB each. Streaming reads
    through 4 KiB pages pay TLB misses, so the huge-page figure is the machine's real limit."""
    import torch

    from lfm2.weights import huge_page_buffer

    def best(x: torch.Tensor) -> float:
        fastest = 0.0
        for _ in range(5):
            t = time.perf_counter()
            float(x.sum())
            fastest = max(fastest, x.numel() * 4 / (time.perf_counter() - t) / 1e9)
        return fastest

    plain = best(torch.ones(2**28))  # 1 GiB of float32
    return plain, best(huge_page_buffer(2**30).view(torch.float32).fill_(1.0))


def weight_bytes_per_token(ckpt: Path, bytes_per_weight: float) -> float:
    """Bytes of weights one decode step reads: every matrix once (the tied head included), active experts only."""
    from lfm2.config import ModelConfig
    from lfm2.models import build_model, count_parameters

    model = build_model(ModelConfig.from_json(ckpt / "config.json"))
    return count_parameters(model, active=True) * bytes_per_weight


def gguf_bytes_per_token(path: Path) -> float:
    """Bytes of a GGUF file's tensors one decode step reads: all of them, experts in the share a token uses."""
    from lfm2.gguf import GGUFFile, config_from_gguf

    f = GGUFFile(path)
    config = config_from_gguf(f)
    share = config.num_experts_per_tok / config.num_experts if config.is_moe else 1.0
    return sum(info.nbytes * (share if "_exps." in name else 1.0) for name, info in f.tensors.items())


def run(engine: str, path: Path, args: argparse.Namespace) -> dict:
    """One measurement in fresh processes: {"prefill", "decode" (tokens/s), "ttft" (s), "rss" (bytes), ...}."""
    if engine == "llama-bench":
        return run_llama_bench(Path(args.llama_bench), path, args)
    out = subprocess.run([sys.executable, "-c", CHILD, engine, str(path), str(args.prompt), str(args.new),
                          str(args.threads)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{engine} {path} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_llama_bench(binary: Path, path: Path, args: argparse.Namespace) -> dict:
    """llama.cpp's own benchmark on `path`: prefill and decode, each in a process under `/usr/bin/time -v`."""
    tests = {"prefill": ["-p", str(args.prompt), "-n", "0"],
             "decode": ["-p", "0", "-n", str(args.new), "-d", str(args.prompt)]}
    got: dict = {"tokens": args.new, "compile_s": None, "rss": 0}
    for test, flags in tests.items():
        cmd = [TIME, "-v", str(binary), "-m", str(path), *flags, "-t", str(args.threads), "-r", "1", "-o", "json"]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"llama-bench on {path} failed ({' '.join(cmd)}):\n{out.stderr[-2000:]}")
        got[test] = json.loads(out.stdout)[0]["avg_ts"]
        peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr)
        got["rss"] = max(got["rss"], int(peak.group(1)) * 1024 if peak else 0)
    got["ttft"] = args.prompt / got["prefill"]
    return got


def check_llama_bench(path: str) -> Path:
    """The `--llama-bench` binary, checked to exist and run, with `/usr/bin/time` to measure it."""
    binary = Path(path).expanduser()
    if not binary.is_file():
        raise ConfigError(f"--llama-bench {path}: no such file; give the path of llama.cpp's llama-bench binary "
                          "(build/bin/llama-bench in a llama.cpp build)")
    if not Path(TIME).is_file():
        raise ConfigError(f"--llama-bench needs {TIME} to measure llama-bench's peak memory; install it "
                          "(apt-get install time)")
    return binary


def quantize_measured(ckpt: Path, out: Path, kind: str, notes: list[str]) -> None:
    """`lfm2 quantize` ckpt into out in a child process, noting its time and peak memory against the output's size."""
    print(f"quantizing {ckpt} to {kind} in {out} ...", file=sys.stderr, flush=True)
    res = subprocess.run([sys.executable, "-c", QUANTIZE_CHILD, str(ckpt), str(out), kind], capture_output=True,
                         text=True)
    if res.returncode != 0:
        raise SystemExit(f"quantizing {ckpt} to {kind} failed:\n{res.stderr[-2000:]}")
    got = json.loads(res.stdout.strip().splitlines()[-1])
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    notes.append(f"`lfm2 quantize` to {kind}: {got['seconds']:.0f} s, peak resident memory "
                 f"{got['rss'] / 2**30:.2f} GiB = {got['rss'] / size:.2f}x the {kind} files' {size / 2**30:.2f} GiB "
                 "(VmHWM of the process)")
    print(notes[-1], file=sys.stderr, flush=True)


def memory_available() -> int:
    """MemAvailable of /proc/meminfo in bytes (what a new process can use without swapping), or 0 if unknown."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def engines_for(ckpt: Path, args: argparse.Namespace, notes: list[str] | None = None) -> list[Row]:
    """The rows of a preset's bench, writing missing files once; rows whose weights exceed the memory
    available are left out, with a note."""
    from lfm2.config import ModelConfig
    from lfm2.quant import read_quantization

    notes = [] if notes is None else notes
    wanted = set(args.precision.split(",")) if args.precision else {"f32", "int8", "int4"}
    config = ModelConfig.from_json(ckpt / "config.json")
    total, _ = parameter_counts(config)
    room = memory_available()

    def fits(label: str, precision: str) -> bool:
        need = total * BYTES_PER_WEIGHT[precision]
        if room and need > 0.9 * room:
            notes.append(f"{label} left out: its weights ({need / 2**30:.1f} GiB) exceed the memory available "
                         f"({room / 2**30:.1f} GiB)")
            return False
        return True

    if read_quantization(ckpt) is not None:  # written as int4 directly: nothing else to compare
        return lfm2_rows("lfm2 int4", ckpt, "int4", weight_bytes_per_token(ckpt, BYTES_PER_WEIGHT["int4"]), args)
    rows = []
    f32 = weight_bytes_per_token(ckpt, 4.0)
    if "f32" in wanted and fits("lfm2 float32", "f32"):
        rows += lfm2_rows("lfm2 float32", ckpt, "f32", f32, args)
    if not args.no_transformers and fits("transformers float32", "f32"):  # every precision's prefill reference
        rows.append(Row("transformers float32", "transformers", ckpt, "f32", f32))
    for kind in ("int8", "int4"):
        if kind not in wanted or not fits(f"lfm2 {kind}", kind):
            continue
        qdir = ckpt / f"lfm2-{kind}"
        if not (qdir / "config.json").is_file():
            quantize_measured(ckpt, qdir, kind, notes)
        rows += lfm2_rows(f"lfm2 {kind}", qdir, kind, weight_bytes_per_token(ckpt, BYTES_PER_WEIGHT[kind]), args)
    llama = llama_engine(args)
    if llama is not None:
        from lfm2.gguf import export_gguf

        for kind, precision in (("f32", "f32"), ("q8_0", "int8"), ("q4_0", "int4")):
            if precision not in wanted or not fits(f"llama.cpp {kind.upper()}", precision):
                continue
            gguf = ckpt / f"model-{kind}.gguf"
            if not gguf.is_file():
                print(f"converting {ckpt} to {gguf} ...", file=sys.stderr, flush=True)
                export_gguf(ckpt, gguf, kind, progress=False)
            rows.append(Row(f"llama.cpp {kind.upper()}", llama, gguf, precision,
                            weight_bytes_per_token(ckpt, BYTES_PER_WEIGHT[precision])))
    return rows


def lfm2_rows(label: str, path: Path, precision: str, per_token: float, args: argparse.Namespace) -> list[Row]:
    """lfm2's default path (eager with `--no-compile`), with `--compiled` the same through torch.compile, and with
    `--eager` the same decoding eagerly."""
    rows = [Row(label, "lfm2-eager" if args.no_compile else "lfm2", path, precision, per_token)]
    if getattr(args, "compiled", False) and not args.no_compile:
        rows.append(Row(f"{label} compiled", "lfm2-compile", path, precision, per_token))
    if getattr(args, "eager", False) and not args.no_compile:
        rows.append(Row(f"{label} eager", "lfm2-eager", path, precision, per_token))
    return rows


def llama_engine(args: argparse.Namespace) -> str | None:
    """How llama.cpp runs here: "llama-bench" (`--llama-bench`), "llama" (llama-cpp-python), or None."""
    if getattr(args, "no_llama", False):
        return None
    if getattr(args, "llama_bench", None):
        check_llama_bench(args.llama_bench)
        return "llama-bench"
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return None
    return "llama"


def gguf_rows(path: Path, args: argparse.Namespace, notes: list[str]) -> list[Row]:
    """The rows of `--gguf`: lfm2 as `lfm2.load(path)` runs the file, and llama.cpp on the same file.

    Weight bytes per token: a quantized file's own, for both engines (lfm2 runs Q4_0 / Q8_0 / K-quant blocks
    as stored; a block type it has no kernel for is requantized to int8, of about the same size), and for a
    float file lfm2's float32 against the file's F32 / F16 / BF16."""
    from lfm2.gguf import GGUFFile, config_from_gguf, native_format
    from lfm2.models import build_model, count_parameters

    if not path.is_file():
        raise ConfigError(f"--gguf {path}: no such file; give the path of a .gguf model file (e.g. one written by "
                          "`lfm2 convert DIR --to gguf --type q4_0 -o model.gguf`)")
    f = GGUFFile(path)
    kind = file_type(f)
    per_token = gguf_bytes_per_token(path)
    ours = per_token if native_format(f) else count_parameters(build_model(config_from_gguf(f)), active=True) * 4.0
    rows = lfm2_rows(f"lfm2 {kind}", path, kind, ours, args)
    llama = llama_engine(args)
    if llama is None:
        notes.append("no llama.cpp rows: install llama-cpp-python (pip install -e '.[llama]') or pass "
                     "--llama-bench PATH/llama-bench")
    else:
        rows.append(Row(f"llama.cpp {kind}", llama, path, kind, per_token))
    return rows


def file_type(f: GGUFFile) -> str:
    """A GGUF file's type as llama.cpp names it ("Q4_K_M", "Q4_0"), from `general.file_type`, else the block
    type holding most of its layers' bytes (a K-quant mix names itself only in the metadata)."""
    import gguf

    try:
        return gguf.LlamaFileType(f.metadata["general.file_type"]).name.removeprefix("MOSTLY_")
    except (KeyError, ValueError):
        sizes: dict[str, int] = {}
        for name, info in f.tensors.items():
            if name.startswith("blk."):
                sizes[info.type.name] = sizes.get(info.type.name, 0) + info.nbytes
        return max(sizes, key=sizes.get) if sizes else "?"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="lfm2 bench", description=__doc__.splitlines()[0])
    add_arguments(ap)
    bench(ap.parse_args(argv))


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--preset", default="LFM2-350M", help="the model shape to write random weights of")
    ap.add_argument("--gguf", type=Path, default=None, metavar="FILE",
                    help="benchmark this GGUF file instead: lfm2.load(FILE) beside llama.cpp on the same file")
    ap.add_argument("--dir", type=Path, default=None,
                    help="where the random checkpoint and its copies are kept (default: TMPDIR/lfm2-serve-PRESET)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the table shows medians")
    ap.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    ap.add_argument("--new", type=int, default=128, help="tokens to decode")
    ap.add_argument("--threads", type=int, default=2, help="threads of every engine")
    ap.add_argument("--no-llama", action="store_true", help="skip the llama.cpp rows")
    ap.add_argument("--llama-bench", default=None, metavar="PATH",
                    help="run llama.cpp through this llama-bench binary (default: llama-cpp-python if installed)")
    ap.add_argument("--no-transformers", action="store_true", help="skip the transformers row")
    ap.add_argument("--no-compile", action="store_true",
                    help="lfm2's rows decode eagerly in Python (by default: the fused step where it fits, else "
                         "torch.compile for real-size models)")
    ap.add_argument("--compiled", action="store_true", help="add lfm2 rows decoding through torch.compile")
    ap.add_argument("--eager", action="store_true", help="add lfm2 rows decoding eagerly in Python")
    ap.add_argument("--precision", default=None, metavar="LIST",
                    help="only these precisions, comma-separated from f32,int8,int4 (default: all); "
                         "transformers float32 stays unless --no-transformers")
    ap.add_argument("--chart", type=Path, default=None, metavar="PATH",
                    help="where to draw the table as a PNG (default: bench-<preset or file>.png in the bench's "
                         "folder, --dir; for --gguf, TMPDIR)")


def bench(args: argparse.Namespace) -> None:
    if args.precision and not set(args.precision.split(",")) <= {"f32", "int8", "int4"}:
        raise SystemExit(f"--precision {args.precision!r}: choose from f32, int8, int4 (comma-separated)")
    notes: list[str] = []
    if getattr(args, "gguf", None) is not None:
        rows = gguf_rows(args.gguf, args, notes)
        name = args.gguf.name
        chart = args.chart or Path(tempfile.gettempdir()) / f"bench-{args.gguf.stem}.png"
    else:
        folder = args.dir or Path(tempfile.gettempdir()) / f"lfm2-serve-{args.preset}"
        ckpt = random_checkpoint(args.preset, folder, notes)
        rows = engines_for(ckpt, args, notes)
        name = f"{args.preset} (random weights)"
        chart = getattr(args, "chart", None) or folder / f"bench-{args.preset}.png"
    if not rows:
        raise SystemExit("no rows to run: " + "; ".join(notes))
    results: dict[str, list[dict]] = {row.label: [] for row in rows}
    for r in range(args.rounds):
        for row in rows:
            results[row.label].append(run(row.engine, row.path, args))
            print(f"round {r + 1}: {row.label}: {results[row.label][-1]}", file=sys.stderr, flush=True)
    bw_plain, bw = bandwidth_gbs()
    bw = max(bw, bw_plain)
    title = (f"{name}, prompt {args.prompt} tokens, {args.new} new tokens, {args.threads} threads, median of "
             f"{args.rounds} interleaved rounds; read bandwidth {bw:.1f} GB/s")
    bars = report(rows, results, bw, bw_plain, title, notes)
    from lfm2.bench_chart import write_chart

    print(f"\nchart: {write_chart(chart, bars, title)}")


def report(rows: list[Row], results: dict[str, list[dict]], bw: float, bw_plain: float, title: str,
           notes: list[str]) -> list:
    """Print the table, the per-round ratios and the notes; return the chart's bars."""
    from lfm2.bench_chart import Bar

    def med(label: str, key: str) -> float:
        return statistics.median(x[key] for x in results[label])

    # "vs lfm2": against lfm2's default row at the same precision (or its eager row, or the row itself)
    base = {row.precision: row.label for row in rows if not row.engine.startswith("lfm2")}
    base.update({row.precision: row.label for row in rows if row.engine.startswith("lfm2")})
    base.update({row.precision: row.label for row in rows if row.engine.startswith("lfm2") and
                 not row.label.endswith(" eager")})
    print(f"\n{title} ({bw_plain:.1f} GB/s on 4 KiB pages); 'vs lfm2' = this row / lfm2 at the same precision\n")
    print("| engine | prefill tok/s | vs lfm2 | decode tok/s | vs lfm2 | TTFT | peak RSS | decode / bandwidth limit |")
    print("|---|---|---|---|---|---|---|---|")
    bars = []
    for row in rows:
        pre, dec = med(row.label, "prefill"), med(row.label, "decode")
        ref = base[row.precision]
        limit = bw * 1e9 / row.bytes_per_token
        print(f"| {row.label} | {pre:.1f} | {pre / med(ref, 'prefill'):.2f}x | {dec:.{1 if dec >= 10 else 2}f} | "
              f"{dec / med(ref, 'decode'):.2f}x | {med(row.label, 'ttft') * 1000:.0f} ms | "
              f"{med(row.label, 'rss') / 2**30:.2f} GiB | {dec / limit:.0%} of {limit:.0f} tok/s |")
        engine = row.label.split(" ")[0] + (" eager" if row.label.endswith(" eager") else "")
        bars.append(Bar(row.label, engine, row.precision, pre, dec, limit))
    print("\ndecode per round, lfm2 / the other engine at the same precision (each round runs the engines "
          "one after another, so the machine's slower drift cancels in these ratios better than in the medians):")
    for row in rows:
        if not row.engine.startswith("lfm2"):
            continue
        for other in rows:
            if other.engine.startswith("lfm2") or other.precision != row.precision:
                continue
            ratios = [a["decode"] / b["decode"] for a, b in zip(results[row.label], results[other.label], strict=True)]
            print(f"- {row.label} / {other.label}: " + ", ".join(f"{r:.2f}" for r in ratios)
                  + f" (median {statistics.median(ratios):.2f}x)")
    compiled = [(row.label, [x["compile_s"] for x in results[row.label]]) for row in rows
                if row.engine.startswith("lfm2") and all(x["compile_s"] is not None for x in results[row.label])]
    if compiled:
        print("\ncompile time of the decode step, per round (at the first step, before the measurement; the first "
              "compile of a model fills inductor's on-disk cache, which later processes read): "
              + ", ".join(f"{label} " + " / ".join(f"{s:.0f}" for s in secs) + " s" for label, secs in compiled))
    if any(row.engine == "llama-bench" for row in rows):
        print("\nllama.cpp ran as llama-bench (prefill -p N -n 0, decode -p 0 -n M -d N, 1 repetition after its "
              "warm-up); its peak RSS is /usr/bin/time's maximum resident set size of the larger of the two runs")
    for note in notes:
        print(f"\nnote: {note}")
    return bars


if __name__ == "__main__":
    main()
