"""Peak memory of a loaded (quantized) model against its weight bytes plus its caches.

    python benchmarks/quant_memory.py [--preset LFM2-350M] [--prompt 512] [--new 128]

The CPU-performance issue's target: the peak resident memory of a loaded int4 LFM2-350M is at
most 1.5x its weight bytes plus the caches. Each format runs in a fresh process that first
imports torch and lfm2 and builds our kernels (the baseline: what any process that runs a
model holds), then loads the checkpoint (`lfm2.load`: tokenizer included), prefills a prompt
and decodes greedily, exactly as `lfm2 bench` does; the peak (VmHWM) above the baseline is
compared with the model's parameter and buffer bytes plus the bytes of the cache it decodes
with. Checkpoints are the random-weight ones `lfm2 bench` writes (reused).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from lfm2.bench import random_checkpoint

CHILD = r"""
import json, sys, torch
prompt_len, new = int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(2)
import lfm2, lfm2.kernels
lfm2.kernels.ops()
def status(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024
base = status("VmRSS")
llm = lfm2.load(sys.argv[1])
loaded = status("VmRSS") - base
prompt = torch.randint(100, 60000, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
params = llm.sampling_params(temperature=0, repetition_penalty=1.0, min_p=0.0)
for _ in llm.engine(1, prompt_len + new).generate([prompt], params, new, ignore_eos=True):
    pass
model = llm.model
weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
cache = model.make_cache(1, prompt_len + new)
cache_bytes = sum(t.numel() * t.element_size() for d in (cache.keys, cache.values, cache.conv) for t in d.values())
print(json.dumps({"baseline": base, "loaded": loaded, "peak": status("VmHWM") - base, "steady": status("VmRSS") - base,
                  "weights": weights, "cache": cache_bytes}))
"""


def measure(path: Path, prompt: int, new: int) -> dict:
    cmd = [sys.executable, "-c", CHILD, str(path), str(prompt), str(new)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{path} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="LFM2-350M")
    ap.add_argument("--dir", type=Path, default=None, help="where the random checkpoint and its copies are kept")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=128)
    args = ap.parse_args()
    from lfm2.quant import quantize_checkpoint

    ckpt = random_checkpoint(args.preset, args.dir or Path("/tmp") / f"lfm2-serve-{args.preset}")
    rows = [("float32", ckpt)]
    for kind in ("int8", "int4"):
        qdir = ckpt / f"lfm2-{kind}"
        if not (qdir / "config.json").is_file():
            quantize_checkpoint(ckpt, qdir, kind, 32)
        rows.append((kind, qdir))
    mib = 2**20
    print(f"\n{args.preset} (random weights), prompt {args.prompt} + {args.new} new tokens; memory above a process "
          "with torch, lfm2 and its kernels loaded\n")
    print("| format | weights | cache | after load | peak | steady | peak / (weights + cache) |")
    print("|---|---|---|---|---|---|---|")
    for label, path in rows:
        r = measure(path, args.prompt, args.new)
        need = r["weights"] + r["cache"]
        print(f"| {label} | {r['weights'] / mib:.0f} MiB | {r['cache'] / mib:.1f} MiB | {r['loaded'] / mib:.0f} MiB "
              f"| {r['peak'] / mib:.0f} MiB | {r['steady'] / mib:.0f} MiB | {r['peak'] / need:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
