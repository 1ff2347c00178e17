"""The tiny LFM2 that ships inside the package, so lfm2 works out of the box without a network.

It is built from scratch by `python -m lfm2.train.bundle --out DIR --device cuda --install` (or
without `--device`, on the CPU, in hours); its model card
(`lfm2-tiny/README.md`) records the data, the licences, the command and the measured quality.
"""

from __future__ import annotations

from pathlib import Path

from lfm2.errors import CheckpointError

NAME = "lfm2-tiny"


def default_model_path() -> Path:
    """The directory of the bundled model (a normal Hugging Face-layout checkpoint)."""
    return Path(__file__).resolve().parent / NAME


def require_default_model() -> Path:
    path = default_model_path()
    if not (path / "config.json").is_file():
        raise CheckpointError(
            f"{path}: the bundled model is missing from this installation; rebuild it with "
            "`python -m lfm2.train.bundle --out runs/tiny --install`, or pass --model"
        )
    return path
