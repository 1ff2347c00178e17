"""Shared by the benchmarks: random-weight checkpoints of released shapes, written once and reused."""

from lfm2.bench import WORDS, random_checkpoint

__all__ = ["WORDS", "random_checkpoint"]
