"""Peak resident memory of `lfm2.load` on a random-weight checkpoint, relative to its size.

    python benchmarks/load_memory.py --preset LFM2-1.2B [--dir /tmp/lfm2-1.2b-random]

Writes the random float32 checkpoint once (reused on later runs), then loads it in a fresh
process, runs one forward pass (so every weight page is really read) and prints the peak RSS.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from lfm2.config import preset
from lfm2.models import build_model
from lfm2.weights import save_checkpoint

CHILD = """
import json, sys, time, torch
import lfm2
t = time.perf_counter()
llm = lfm2.load(sys.argv[1])
load_s = time.perf_counter() - t
with torch.no_grad():
    llm.model(torch.tensor([[1, 2, 3]]))
# VmHWM, not ru_maxrss: the latter survives exec and would start at the parent's size.
hwm = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
print(json.dumps({"load_s": load_s, "peak_rss": hwm}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="LFM2-1.2B")
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    out = args.dir or Path("/tmp") / f"lfm2-random-{args.preset}"
    if not (out / "model.safetensors").is_file():
        print(f"writing a random {args.preset} checkpoint to {out} ...", flush=True)
        torch.manual_seed(0)
        model = build_model(preset(args.preset), device="cpu")
        save_checkpoint(model, out)
        del model
    size = (out / "model.safetensors").stat().st_size
    res = json.loads(subprocess.run([sys.executable, "-c", CHILD, str(out)], check=True,
                                    capture_output=True, text=True).stdout.strip().splitlines()[-1])
    print("| checkpoint | file size | peak RSS (load + 1 forward) | ratio | load time |")
    print("|---|---|---|---|---|")
    print(f"| {args.preset} float32 | {size / 2**30:.2f} GiB | {res['peak_rss'] / 2**30:.2f} GiB | "
          f"{res['peak_rss'] / size:.2f}x | {res['load_s']:.1f} s |")


if __name__ == "__main__":
    main()
