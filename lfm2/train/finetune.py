"""Fine-tuning commands: SFT, DPO and distillation on a checkpoint, through the one training loop.

    lfm2 finetune sft --model M --data train.jsonl --out DIR            # LoRA by default, --full for all weights
    lfm2 finetune dpo --model M --data pairs.jsonl --out DIR --beta 0.1
    lfm2 finetune distill --teacher T --model M --data corpus.txt --out DIR

Each command tokenizes its data into `DIR/data` (once; a rerun resumes), then trains with
`lfm2.train.trainer` and writes `DIR/adapter` (PEFT format) or `DIR/model`, `metrics.jsonl`,
`loss.png` and a resumable `state.pt`. The same commands run under `torchrun`. On an LFM2-VL
checkpoint, SFT conversations may hold images (`lfm2.train.datasets`); the language model learns,
the vision side stays as it is.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lfm2.errors import LFM2Error
from lfm2.lora import DEFAULT_TARGETS, LoraConfig
from lfm2.weights import copy_side_files, resolve_checkpoint


@dataclass
class FinetuneArgs:
    kind: str  # sft | dpo | distill
    model: str
    data: str
    out: str
    eval_data: str | None = None
    teacher: str | None = None
    full: bool = False
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    max_steps: int | None = None
    epochs: float | None = None
    lr: float | None = None
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 1024
    seed: int = 0
    beta: float = 0.1
    top_k: int = 32
    temperature: float = 2.0
    pack: bool = False
    call_weight: float = 1.0  # sft: the loss on each tool call's first tokens counts this many times
    grad_checkpointing: bool = False
    device: str = "cpu"
    autocast: str = "auto"  # bfloat16 autocast: auto | bf16 | off (see TrainConfig)
    eval_every: int = 50
    save_every: int = 50
    skip_bad_rows: bool = False


def _data_kind(args: FinetuneArgs) -> str:
    if args.kind == "sft":
        return "chat"
    if args.kind == "dpo":
        return "pairs"
    if args.data.endswith(".txt"):
        return "text"
    from lfm2.train.datasets import read_jsonl

    for _, row in read_jsonl(args.data):
        return "chat" if isinstance(row, dict) and "messages" in row else "text"
    raise LFM2Error(f"{args.data}: the data file is empty")


def finetune(args: FinetuneArgs, stop_after: int | None = None) -> Path:
    """Prepare the data (rank 0, once) and run the training; returns the output directory."""

    from lfm2.images import ImageProcessor
    from lfm2.llm import is_vl_checkpoint
    from lfm2.tokenizer import Tokenizer
    from lfm2.train.datasets import prepare_finetune_data
    from lfm2.train.trainer import TrainConfig, train

    if args.kind not in ("sft", "dpo", "distill"):
        raise LFM2Error(f"unknown fine-tuning kind {args.kind!r}; use sft, dpo or distill")
    if args.kind == "distill" and not args.teacher:
        raise LFM2Error("distillation needs --teacher")
    ckpt = resolve_checkpoint(args.model)
    processor = None
    if is_vl_checkpoint(ckpt):
        if args.kind == "distill":
            raise LFM2Error(f"{ckpt} is a vision model (LFM2-VL); distillation takes text models (sft and dpo "
                            "take vision models)")
        processor = ImageProcessor.from_dir(ckpt)  # the same settings as chat prompts get
    lora = None if args.full else LoraConfig(args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets)
    teacher = str(resolve_checkpoint(args.teacher)) if args.teacher else None
    if teacher:
        _check_same_tokenizer(ckpt, Path(teacher))
    out = Path(args.out)
    data_dir = out / "data"
    rank = int(os.environ.get("RANK", "0"))
    if not (data_dir / "train.json").is_file():
        if rank == 0:
            data_dir.mkdir(parents=True, exist_ok=True)
            copy_side_files([ckpt], data_dir)  # the trainer reads the tokenizer from the data directory
            tokenizer = Tokenizer.from_dir(ckpt)
            prepare_finetune_data(_data_kind(args), args.data, tokenizer, data_dir, max_len=args.seq_len + 1,
                                  eval_data=args.eval_data, on_error="skip" if args.skip_bad_rows else "raise",
                                  image_processor=processor)
        else:  # the other processes wait for rank 0's files
            _wait_for(data_dir / "train.json")
    from lfm2.train.data import TokenFile

    train_file = TokenFile.open(data_dir, "train")
    n = train_file.num_examples(args.seq_len, args.pack)
    what = f"{n} training examples"
    if args.pack and args.kind != "dpo" and train_file.meta["kind"] == "chat":
        what = f"{train_file.num_examples(args.seq_len)} training conversations packed into {n} rows"
    if train_file.num_images:
        what += f" with {train_file.num_images} images"
    if args.max_steps is not None and args.epochs is not None:
        raise LFM2Error("give --max-steps or --epochs, not both")
    steps = args.max_steps or max(1, math.ceil((args.epochs or 1.0) * n / (args.batch_size * args.grad_accum)))
    lr = args.lr if args.lr is not None else (2e-4 if lora else 2e-5)
    cfg = TrainConfig(
        out_dir=str(out), data_dir=str(data_dir), init_from=str(ckpt), seq_len=args.seq_len,
        batch_size=args.batch_size, grad_accum=args.grad_accum, max_steps=steps, lr=lr, min_lr=lr / 10,
        warmup_steps=max(1, steps // 20), weight_decay=0.0, eval_every=args.eval_every,
        save_every=args.save_every, seed=args.seed, pack=args.pack and args.kind != "dpo",
        objective={"sft": "lm", "dpo": "dpo", "distill": "distill"}[args.kind],
        lora=None if lora is None else {"rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout,
                                        "targets": list(lora.targets)},
        beta=args.beta, teacher=teacher, top_k=args.top_k, temperature=args.temperature,
        grad_checkpointing=args.grad_checkpointing, device=args.device, autocast=args.autocast,
        call_weight=args.call_weight,
    )
    if rank == 0:
        print(f"{args.kind}: {what}, {steps} steps of {args.batch_size * args.grad_accum}, "
              f"{'LoRA r=' + str(lora.rank) if lora else 'full fine-tuning'}, lr {lr:g}")
    return train(cfg, stop_after=stop_after)


def _check_same_tokenizer(student: Path, teacher: Path) -> None:
    """Distillation compares distributions token by token: both must use one vocabulary."""
    def vocab(ckpt: Path) -> Any:
        path = ckpt / "tokenizer.json"
        if not path.is_file():
            raise LFM2Error(f"{ckpt}: no tokenizer.json; distillation must check the tokenizers match")
        model = json.loads(path.read_text(encoding="utf-8"))
        added = sorted((t["id"], t["content"]) for t in model.get("added_tokens", []))
        return model["model"].get("vocab"), added

    if vocab(student) != vocab(teacher):
        raise LFM2Error(f"the teacher ({teacher}) and the student ({student}) have different tokenizers; "
                        "top-K distillation compares them token by token, so they must share one")


def _wait_for(path: Path, timeout: float = 3600.0) -> None:
    import time

    start = time.monotonic()
    while not path.is_file():
        if time.monotonic() - start > timeout:
            raise LFM2Error(f"timed out waiting for rank 0 to write {path}")
        time.sleep(0.5)


def add_finetune_parser(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a model: sft, dpo or distill (LoRA by default)")
    kinds = p.add_subparsers(dest="kind", required=True, parser_class=type(p))
    helps = {"sft": "supervised fine-tuning on JSONL conversations (loss on assistant turns)",
             "dpo": "length-normalized DPO on JSONL preference pairs {prompt|messages, chosen, rejected}",
             "distill": "top-K distillation from --teacher on a text (.txt / JSONL text) or chat corpus"}
    for kind, text in helps.items():
        k = kinds.add_parser(kind, help=text)
        k.add_argument("--model", "-m", required=True, help="checkpoint to fine-tune (the student for distill)")
        if kind == "distill":
            k.add_argument("--teacher", required=True, help="teacher checkpoint (must share the tokenizer)")
        k.add_argument("--data", required=True)
        k.add_argument("--eval", dest="eval_data", default=None, help="held-out data (default: 5%% of --data)")
        k.add_argument("--out", "-o", required=True, help="run directory (rerun the command to resume)")
        k.add_argument("--full", action="store_true", help="train every weight instead of a LoRA adapter")
        k.add_argument("--lora-rank", type=int, default=8)
        k.add_argument("--lora-alpha", type=float, default=16.0)
        k.add_argument("--lora-dropout", type=float, default=0.0)
        k.add_argument("--lora-targets", nargs="+", default=list(DEFAULT_TARGETS),
                       help="module names (suffixes) to adapt; default: all of LFM2's projections")
        k.add_argument("--max-steps", type=int, default=None)
        k.add_argument("--epochs", type=float, default=None, help="default 1 when --max-steps is absent")
        k.add_argument("--lr", type=float, default=None, help="default 2e-4 (LoRA), 2e-5 (full)")
        k.add_argument("--batch-size", type=int, default=8, help="global batch (split over torchrun processes)")
        k.add_argument("--grad-accum", type=int, default=1)
        k.add_argument("--seq-len", type=int, default=1024, help="longest example / packed row, in tokens")
        k.add_argument("--seed", type=int, default=0)
        if kind == "dpo":
            k.add_argument("--beta", type=float, default=0.1)
        if kind == "distill":
            k.add_argument("--top-k", type=int, default=32)
            k.add_argument("--temperature", type=float, default=2.0)
        if kind != "dpo":
            k.add_argument("--pack", action="store_true", help="several conversations per row (no leakage)")
        if kind == "sft":
            k.add_argument("--call-weight", type=float, default=1.0,
                           help="count the loss on each tool call's first tokens (the choice of tool) this many times")
        k.add_argument("--grad-checkpointing", action="store_true", help="less activation memory, more compute")
        k.add_argument("--device", default="cpu")
        k.add_argument("--autocast", choices=["auto", "bf16", "off"], default="auto",
                       help="bfloat16 autocast; auto: on CUDA and on CPUs with native bf16 (off: exact float32)")
        k.add_argument("--eval-every", type=int, default=50)
        k.add_argument("--save-every", type=int, default=50)
        k.add_argument("--skip-bad-rows", action="store_true",
                       help="report bad JSONL rows (with line numbers) and skip them instead of stopping")


def cmd_finetune(args) -> None:
    known = set(FinetuneArgs.__dataclass_fields__)
    fa = FinetuneArgs(**{k: v for k, v in vars(args).items() if k in known})
    out = finetune(fa)
    result = out / ("model" if fa.full else "adapter")
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"done: {result} (metrics {out / 'metrics.jsonl'}, loss curve {out / 'loss.png'})")
