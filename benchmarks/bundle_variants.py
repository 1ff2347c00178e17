"""Variants of the bundled model's recipe, trained side by side and compared in one table.

    python -m lfm2.train.bundle --out runs/tiny --data-only        # once, on any machine (about 10 minutes)
    python benchmarks/bundle_variants.py --data runs/tiny/data --out runs/variants --device cuda \\
        --variant base --variant "pre48 pretrain_steps=3000" \\
        --variant "h8 model.num_attention_heads=8 model.num_key_value_heads=4"

Each variant is `lfm2.train.bundle.build` with the named `BundleConfig` fields changed (values are
JSON; `model.X` sets a model field), run in its own process from the same data files (a finished
data step: tokenizer and token files; variants that change the data's fields need their own). To
carry the data to another machine, leave out `copy*` (random tokens, which barely compress) and
run `python -m lfm2.train.bundle --out DIR --data-only` there: it makes them again, without the corpus. All
run at once: a small model leaves one GPU mostly idle, so eight share an H200 at 8-18 steps per
second each (2026-11-26). `--deadline` stops the runs still going after that many seconds, so that
a time-limited machine still reports the finished ones. The table: strict held-out tool calls (each
tool chosen by its whole name) over `--prompts` prompts per seed (right tool / right tool and
arguments), unconstrained on the recipe's 200, the held-out corpus perplexity, the copying loss of the
final model and the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SEEDS = (12345, 777)  # held-out prompt seeds; the recipe's own evaluation uses its seed + HELDOUT_SEED


def parse_variant(text: str) -> tuple[str, dict[str, object]]:
    """'NAME key=json ...' -> (NAME, {key: value})."""
    name, *pairs = text.split()
    fields = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            sys.exit(f"variant {name!r}: {pair!r} is not key=value")
        try:
            fields[key] = json.loads(value)
        except json.JSONDecodeError:
            sys.exit(f"variant {name!r}: the value of {key} is not JSON: {value!r}")
    return name, fields


def run_one(name: str, fields: dict[str, object], data: Path, out: Path, device: str, threads: int,
            prompts: int) -> None:
    """Build one variant and score it on every seed's held-out prompts; writes OUT/NAME/result.json."""
    import torch

    import lfm2
    from lfm2.train.bundle import HELDOUT_SEED, BundleConfig, build, heldout_prompts, tool_call_scores

    torch.set_num_threads(threads)
    run = out / name
    run.mkdir(parents=True, exist_ok=True)
    if not (run / "data").exists():
        (run / "data").symlink_to(data.resolve(), target_is_directory=True)
    cfg = BundleConfig(out=str(run), device=device)
    for key, value in fields.items():
        if key.startswith("model."):
            cfg.model[key[len("model."):]] = value
        elif key in cfg.__dataclass_fields__:
            setattr(cfg, key, value)
        else:
            sys.exit(f"variant {name!r}: BundleConfig has no field {key!r}")
    start = time.time()
    model_dir = build(cfg)
    result = json.loads((model_dir / "eval.json").read_text())
    llm = lfm2.load(model_dir)
    strict = {}
    for seed in SEEDS:
        if seed == cfg.seed + HELDOUT_SEED and cfg.eval_prompts == prompts:  # scored by the recipe's evaluation
            strict[seed] = (result["strict_right_tool"], result["strict_right_tool_and_arguments"])
        else:
            strict[seed] = tool_call_scores(llm, heldout_prompts(prompts, seed), True)
    result.update(name=name, fields=fields, wall_s=time.time() - start, strict_by_seed=strict, prompts=prompts)
    (run / "result.json").write_text(json.dumps(result, indent=1) + "\n")


def table(results: list[dict]) -> str:
    head = (f"{'variant':28s} {'strict tool':>12s} {'+ args':>8s} {'unconstr.':>10s} {'+ args':>7s} "
            f"{'ppl':>6s} {'copy':>5s} {'wall s':>7s}")
    rows = [head, "-" * len(head)]
    for r in sorted(results, key=lambda r: -sum(a for _, a in r["strict_by_seed"].values())):
        n = r["prompts"] * len(r["strict_by_seed"])
        tool = round(sum(t for t, _ in r["strict_by_seed"].values()) * r["prompts"])
        args = round(sum(a for _, a in r["strict_by_seed"].values()) * r["prompts"])
        rows.append(f"{r['name']:28s} {f'{tool}/{n}':>12s} {args:>8d} {r['right_tool']:>10.1%} "
                    f"{r['right_tool_and_arguments']:>7.1%} {r['heldout_corpus_perplexity']:>6.1f} "
                    f"{r['copy_loss']:>5.2f} {r['wall_s']:>7.0f}")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, type=Path, help="a finished data step's directory")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--variant", action="append", required=True, help="'NAME key=json ...' (repeat)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads per variant")
    ap.add_argument("--deadline", type=float, default=0, help="seconds; 0: none")
    ap.add_argument("--prompts", type=int, default=200, help="held-out prompts per seed, strict calls")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # a child process: run this variant only
    args = ap.parse_args()
    if not (args.data / "copy_val.json").is_file():
        sys.exit(f"{args.data}: no finished data step here (run `python -m lfm2.train.bundle --out DIR --data-only`)")
    variants = dict(map(parse_variant, args.variant))
    if args.one:
        run_one(args.one, variants[args.one], args.data, args.out, args.device, args.threads, args.prompts)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    procs = {}
    for name in variants:
        log = open(args.out / f"{name}.log", "w")
        cmd = [sys.executable, __file__, "--one", name, *sys.argv[1:]]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    start = time.time()
    while any(p.poll() is None for p in procs.values()):
        time.sleep(5)
        if args.deadline and time.time() - start > args.deadline:
            for name, p in procs.items():
                if p.poll() is None:
                    p.kill()
                    print(f"{name}: stopped at the deadline (log: {args.out / name}.log)")
            break
    results = []
    for name, p in procs.items():
        path = args.out / name / "result.json"
        if path.is_file():
            results.append(json.loads(path.read_text()))
        elif p.returncode not in (None, -9):
            print(f"{name}: failed (exit {p.returncode}); see {args.out / name}.log")
    print(table(results) if results else "no variant finished")


if __name__ == "__main__":
    main()
