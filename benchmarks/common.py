"""Shared by the benchmarks: random-weight checkpoints of released shapes, written once and reused."""

from lfm2.bench import random_checkpoint
from lfm2.random_checkpoint import WORDS

__all__ = ["WORDS", "random_checkpoint"]
