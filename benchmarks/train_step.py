"""A training step with the logits of every position against the logits of target positions only.

    python benchmarks/train_step.py [--batch 12] [--seq 768] [--targets 0.2] [--steps 6]

Fine-tuning trains on the assistant's tokens, about a fifth of a packed row in the bundled model's
recipe, yet a head over the whole row costs a (tokens x vocabulary) matmul, its float32 copy and a
softmax over every position. `lfm2.train.trainer.loss_fn` asks the model for the logits at the
target positions only (`logits_at`). Both run here on the bundled model (its own weights,
bfloat16 autocast where the CPU multiplies bf16 natively, as training does), alternating, on the
same packed rows: targets are runs of 20 tokens placed at random until `--targets` of the row.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import lfm2
from lfm2.train.trainer import loss_fn, uses_bf16


def full_logits_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """The loss as computed before `logits_at`: every position's logits, the ignored ones dropped after."""
    logits = model(x, segment_ids=seg)
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.view(-1), ignore_index=-100, reduction="sum")


def target_logits_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    return loss_fn(model, x, y, seg)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--seq", type=int, default=768)
    ap.add_argument("--targets", type=float, default=0.2, help="fraction of positions with a target")
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = lfm2.load().model.float().train()  # the bundled model: its shape is what the recipe trains
    vocab = model.config.vocab_size
    x = torch.randint(300, vocab, (args.batch, args.seq))
    y = torch.full_like(x, -100)
    while float((y != -100).float().mean()) < args.targets:
        r, t = int(torch.randint(args.batch, ())), int(torch.randint(args.seq - 20, ()))
        y[r, t : t + 20] = torch.randint(300, vocab, (20,))
    seg = (torch.arange(args.seq) // 256).expand(args.batch, -1).contiguous()  # three examples per row
    bf16 = uses_bf16("auto", torch.device("cpu"))
    times: dict[str, list[float]] = {"every position": [], "target positions": []}
    for step in range(args.steps + 1):
        for name, fn in (("every position", full_logits_loss), ("target positions", target_logits_loss)):
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = fn(model, x, y, seg)
            loss.backward()
            model.zero_grad(set_to_none=True)
            if step:  # the first round warms up
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["every position"])
    print(f"{args.batch} rows x {args.seq} tokens, {float((y != -100).float().mean()):.0%} targets, "
          f"{'bf16 autocast' if bf16 else 'float32'}, {torch.get_num_threads()} threads, median of {args.steps}")
    print(f"{'logits at':<18} {'s/step':>8} {'speed-up':>9}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<18} {med:8.3f} {base / med:8.2f}x")


if __name__ == "__main__":
    main()
