"""Shared by the benchmarks: random-weight checkpoints of released shapes, written once and reused."""

from __future__ import annotations

import sys
from pathlib import Path

WORDS = ("the quick brown fox jumps over a lazy dog while liquid models run fast on small devices and "
         "numbers like 12345 or 3.14159 appear in text").split()


def random_checkpoint(preset_name: str, out: Path) -> Path:
    """Write (once) a random float32 checkpoint of `preset_name` with a tokenizer covering its vocabulary."""
    if (out / "model.safetensors").is_file():
        return out
    import torch
    from tokenizers import Tokenizer as HFTokenizer

    from lfm2.config import preset
    from lfm2.models import build_model
    from lfm2.train.tokenizer import train_tokenizer
    from lfm2.weights import save_checkpoint

    config = preset(preset_name)
    print(f"writing a random {preset_name} checkpoint to {out} ...", file=sys.stderr, flush=True)
    corpus = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(40)) for i in range(200)]
    train_tokenizer(corpus, vocab_size=1000, out_dir=out)
    tok = HFTokenizer.from_file(str(out / "tokenizer.json"))
    tok.add_tokens([f"<t{i}>" for i in range(tok.get_vocab_size(), config.vocab_size)])
    tok.save(str(out / "tokenizer.json"))
    torch.manual_seed(0)
    save_checkpoint(build_model(config, device="cpu"), out)
    return out
