"""The training loop shared by pretraining and supervised fine-tuning, on the inference model code.

What a run does, and why:
- AdamW with linear warmup then cosine decay to `min_lr`, gradient clipping, and gradient
  accumulation (the loss of a step is the mean over all its micro-batches' target tokens);
- deterministic: the batches of step s are a function of (seed, s) only, and the model is
  initialised from the seed, so a run killed and resumed from its checkpoint reproduces the
  uninterrupted run's losses;
- a checkpoint (`state.pt`: model, optimizer, step) is written atomically every `save_every`
  steps and at the end; the final weights are also exported in Hugging Face layout (`model/`);
- every step appends to `metrics.jsonl`; validation loss every `eval_every` steps; a tqdm bar
  shows loss and tokens/s; `loss.png` is redrawn at each evaluation (matplotlib, when installed).
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lfm2.config import ModelConfig
from lfm2.errors import LFM2Error
from lfm2.models import build_model
from lfm2.train.data import TokenFile
from lfm2.weights import save_checkpoint, write_text_atomic


@dataclass
class TrainConfig:
    """One training run. Read from a JSON file by `lfm2 train --config FILE`."""

    out_dir: str
    data_dir: str
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields, for training from scratch
    init_from: str | None = None  # a checkpoint directory to start from (fine-tuning) instead
    train_split: str = "train"
    val_split: str = "val"
    seq_len: int = 256
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 100
    seed: int = 0
    threads: int = 0  # 0: torch's default

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> TrainConfig:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise LFM2Error(f"{path}: unknown training option(s) {unknown}; known: {sorted(known)}")
        return cls(**raw)


def init_weights(model: torch.nn.Module, std: float = 0.02) -> None:
    """GPT-style initialisation for training from scratch: small normal weights, unit norms.

    PyTorch's defaults (unit-variance embeddings, tied to the head) start with logits in the
    tens and a loss far above log(vocab). Residual output projections are scaled down by
    sqrt(2 * layers) so the residual stream does not grow with depth.
    """
    depth_scale = 1 / math.sqrt(2 * model.config.num_hidden_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("conv.conv.weight") or p.dim() < 2:
                continue  # depthwise conv keeps its fan-in init; biases stay as they are
            else:
                p.normal_(0.0, std * (depth_scale if name.endswith(("out_proj.weight", "w2.weight")) else 1.0))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to `lr`, then cosine decay to `min_lr` at `max_steps`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def batch_indices(step: int, micro: int, cfg: TrainConfig, n: int) -> list[int]:
    """The examples of micro-batch `micro` of step `step`: a pure function of (seed, step, micro).

    Examples are drawn epoch by epoch from a permutation seeded by (seed, epoch), so every
    example is seen once per epoch and a resumed run sees exactly what the original would have.
    """
    per_step = cfg.batch_size * cfg.grad_accum
    start = step * per_step + micro * cfg.batch_size
    return [int(_epoch_order(cfg.seed, k // n, n)[k % n]) for k in range(start, start + cfg.batch_size)]


@functools.lru_cache(maxsize=2)
def _epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of the examples in one epoch (cached: a batch would otherwise redraw it per example)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def loss_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over target tokens (-100 ignored) and their count."""
    logits = model(x)
    loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.view(-1), ignore_index=-100, reduction="sum")
    return loss, int((y != -100).sum())


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: TokenFile, cfg: TrainConfig, pad_id: int) -> float:
    """Mean validation loss per token over the first `eval_batches` batches (a fixed set)."""
    model.eval()
    n = data.num_examples(cfg.seq_len)
    total, count = 0.0, 0
    for b in range(min(cfg.eval_batches, math.ceil(n / cfg.batch_size))):
        idx = list(range(b * cfg.batch_size, min(n, (b + 1) * cfg.batch_size)))
        loss, k = loss_fn(model, *data.batch(idx, cfg.seq_len, pad_id))
        total, count = total + float(loss), count + k
    model.train()
    return total / max(count, 1)


