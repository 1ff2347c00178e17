"""LFM2's tokenizer pipeline, empty of vocabulary: what both reading a GGUF file and training share.

LFM2's `tokenizer.json` is a GPT-2 style byte-level BPE: the Llama-3 split regex as pre-tokenizer
(spec section 6), then `ByteLevel(add_prefix_space=False, use_regex=False)`, a BPE model with
`ignore_merges=True` (a pre-token that is itself in the vocabulary is taken whole, as llama.cpp's
`lfm2` pre-tokenizer does), and a ByteLevel decoder. `lfm2.gguf` fills it with a file's vocabulary
and merges; `lfm2.train.tokenizer` trains one. It lives here, on the runtime side, so that loading
a model never imports training code.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

# Llama-3 split regex, which llama.cpp uses for pre-tokenizer `lfm2` (spec section 6).
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def pre_tokenizer(*extra_patterns: str) -> pre_tokenizers.PreTokenizer:
    """The split regex then ByteLevel; `extra_patterns` split the pieces further (training only:
    LFM2's own files use none)."""
    patterns = (SPLIT_PATTERN, *extra_patterns)
    splits = [pre_tokenizers.Split(Regex(p), behavior="isolated", invert=False) for p in patterns]
    return pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def build_tokenizer() -> Tokenizer:
    """An empty tokenizer with LFM2's pipeline: set `.model` to a filled `models.BPE`, or train it."""
    tokenizer = Tokenizer(models.BPE(ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


__all__ = ["SPLIT_PATTERN", "build_tokenizer", "pre_tokenizer"]
