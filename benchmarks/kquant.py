"""K-quant GGUF files as users download them (Q4_K_M, Q6_K), lfm2 beside llama.cpp on the same file.

    python benchmarks/kquant.py --llama-bench PATH/llama-bench FILE.gguf [FILE.gguf ...] [--rounds 2]

For each file, interleaved `--rounds` times: llama.cpp's `llama-bench` decode (`-p 0 -n N`, 2
threads), lfm2 as a user loads it (`lfm2.load(FILE)`, no flags: a K-quant file runs as int8 layers,
see `lfm2.gguf.native_format`) and lfm2 dequantized to float32 (`quantize="none"`, what loading did
before), each decoding N tokens after a short prompt through `LLM.generate`. Also each lfm2 load's
peak resident memory (a child process per load). Medians of decode tokens/s.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys

CHILD = """
import json, resource, sys, lfm2
path, quantize, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
llm = lfm2.load(path, quantize=None if quantize == "default" else quantize)
llm.generate("The quick brown fox", max_new_tokens=8, temperature=0, ignore_eos=True)
llm.generate("The quick brown fox", max_new_tokens=n, temperature=0, ignore_eos=True)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"decode": llm.last_stats[0].decode_tokens_per_s, "peak_mib": rss}))
"""


def lfm2_run(path: str, quantize: str, n: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, path, quantize, str(n)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def llama_run(bench: str, path: str, n: int) -> float:
    out = subprocess.run([bench, "-m", path, "-p", "0", "-n", str(n), "-t", "2", "-o", "json"], capture_output=True,
                         text=True, check=True)
    rows = json.loads(out.stdout)
    return float(rows[0]["avg_ts"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--llama-bench", required=True)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--new", type=int, default=64)
    args = ap.parse_args()
    for path in args.files:
        llama, ours, floats, peak = [], [], [], {}
        for _ in range(args.rounds):
            llama.append(llama_run(args.llama_bench, path, args.new))
            r = lfm2_run(path, "default", args.new)
            ours.append(r["decode"])
            peak["default"] = r["peak_mib"]
            r = lfm2_run(path, "none", args.new)
            floats.append(r["decode"])
            peak["none"] = r["peak_mib"]
        name = re.sub(r".*/", "", path)
        m = statistics.median
        print(f"{name}: llama.cpp {m(llama):.1f} tok/s; lfm2 default {m(ours):.1f} ({m(ours) / m(llama):.2f}x, "
              f"peak {peak['default']:.0f} MiB); lfm2 float32 {m(floats):.1f} ({m(floats) / m(llama):.2f}x, peak "
              f"{peak['none']:.0f} MiB); rounds: llama {llama}, default {[round(x, 1) for x in ours]}, "
              f"float {[round(x, 1) for x in floats]}")


if __name__ == "__main__":
    main()