def _save_state(path: Path, model, optimizer, step: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}, tmp)
    os.replace(tmp, path)


def _read_metrics(path: Path, upto_step: int) -> list[dict]:
    """Metrics already logged, up to the step a resumed run restarts from."""
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if r["step"] <= upto_step]


def plot_losses(metrics: list[dict], out: Path) -> bool:
    """Draw train and validation loss against step into `out` (PNG); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    val = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train", linewidth=0.8)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)
    return True


def train(cfg: TrainConfig, stop_after: int | None = None) -> Path:
    """Run (or resume) training; returns the output directory.

    `stop_after` ends the process's work after that many steps as if it were killed there
    (tests use it to check that resuming reproduces the uninterrupted run).
    """
    from lfm2.tokenizer import Tokenizer

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "train_config.json", json.dumps(asdict(cfg), indent=2) + "\n")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tokenizer = Tokenizer.from_dir(cfg.data_dir)
    pad_id = tokenizer.pad_id or 0
    train_data = TokenFile.open(cfg.data_dir, cfg.train_split)
    has_val = (Path(cfg.data_dir) / f"{cfg.val_split}.json").is_file()
    val_data = TokenFile.open(cfg.data_dir, cfg.val_split) if has_val else None
    n = train_data.num_examples(cfg.seq_len)
    if n < cfg.batch_size:
        raise LFM2Error(f"{cfg.data_dir}/{cfg.train_split}: {n} examples, fewer than batch_size={cfg.batch_size}")

    torch.manual_seed(cfg.seed)
    if cfg.init_from:
        import lfm2

        model = lfm2.load(cfg.init_from).model
        model_config = model.config
    else:
        model_config = ModelConfig(**{"vocab_size": tokenizer.vocab_size, **cfg.model})
        model = build_model(model_config, device="cpu")
        init_weights(model)
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=cfg.betas, fused=False, foreach=False,
    )
    state_path = out / "state.pt"
    step = 0
    if state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
    metrics_path = out / "metrics.jsonl"
    metrics = _read_metrics(metrics_path, step)
    write_text_atomic(metrics_path, "".join(json.dumps(m) + "\n" for m in metrics))

    last = cfg.max_steps if stop_after is None else min(cfg.max_steps, step + stop_after)
    bar = tqdm(total=cfg.max_steps, initial=step, desc="training", unit="step")
    with open(metrics_path, "a", encoding="utf-8") as log:
        while step < last:
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batches = [train_data.batch(batch_indices(step, m, cfg, n), cfg.seq_len, pad_id)
                       for m in range(cfg.grad_accum)]
            tokens = sum(int((y != -100).sum()) for _, y in batches)
            total = 0.0
            for x, y in batches:
                loss, _ = loss_fn(model, x, y)
                (loss / max(tokens, 1)).backward()
                total += float(loss.detach())
            norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            row = {"step": step, "loss": total / max(tokens, 1), "lr": lr, "grad_norm": norm,
                   "tokens_per_s": tokens / (time.perf_counter() - t0)}
            if val_data is not None and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                row["val_loss"] = evaluate(model, val_data, cfg, pad_id)
            log.write(json.dumps(row) + "\n")
            log.flush()
            metrics.append(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
            bar.update(1)
            if step % cfg.save_every == 0 or step == cfg.max_steps:
                _save_state(state_path, model, optimizer, step)
            if "val_loss" in row:
                plot_losses(metrics, out / "loss.png")
    bar.close()
    if step == cfg.max_steps:
        plot_losses(metrics, out / "loss.png")
        model.eval()
        save_checkpoint(model, out / "model")
        tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
        for name in tokenizer_files:
            src = Path(cfg.data_dir) / name
            if src.is_file():
                write_text_atomic(out / "model" / name, src.read_text(encoding="utf-8"))
    return out
