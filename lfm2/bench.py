"""`lfm2 bench`: lfm2 against transformers and llama.cpp on the same random-weight checkpoint.

    lfm2 bench --preset LFM2-350M [--rounds 2] [--prompt 512] [--new 128] [--threads 2]

Each measurement runs in a fresh process (so peak resident memory is the engine's own), and the
engines are interleaved round by round (so a noisy machine hurts them alike). Every engine gets
the same prompt of random token ids and decodes greedily, ignoring end-of-text:
- prefill tokens/s = prompt tokens / time to first token;
- decode tokens/s = (new tokens - 1) / (time after the first token);
- decode as a fraction of the memory-bandwidth limit = decode tokens/s x weight bytes read per
  token / the machine's measured read bandwidth (`torch.sum` over 1 GiB on 2 MiB huge pages; the
  4 KiB-page figure is printed beside it).
Rows marked "+compile" decode through `torch.compile` (`lfm2.compile`; `--no-compile` skips them),
with the compile time printed under the table.
Precisions are matched: lfm2 float32 and transformers float32 against llama.cpp F32, lfm2 int8
against Q8_0, lfm2 int4 against Q4_0; "vs lfm2" compares each row with lfm2 at its precision.
lfm2's int8 / int4 checkpoints are written once by `lfm2 quantize` (group size 32, the layout of
Q8_0 / Q4_0), llama.cpp's GGUF files by `lfm2 convert`. llama.cpp rows appear when
`llama-cpp-python` is installed (`pip install -e '.[llama]'`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the quick brown fox jumps over a lazy dog while liquid models run fast on small devices and "
         "numbers like 12345 or 3.14159 appear in text").split()

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
    llm = lfm2.load(path, compile=engine == "lfm2-compile")
    llm.prefix_cache.max_bytes = 0  # every run prefills its whole prompt
    params = llm.sampling_params(temperature=0, repetition_penalty=1.0, min_p=0.0)
    t = time.perf_counter()
    list(llm.engine(1, 10).generate([prompt[:8]], params, 2, ignore_eos=True))  # first-use costs (kernels, compile)
    compiled = getattr(llm.model, "decode_step", None)
    if compiled is not None:
        if compiled.failed:
            raise SystemExit(f"compile failed: {compiled.failed}")
        compile_s = time.perf_counter() - t
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


def random_checkpoint(preset_name: str, out: Path) -> Path:
    """Write (once) a random float32 checkpoint of `preset_name` with a tokenizer covering its vocabulary."""
    if (out / "model.safetensors").is_file():
        return out
    import torch
    from tokenizers import Tokenizer as HFTokenizer

    from lfm2.config import preset
    from lfm2.files import atomic_write
    from lfm2.models import build_model
    from lfm2.train.tokenizer import train_tokenizer
    from lfm2.weights import save_checkpoint

    config = preset(preset_name)
    print(f"writing a random {preset_name} checkpoint to {out} ...", file=sys.stderr, flush=True)
    corpus = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(40)) for i in range(200)]
    train_tokenizer(corpus, vocab_size=1000, out_dir=out)
    tok = HFTokenizer.from_file(str(out / "tokenizer.json"))
    tok.add_tokens([f"<t{i}>" for i in range(tok.get_vocab_size(), config.vocab_size)])
    atomic_write(out / "tokenizer.json", tok.to_str(pretty=True))
    torch.manual_seed(0)
    save_checkpoint(build_model(config, device="cpu"), out)
    return out


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
    """Bytes of weights one decode step reads: every matrix once (the tied head included)."""
    from lfm2.config import ModelConfig
    from lfm2.models import build_model, count_parameters

    model = build_model(ModelConfig.from_json(ckpt / "config.json"))
    return count_parameters(model, active=True) * bytes_per_weight


def run(engine: str, path: Path, args: argparse.Namespace) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, engine, str(path), str(args.prompt), str(args.new),
                          str(args.threads)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{engine} {path} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def engines_for(ckpt: Path, args: argparse.Namespace) -> list[tuple[str, str, Path, float, str]]:
    """(label, engine, path, bytes per weight, precision) of every row, writing missing files once."""
    from lfm2.quant import quantize_checkpoint

    wanted = set(args.precision.split(",")) if args.precision else {"f32", "int8", "int4"}
    rows = []
    if "f32" in wanted:
        rows.append(("lfm2 float32", "lfm2", ckpt, 4.0, "f32"))
        if not args.no_compile:
            rows.append(("lfm2 float32 +compile", "lfm2-compile", ckpt, 4.0, "f32"))
    if not args.no_transformers:  # the reference of every precision's prefill target
        rows.append(("transformers float32", "transformers", ckpt, 4.0, "f32"))
    for kind, bpw in (("int8", 34 / 32), ("int4", 18 / 32)):
        if kind not in wanted:
            continue
        qdir = ckpt / f"lfm2-{kind}"
        if not (qdir / "config.json").is_file():
            quantize_checkpoint(ckpt, qdir, kind, 32)
        rows.append((f"lfm2 {kind}", "lfm2", qdir, bpw, kind))
        if not args.no_compile:
            rows.append((f"lfm2 {kind} +compile", "lfm2-compile", qdir, bpw, kind))
    try:
        import llama_cpp  # noqa: F401

        have_llama = not args.no_llama
    except ImportError:
        have_llama = False
    if have_llama:
        from lfm2.gguf import export_gguf

        for kind, bpw, precision in (("f32", 4.0, "f32"), ("q8_0", 34 / 32, "int8"), ("q4_0", 18 / 32, "int4")):
            if precision not in wanted:
                continue
            gguf = ckpt / f"model-{kind}.gguf"
            if not gguf.is_file():
                export_gguf(ckpt, gguf, kind, progress=False)
            rows.append((f"llama.cpp {kind.upper()}", "llama", gguf, bpw, precision))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="lfm2 bench", description=__doc__.splitlines()[0])
    add_arguments(ap)
    bench(ap.parse_args(argv))


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--preset", default="LFM2-350M")
    ap.add_argument("--dir", type=Path, default=None, help="where the random checkpoint and its copies are kept")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-llama", action="store_true")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="skip the rows with a torch.compile'd decode step")
    ap.add_argument("--precision", default=None, metavar="LIST",
                    help="only these precisions, comma-separated from f32,int8,int4 (default: all); "
                         "transformers float32 stays unless --no-transformers")


def bench(args: argparse.Namespace) -> None:
    if args.precision and not set(args.precision.split(",")) <= {"f32", "int8", "int4"}:
        raise SystemExit(f"--precision {args.precision!r}: choose from f32, int8, int4 (comma-separated)")
    ckpt = random_checkpoint(args.preset, args.dir or Path(tempfile.gettempdir()) / f"lfm2-serve-{args.preset}")
    engines = engines_for(ckpt, args)
    results: dict[str, list[dict]] = {label: [] for label, *_ in engines}
    for r in range(args.rounds):
        for label, engine, path, _, _ in engines:
            results[label].append(run(engine, path, args))
            print(f"round {r + 1}: {label}: {results[label][-1]}", file=sys.stderr, flush=True)
    bw_plain, bw = bandwidth_gbs()
    bw = max(bw, bw_plain)

    def med(label: str, key: str) -> float:
        return statistics.median(x[key] for x in results[label])

    # "vs lfm2": against eager lfm2 at the same precision (or its compiled row, or the row itself)
    base = {precision: label for label, engine, _, _, precision in engines if not engine.startswith("lfm2")}
    base.update({precision: label for label, engine, _, _, precision in engines if engine == "lfm2-compile"})
    base.update({precision: label for label, engine, _, _, precision in engines if engine == "lfm2"})
    print(f"\n{args.preset} (random weights), prompt {args.prompt} tokens, {args.new} new tokens, "
          f"{args.threads} threads, median of {args.rounds} interleaved rounds; read bandwidth {bw:.1f} GB/s "
          f"({bw_plain:.1f} GB/s on 4 KiB pages); "
          "'vs lfm2' = this row / lfm2 at the same precision\n")
    print("| engine | prefill tok/s | vs lfm2 | decode tok/s | vs lfm2 | TTFT | peak RSS | decode / bandwidth limit |")
    print("|---|---|---|---|---|---|---|---|")
    for label, _, _, bpw, precision in engines:
        pre, dec = med(label, "prefill"), med(label, "decode")
        ref = base[precision]
        limit = bw * 1e9 / weight_bytes_per_token(ckpt, bpw)
        print(f"| {label} | {pre:.1f} | {pre / med(ref, 'prefill'):.2f}x | {dec:.1f} | {dec / med(ref, 'decode'):.2f}x "
              f"| {med(label, 'ttft') * 1000:.0f} ms | {med(label, 'rss') / 2**30:.2f} GiB | "
              f"{dec / limit:.0%} of {limit:.0f} tok/s |")
    print("\ndecode per round, lfm2 / the other engine at the same precision (each round runs the engines "
          "one after another, so the machine's slower drift cancels in these ratios better than in the medians):")
    for label, engine, _, _, precision in engines:
        if not engine.startswith("lfm2"):
            continue
        for other, other_engine, _, _, other_precision in engines:
            if other_engine.startswith("lfm2") or other_precision != precision:
                continue
            ratios = [a["decode"] / b["decode"] for a, b in zip(results[label], results[other], strict=True)]
            print(f"- {label} / {other}: " + ", ".join(f"{r:.2f}" for r in ratios)
                  + f" (median {statistics.median(ratios):.2f}x)")
    compiled = [(label, med(label, "compile_s")) for label, engine, *_ in engines if engine == "lfm2-compile"]
    if compiled:
        print("\ncompile time of the decode step (first call, in the measured process; inductor's on-disk cache "
              "shortens later runs): " + ", ".join(f"{label} {s:.0f} s" for label, s in compiled))


if __name__ == "__main__":
    main()
