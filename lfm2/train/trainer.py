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

Fine-tuning runs through the same loop (`lfm2.train.finetune` builds the configs): `objective`
picks next-token cross-entropy ("lm"), length-normalized DPO ("dpo") or top-K distillation from
a teacher ("distill"); `lora` trains low-rank adapters instead of every weight; `pack` puts
several conversations in one row. Under `torchrun`, each process takes its share of every
batch and DistributedDataParallel sums the gradients, so the losses equal a one-process run
with the same global batch; only rank 0 writes files.

An LFM2-VL checkpoint trains whole (`lfm2.models.lfm2_vl`): conversations' images are read back
from the token files and preprocessed at each step, the frozen vision tower and projector turn
them into the features that stand in for the `<image>` tokens (`inputs_embeds`), and only the
language model learns (LoRA on its projections; with `lora` None, its weights and head).
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
from lfm2.files import atomic_path, atomic_write
from lfm2.models import build_model
from lfm2.tools import TOOL_CALL_START
from lfm2.train.data import TokenFile
from lfm2.weights import copy_checkpoint_files, copy_side_files, save_checkpoint


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
    objective: str = "lm"  # lm | dpo | distill
    lora: dict[str, Any] | None = None  # LoraConfig fields; None trains every weight
    pack: bool = False  # chat data: several conversations per row, no leakage between them
    beta: float = 0.1  # DPO
    teacher: str | None = None  # distillation: the teacher checkpoint
    top_k: int = 32  # distillation: the teacher's top-K kept per position
    temperature: float = 2.0  # distillation: softens the within-top-K term
    grad_checkpointing: bool = False
    # "lm" training: the loss on the first three tokens of each tool call (`[` and the start of the tool's
    # name, where the model chooses which tool to call) counts this many times over. Validation is unweighted.
    call_weight: float = 1.0
    device: str = "cpu"
    # bfloat16 autocast (float32 master weights): "auto" uses it on CUDA and on CPUs with native
    # bf16 matmuls (AVX-512 BF16 or AMX: ~1.9x faster steps measured on a 2-core Zen 4), where it
    # would be slower than float32 elsewhere; "bf16" forces it, "off" trains in float32.
    autocast: str = "auto"
    export: bool = True  # write the final model (or adapter) when max_steps is reached

    def __post_init__(self) -> None:
        if self.objective not in ("lm", "dpo", "distill"):
            raise LFM2Error(f"objective must be 'lm', 'dpo' or 'distill', got {self.objective!r}")
        if self.autocast not in ("auto", "bf16", "off"):
            raise LFM2Error(f"autocast must be 'auto', 'bf16' or 'off', got {self.autocast!r}")
        if not self.call_weight > 0:
            raise LFM2Error(f"call_weight must be positive, got {self.call_weight!r}")
        if self.objective == "distill" and not self.teacher:
            raise LFM2Error("objective 'distill' needs a teacher checkpoint")
        for name in ("batch_size", "grad_accum", "max_steps", "seq_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise LFM2Error(f"{name} must be a positive integer, got {getattr(self, name)!r}")

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> TrainConfig:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise LFM2Error(f"{path}: unknown training option(s) {unknown}; known: {sorted(known)}")
        return cls(**raw)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (Linux flags); without it oneDNN emulates
    bf16 and autocast makes training slower, not faster."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def uses_bf16(autocast: str, device: torch.device) -> bool:
    if autocast == "auto":
        return device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
    return autocast == "bf16"


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


def loss_fn(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, segments: torch.Tensor | None = None,
    weights: torch.Tensor | None = None, **images: torch.Tensor,
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over target tokens (-100 ignored), each times its `weights` (B, T)
    if given, and their count; the logits are computed at the target positions only. `images` are a
    vision model's image inputs for the batch (`pixel_values`, ...: `lfm2.images.batch`)."""
    keep = y != -100
    logits = model(x, segment_ids=segments, logits_at=keep, **images)
    if weights is None:
        return F.cross_entropy(logits.float(), y[keep], reduction="sum"), int(keep.sum())
    losses = F.cross_entropy(logits.float(), y[keep], reduction="none")
    return (losses * weights[keep]).sum(), int(keep.sum())


def call_weights(x: torch.Tensor, call_start: int, weight: float) -> torch.Tensor:
    """Per-position loss weights (B, T): `weight` on the three targets after each `call_start` input token
    (`[` and the tool name's first tokens: the choice of tool, a few tokens among a reply's many), else 1."""
    start = x == call_start
    near = start.clone()
    near[:, 1:] |= start[:, :-1]
    near[:, 2:] |= start[:, :-2]
    return torch.where(near, weight, 1.0)


class Objective:
    """What a batch costs: (summed loss, how many units it is averaged over, extra sums to log).

    `data` (split -> token file) and `image_processor` serve a vision model's batches their images."""

    def __init__(self, cfg: TrainConfig, model: torch.nn.Module, device: torch.device,
                 call_start: int | None = None, data: dict[str, TokenFile] | None = None,
                 image_processor: Any = None) -> None:
        self.cfg, self.device, self.call_start = cfg, device, call_start
        self.data, self.image_processor = data or {}, image_processor
        self.reference: dict[str, np.ndarray] = {}  # DPO: per split, (pairs, 2) reference log-probs
        self.teacher = None
        if cfg.objective == "distill":
            import lfm2

            self.teacher = lfm2.load(cfg.teacher, device=device, compile=False).model.eval()
            if self.teacher.config.vocab_size != model.config.vocab_size:
                raise LFM2Error(f"teacher {cfg.teacher} has a vocabulary of {self.teacher.config.vocab_size} tokens, "
                                f"the student {model.config.vocab_size}: distillation needs a shared tokenizer")

    def image_inputs(self, split: str, indices: list[int]) -> dict[str, torch.Tensor]:
        """The image inputs of a batch's rows (empty where they have none), preprocessed as at inference."""
        data = self.data.get(split)
        blobs = [] if data is None else data.images(indices, self.cfg.seq_len, self.cfg.pack)
        if not blobs:
            return {}
        if self.image_processor is None:
            raise LFM2Error(f"the {split} data holds images, but {self.cfg.init_from} is not a vision model")
        from lfm2.images import batch, decode_image

        layouts = [self.image_processor(decode_image(b)) for b in blobs]
        return {k: v.to(self.device) for k, v in batch(layouts).items()}

    def __call__(self, model, batch: tuple[torch.Tensor, ...], indices: list[int], split: str):
        x, y, *rest = (t.to(self.device) for t in batch)
        segments = rest[0] if rest else None
        if self.cfg.objective == "lm":
            weighted = split == "train" and self.cfg.call_weight != 1 and self.call_start is not None
            weights = call_weights(x, self.call_start, self.cfg.call_weight) if weighted else None
            loss, count = loss_fn(model, x, y, segments, weights, **self.image_inputs(split, indices))
            return loss, count, {}
        if self.cfg.objective == "dpo":
            from lfm2.train.losses import dpo_loss, sequence_logps

            logps, lengths = sequence_logps(model(x, logits_at=y != -100), y)
            ref = torch.as_tensor(self.reference[split][indices], dtype=torch.float32, device=logps.device)
            losses, r_c, r_r = dpo_loss(logps[0::2], logps[1::2], ref[:, 0], ref[:, 1], lengths[0::2],
                                        lengths[1::2], self.cfg.beta)
            return losses.sum(), len(indices), {"reward_acc": float((r_c > r_r).sum()),
                                                "reward_margin": float((r_c - r_r).sum())}
        from lfm2.train.losses import topk_distill_loss

        keep = y != -100  # both models' logits at the target positions only (see loss_fn)
        logits = model(x, segment_ids=segments, logits_at=keep)
        with torch.no_grad():
            t_logits = self.teacher(x, segment_ids=segments, logits_at=keep)
            t_logp, t_ids = torch.log_softmax(t_logits.float(), dim=-1).topk(self.cfg.top_k, dim=-1)
        losses = topk_distill_loss(logits, t_logp, t_ids, self.cfg.temperature)
        return losses.sum(), int(keep.sum()), {}

    @torch.no_grad()
    def prepare_reference(self, model, data: TokenFile, split: str, out: Path, pad_id: int, resumed: bool) -> None:
        """DPO: the frozen reference's log-probabilities of every pair, computed once and stored.

        The reference is the model before training: with LoRA, the same weights with the
        adapters switched off (no second copy in memory). Stored in `ref_logps_<split>.npy`, so
        a resumed run reuses them; a full fine-tune cannot recompute them once training began.
        """
        from lfm2.lora import adapters_disabled
        from lfm2.train.losses import sequence_logps

        path = out / f"ref_logps_{split}.npy"
        if path.is_file():
            self.reference[split] = np.load(path)
            return
        if resumed and getattr(model, "lora_config", None) is None:
            raise LFM2Error(f"{path} is missing and the model has already been trained; start the run afresh")
        n = data.num_examples(self.cfg.seq_len)
        rows = []
        was_training = model.training
        model.eval()
        with adapters_disabled(model):
            for b in range(0, n, self.cfg.batch_size):
                idx = list(range(b, min(n, b + self.cfg.batch_size)))
                x, y = (t.to(self.device) for t in data.batch(idx, self.cfg.seq_len, pad_id))
                logps, _ = sequence_logps(model(x, logits_at=y != -100), y)
                rows.append(logps.view(-1, 2).cpu().numpy())
        model.train(was_training)
        self.reference[split] = np.concatenate(rows)
        if _rank() == 0:
            with atomic_path(path, suffix=".tmp.npy") as tmp:  # np.save appends .npy to other names
                np.save(tmp, self.reference[split])


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: TokenFile, cfg: TrainConfig, pad_id: int,
             objective: Objective | None = None) -> dict[str, float]:
    """Mean validation loss over the first `eval_batches` batches (a fixed set), plus DPO's
    reward accuracy and margin."""
    objective = objective or Objective(cfg, model, torch.device("cpu"))
    was_training = model.training
    model.eval()
    n = data.num_examples(cfg.seq_len, cfg.pack)
    total, count, extra = 0.0, 0, {}
    for b in range(min(cfg.eval_batches, math.ceil(n / cfg.batch_size))):
        idx = list(range(b * cfg.batch_size, min(n, (b + 1) * cfg.batch_size)))
        loss, k, more = objective(model, data.batch(idx, cfg.seq_len, pad_id, cfg.pack), idx, "val")
        total, count = total + float(loss), count + k
        for key, v in more.items():
            extra[key] = extra.get(key, 0.0) + v
    model.train(was_training)
    return {"val_loss": total / max(count, 1), **{f"val_{k}": v / max(count, 1) for k, v in extra.items()}}


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _world() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def _init_distributed(device: torch.device) -> None:
    """Join the process group when started by torchrun (WORLD_SIZE > 1): gloo on CPU, nccl on GPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")


def _all_sum(values: list[float]) -> list[float]:
    if not torch.distributed.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return t.tolist()


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights a run changes: everything, or only the LoRA adapters (small checkpoints)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k in names}


def _save_state(path: Path, model, optimizer, step: int) -> None:
    with atomic_path(path) as tmp:
        torch.save({"model": _trainable_state(model), "optimizer": optimizer.state_dict(), "step": step}, tmp)


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
    try:
        with atomic_path(out, suffix=".tmp.png") as tmp:  # matplotlib picks the format from the name
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)
    return True


def _build_model(cfg: TrainConfig, tokenizer, device: torch.device) -> tuple[torch.nn.Module, Any]:
    """The model to train, and its image processor (None unless it is a vision model, which trains whole:
    its `frozen_prefixes`, the vision side, get no adapter and no gradient)."""
    torch.manual_seed(cfg.seed)
    processor = None
    if cfg.init_from:
        import lfm2

        # float32 weights on every device: on CUDA `lfm2.load` defaults to bfloat16, and AdamW steps on
        # bfloat16 weights round small updates away. Autocast still runs the matmuls in bfloat16.
        llm = lfm2.load(cfg.init_from, dtype=torch.float32, device=device, compile=False)
        model = llm.model if llm.vision is None else llm.vision
        processor = llm.image_processor
    else:
        model = build_model(ModelConfig(**{"vocab_size": tokenizer.vocab_size, **cfg.model}), device="cpu")
        init_weights(model)
        model.to(device)
    if cfg.lora is not None:
        from lfm2.lora import LoraConfig, apply_lora

        apply_lora(model, LoraConfig(**cfg.lora))
    else:
        frozen = tuple(getattr(model, "frozen_prefixes", ()))
        for name, p in model.named_parameters():
            p.requires_grad_(not name.startswith(frozen))
    getattr(model, "language", model).gradient_checkpointing = cfg.grad_checkpointing
    model.train()
    return model, processor


def train(cfg: TrainConfig, stop_after: int | None = None) -> Path:
    """Run (or resume) training; returns the output directory.

    `stop_after` ends the process's work after that many steps as if it were killed there
    (tests use it to check that resuming reproduces the uninterrupted run).
    """
    from lfm2.tokenizer import Tokenizer

    device = torch.device(cfg.device)
    _init_distributed(device)
    rank, world = _rank(), _world()
    out = Path(cfg.out_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "train_config.json", json.dumps(asdict(cfg), indent=2) + "\n")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tokenizer = Tokenizer.from_dir(cfg.data_dir)
    pad_id = tokenizer.pad_id or 0
    train_data = TokenFile.open(cfg.data_dir, cfg.train_split)
    has_val = (Path(cfg.data_dir) / f"{cfg.val_split}.json").is_file()
    val_data = TokenFile.open(cfg.data_dir, cfg.val_split) if has_val else None
    n = train_data.num_examples(cfg.seq_len, cfg.pack)
    if n < cfg.batch_size:
        raise LFM2Error(f"{cfg.data_dir}/{cfg.train_split}: {n} examples, fewer than batch_size={cfg.batch_size}")
    if cfg.batch_size % world:
        raise LFM2Error(f"batch_size={cfg.batch_size} (the global batch) must divide evenly over {world} processes")

    model, image_processor = _build_model(cfg, tokenizer, device)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=cfg.betas, fused=False, foreach=False,
    )
    state_path = out / "state.pt"
    step = 0
    if state_path.is_file():
        state = torch.load(state_path, map_location=device, weights_only=True)
        missing = set(_trainable_state(model)) - set(state["model"])
        if missing:
            raise LFM2Error(f"{state_path} does not match this run's trainable weights (no {sorted(missing)[0]}); "
                            "use a fresh --out directory")
        model.load_state_dict(state["model"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
    call_start = tokenizer.token_to_id(TOOL_CALL_START)
    if cfg.call_weight != 1 and call_start is None:
        raise LFM2Error(f"call_weight={cfg.call_weight} weights tool calls, but the tokenizer in {cfg.data_dir} has no "
                        f"{TOOL_CALL_START} token; leave call_weight at 1")
    objective = Objective(cfg, model, device, call_start, {"train": train_data, "val": val_data}, image_processor)
    if cfg.objective == "dpo":
        objective.prepare_reference(model, train_data, "train", out, pad_id, resumed=step > 0)
        if val_data is not None:
            objective.prepare_reference(model, val_data, "val", out, pad_id, resumed=step > 0)
    ddp = model
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.index else None)
    use_bf16 = uses_bf16(cfg.autocast, device)
    if rank == 0:
        print(f"training in {'bfloat16 autocast' if use_bf16 else 'float32'} on {device}")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    metrics_path = out / "metrics.jsonl"
    metrics = _read_metrics(metrics_path, step)
    if rank == 0:
        atomic_write(metrics_path, "".join(json.dumps(m) + "\n" for m in metrics))
    last = cfg.max_steps if stop_after is None else min(cfg.max_steps, step + stop_after)
    bar = tqdm(total=cfg.max_steps, initial=step, desc="training", unit="step", disable=rank != 0)
    log = open(metrics_path, "a", encoding="utf-8") if rank == 0 else None
    try:
        while step < last:
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # This process's share of each micro-batch of the global batch.
            shares = [batch_indices(step, m, cfg, n)[rank::world] for m in range(cfg.grad_accum)]
            batches = [train_data.batch(idx, cfg.seq_len, pad_id, cfg.pack) for idx in shares]
            local_tokens = sum(int((b[1] != -100).sum()) for b in batches)
            if cfg.objective == "dpo":
                local_units = sum(len(idx) for idx in shares)
            else:
                local_units = local_tokens
            units, tokens = _all_sum([float(local_units), float(local_tokens)])
            total, extra = 0.0, {}
            for idx, batch in zip(shares, batches, strict=True):
                with autocast:
                    loss, _, more = objective(ddp, batch, idx, "train")
                # DDP averages gradients over processes; scaling by world makes that a sum.
                (loss * world / max(units, 1)).backward()
                total += float(loss.detach())
                for k, v in more.items():
                    extra[k] = extra.get(k, 0.0) + v
            keys = sorted(extra)
            total, *sums = _all_sum([total, *(extra[k] for k in keys)])
            norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            row = {"step": step, "loss": total / max(units, 1), "lr": lr, "grad_norm": norm,
                   "tokens_per_s": tokens / (time.perf_counter() - t0),
                   **{k: v / max(units, 1) for k, v in zip(keys, sums, strict=True)}}
            if val_data is not None and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                row.update(evaluate(model, val_data, cfg, pad_id, objective))
            metrics.append(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
            bar.update(1)
            if rank == 0:
                log.write(json.dumps(row) + "\n")
                log.flush()
                if step % cfg.save_every == 0 or step == cfg.max_steps:
                    _save_state(state_path, model, optimizer, step)
                if "val_loss" in row:
                    plot_losses(metrics, out / "loss.png")
    finally:
        bar.close()
        if log is not None:
            log.close()
    if step == cfg.max_steps and rank == 0:
        plot_losses(metrics, out / "loss.png")
        if cfg.export:
            export(model, cfg, out)
    if world > 1:
        torch.distributed.barrier()
    return out


def export(model: torch.nn.Module, cfg: TrainConfig, out: Path) -> Path:
    """The run's result: a PEFT adapter in `adapter/`, or a full checkpoint in `model/`
    (with the tokenizer, and the base model's generation defaults when there is one)."""
    model.eval()
    if getattr(model, "lora_config", None) is not None:
        from lfm2.lora import save_adapter

        return save_adapter(model, out / "adapter", base_model=cfg.init_from)
    if getattr(model, "language", None) is not None:  # a vision model: its own config.json and processor files
        source = Path(cfg.init_from)
        save_checkpoint(model, out / "model", {"config.json": (source / "config.json").read_text(encoding="utf-8")})
        copy_checkpoint_files(source, out / "model")
        return out / "model"
    save_checkpoint(model, out / "model")
    copy_side_files([Path(cfg.data_dir)] + ([Path(cfg.init_from)] if cfg.init_from else []), out / "model")
    return out / "model"
