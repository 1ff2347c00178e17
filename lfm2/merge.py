"""Merging: fold a LoRA adapter into its base model, or average checkpoints (linear or SLERP).

    lfm2 merge --model M --adapter DIR -o OUT                  # adapter folded in: a normal checkpoint
    lfm2 merge --models A B C --method linear [--weights ...] -o OUT
    lfm2 merge --models A B --method slerp [--t 0.5] -o OUT

The LFM2 report ends its post-training recipe with model merging; averaging fine-tunes of one
base model (same architecture, same tokenizer) is the common case. Tensors are combined one by
one in float32 and written in the first model's dtype, with its tokenizer and configuration.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import torch

from lfm2.errors import CheckpointError, ConfigError
from lfm2.weights import SIDE_FILES, copy_side_files, iter_tensors, resolve_checkpoint, save_tensors, tensor_table


def merge_adapter(model: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Load `model` with `adapter`, fold the adapter into the weights, save a plain checkpoint.

    An LFM2-VL model is saved whole (its vision side as it was), with its own config.json and processor files."""
    import lfm2
    from lfm2.lora import merge_lora
    from lfm2.weights import copy_checkpoint_files, save_checkpoint

    llm = lfm2.load(model, adapter=adapter)
    out = Path(out)
    if llm.vision is not None:
        merge_lora(llm.vision)
        save_checkpoint(llm.vision, out, {"config.json": (llm.path / "config.json").read_text(encoding="utf-8")})
        copy_checkpoint_files(llm.path, out)
        return out
    merge_lora(llm.model)
    save_checkpoint(llm.model, out)
    copy_side_files([llm.path], out)
    return out


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-7) -> torch.Tensor:
    """Spherical interpolation between two tensors seen as vectors; linear when nearly parallel.

    The angle comes from the normalized vectors, the interpolation applies to the originals,
    so the result keeps a norm between theirs instead of shrinking as a linear average does."""
    va, vb = a.flatten().double(), b.flatten().double()
    na, nb = va.norm(), vb.norm()
    if na < eps or nb < eps:
        return ((1 - t) * a.double() + t * b.double()).float()
    cos = torch.clamp((va / na) @ (vb / nb), -1.0, 1.0)
    omega = torch.arccos(cos)
    if omega.abs() < 1e-4:
        out = (1 - t) * va + t * vb
    else:
        s = torch.sin(omega)
        out = torch.sin((1 - t) * omega) / s * va + torch.sin(t * omega) / s * vb
    return out.view_as(a).float()


def merge_models(
    paths: list[str | os.PathLike], out: str | os.PathLike, method: str = "linear",
    weights: list[float] | None = None, t: float = 0.5,
) -> Path:
    """Combine checkpoints of one architecture tensor by tensor into a new checkpoint at `out`."""
    if method not in ("linear", "slerp"):
        raise ConfigError(f"unknown merge method {method!r}; use linear or slerp")
    if len(paths) < 2:
        raise ConfigError("merging needs at least two models")
    if method == "slerp" and len(paths) != 2:
        raise ConfigError(f"slerp merges exactly two models, got {len(paths)}; use linear for more")
    if not 0.0 <= t <= 1.0:
        raise ConfigError(f"--t must be in [0, 1], got {t}")
    weights = weights or [1.0 / len(paths)] * len(paths)
    if len(weights) != len(paths):
        raise ConfigError(f"{len(weights)} weights for {len(paths)} models")
    if not math.isclose(sum(weights), 1.0, rel_tol=1e-6):
        raise ConfigError(f"the weights sum to {sum(weights):g}; they must sum to 1")
    ckpts = [resolve_checkpoint(p) for p in paths]
    tables = [tensor_table(c) for c in ckpts]
    names = sorted(tables[0])
    for ckpt, table in zip(ckpts[1:], tables[1:], strict=True):
        if set(table) != set(names):
            diff = sorted(set(table) ^ set(names))
            raise CheckpointError(f"{ckpt} does not have the same tensors as {ckpts[0]} (e.g. {diff[0]})")
        for name in names:
            if table[name][1]["shape"] != tables[0][name][1]["shape"]:
                raise CheckpointError(f"{ckpt}: {name} has shape {table[name][1]['shape']}, "
                                      f"{ckpts[0]} has {tables[0][name][1]['shape']}; not the same architecture")
    streams = [iter_tensors(table, names) for table in tables]
    merged = {}
    for items in zip(*streams, strict=True):
        name, first = items[0]
        tensors = [x for _, x in items]
        if method == "slerp":
            value = slerp(tensors[0].float(), tensors[1].float(), t)
        else:
            value = sum(w * x.float() for w, x in zip(weights, tensors, strict=True))
        merged[name] = value.to(first.dtype).contiguous()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(merged, out / "model.safetensors")
    copy_side_files([ckpts[0]], out, ("config.json", *SIDE_FILES))
    return out


def add_merge_parser(sub) -> None:
    p = sub.add_parser("merge", help="fold a LoRA adapter into its model, or average checkpoints")
    p.add_argument("--model", "-m", help="base model (with --adapter)")
    p.add_argument("--adapter", help="LoRA adapter directory (PEFT format) to fold into --model")
    p.add_argument("--models", nargs="+", help="checkpoints to average (same architecture)")
    p.add_argument("--method", default="linear", choices=["linear", "slerp"])
    p.add_argument("--weights", type=float, nargs="+", help="linear: one weight per model, summing to 1")
    p.add_argument("--t", type=float, default=0.5, help="slerp: 0 gives the first model, 1 the second")
    p.add_argument("-o", "--out", required=True, help="output checkpoint directory")


def cmd_merge(args: argparse.Namespace) -> None:
    if args.adapter:
        if not args.model or args.models:
            raise ConfigError("--adapter needs --model (one base model) and no --models")
        out = merge_adapter(args.model, args.adapter, args.out)
    elif args.models:
        out = merge_models(args.models, args.out, args.method, args.weights, args.t)
    else:
        raise ConfigError("give --model M --adapter DIR, or --models A B ...")
    print(f"merged checkpoint written to {out}")
