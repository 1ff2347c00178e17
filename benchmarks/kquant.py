"""K-quant GGUF files as users download them (Q4_K_M, Q6_K), lfm2 beside llama.cpp on the same file.

    python benchmarks/kquant.py --llama-bench PATH/llama-bench FILE.gguf [FILE.gguf ...] [--rounds 2]

For each file, interleaved `--rounds` times: llama.cpp's `llama-bench` decode (`-p 0 -n N`, 2
threads), lfm2 as a user loads it (`lfm2.load(FILE)`, no flags: Q4_K / Q5_K / Q6_K matrices run as
the file stores them, `lfm2.kquant`), lfm2 with every matrix requantized to int8 (`quantize="int8"`,
what loading did by default before the K-quant kernels) and dequantized to float32
(`quantize="none"`), each decoding N tokens after a short prompt through `LLM.generate`. Also each
lfm2 load's peak resident memory (a child process per load). Medians of decode tokens/s.
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
        llama: list[float] = []
        runs: dict[str, list[float]] = {"default": [], "int8": [], "none": []}
        peak: dict[str, float] = {}
        for _ in range(args.rounds):
            llama.append(llama_run(args.llama_bench, path, args.new))
            for quantize, rounds in runs.items():
                r = lfm2_run(path, quantize, args.new)
                rounds.append(r["decode"])
                peak[quantize] = r["peak_mib"]
        name = re.sub(r".*/", "", path)
        m = statistics.median
        cells = [f"lfm2 {q} {m(r):.1f} ({m(r) / m(llama):.2f}x, peak {peak[q]:.0f} MiB, rounds "
                 f"{[round(x, 1) for x in r]})" for q, r in runs.items()]
        print(f"{name}: llama.cpp {m(llama):.1f} tok/s (rounds {[round(x, 1) for x in llama]}); " + "; ".join(cells))


if __name__ == "__main__":
    main()
