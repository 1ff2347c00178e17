"""`lfm2 convert`: a Hugging Face checkpoint to GGUF, or a GGUF file back to a checkpoint directory.

    lfm2 convert DIR --to gguf --type q8_0 -o model-q8_0.gguf
    lfm2 convert model.gguf --to hf -o DIR
    lfm2 convert model.gguf --to hf --mmproj mmproj-model.gguf -o DIR    (an LFM2-VL checkpoint)

An LFM2-VL checkpoint becomes two files, as llama.cpp runs it: the language model (`-o`) and the
vision part, an mmproj file (`mmproj-<name of -o>` beside it, or `--mmproj OUT`; `lfm2.mmproj`); the two
convert back to an LFM2-VL checkpoint directory.

The command only parses arguments; `convert()` is what it calls, and `lfm2.gguf` does the work.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from lfm2.errors import ConfigError

TARGETS = ("gguf", "hf")
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
# `--type` with `--to hf`: the dtype of the written safetensors.
HF_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def convert(src: str | os.PathLike, to: str, out: str | os.PathLike, type: str | None = None,
            progress: bool = True, mmproj: str | os.PathLike | None = None,
            mmproj_type: str | None = None) -> list[Path]:
    """Convert `src` and write `out`; returns the paths written (`out`, then an mmproj file if any).

    `to="gguf"`: `src` is a checkpoint directory or hub id, `type` one of f32, f16 (default), bf16,
    q8_0, q4_0. Of an LFM2-VL checkpoint, `out` gets the language model and `mmproj` (default:
    `mmproj-<name of out>` beside it) the vision part, in `mmproj_type` (f32, f16, bf16, q8_0; default
    `type` where it is one of these, else f16). `to="hf"`: `src` is a .gguf file, dequantized into the
    directory `out`; `type` (f32, f16, bf16) is the dtype written, float32 by default (it holds every
    GGUF value exactly); with `mmproj`, the vision part of an LFM2-VL text model, an LFM2-VL checkpoint.
    """
    from lfm2.gguf import export_gguf, import_gguf, language_config

    to = str(to).lower()
    if to == "gguf":
        from lfm2.mmproj import MMPROJ_TYPES, default_mmproj_path, export_mmproj
        from lfm2.weights import resolve_checkpoint

        src_dir = resolve_checkpoint(src)
        vision = language_config(src_dir)[2]
        if not vision and (mmproj is not None or mmproj_type is not None):
            raise ConfigError(f"{src_dir}: not an LFM2-VL checkpoint, so it has no vision part for --mmproj / "
                              "--mmproj-type to write")
        if vision and mmproj_type is None:
            mmproj_type = type if type is not None and type.lower() in MMPROJ_TYPES else "f16"
        if vision and mmproj_type.lower() not in MMPROJ_TYPES:  # before the text model is written
            raise ConfigError(f"--mmproj-type {mmproj_type!r}: an mmproj file is one of {', '.join(MMPROJ_TYPES)}")
        # `src` as given, not `src_dir`: a hub id names the files (`general.name`), not its snapshot's hash
        written = [export_gguf(src, out, type or "f16", progress=progress)]
        if vision:
            where = default_mmproj_path(out) if mmproj is None else mmproj
            written.append(export_mmproj(src, where, mmproj_type, progress=progress))
        return written
    if mmproj_type is not None:
        raise ConfigError("--mmproj-type goes with --to gguf (the type of the mmproj file written)")
    if to == "hf":
        if not Path(src).is_file():
            raise ConfigError(f"{src}: no such file; `--to hf` converts a .gguf file")
        if type is not None and type.lower() not in HF_DTYPES:
            raise ConfigError(f"--type {type!r} cannot be written to a Hugging Face checkpoint; use one of "
                              f"{', '.join(HF_DTYPES)} (or leave it out for float32)")
        dtype = None if type is None else HF_DTYPES[type.lower()]
        return [import_gguf(src, out, dtype=dtype, progress=progress, mmproj=mmproj)]
    raise ConfigError(f"unknown conversion target {to!r}; use one of {', '.join(TARGETS)}")


def add_convert_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `convert` subcommand to the `lfm2` command's subparsers."""
    p = subparsers.add_parser(
        "convert",
        help="convert a checkpoint to GGUF (llama.cpp) or a GGUF file back to a checkpoint",
        description="Convert a Hugging Face checkpoint directory (or hub id) to a GGUF file that llama.cpp runs, "
        "or a GGUF file back to a Hugging Face checkpoint directory (dequantized).",
    )
    p.add_argument("src", help="checkpoint directory or hub id (--to gguf), or a .gguf file (--to hf)")
    p.add_argument("--to", required=True, choices=TARGETS, help="the format to write")
    p.add_argument("--type", default=None, choices=sorted({*GGUF_TYPES, *HF_DTYPES}),
                   help="GGUF: type of the weight matrices (default f16); hf: dtype written (default f32)")
    p.add_argument("-o", "--out", required=True, help="the .gguf file (--to gguf) or directory (--to hf) to write")
    p.add_argument("--mmproj", default=None, metavar="OUT",
                   help="LFM2-VL: --to gguf, the mmproj file to write for the vision part (default: "
                        "mmproj-<name of -o> beside it); --to hf, the text model's mmproj file to read with it")
    p.add_argument("--mmproj-type", default=None, choices=("f32", "f16", "bf16", "q8_0"),
                   help="LFM2-VL, --to gguf: type of the mmproj file's matrices (default: --type where it is one "
                        "of these, else f16)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_convert)
    return p


def cmd_convert(args: argparse.Namespace) -> None:
    for out in convert(args.src, args.to, args.out, args.type, progress=not args.quiet, mmproj=args.mmproj,
                       mmproj_type=args.mmproj_type):
        print(f"wrote {out}", file=sys.stderr)
