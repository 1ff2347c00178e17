"""Train a byte-level BPE tokenizer laid out the way LFM2's own tokenizer is.

LFM2's `tokenizer.json` is a GPT-2 style byte-level BPE (the pipeline of `lfm2.bpe`, which GGUF
reading shares) with a post-processor that puts `<|startoftext|>` (BOS) in front when special
tokens are asked for. A tokenizer trained here is a small stand-in for the real one: same
structure, same special tokens at the same ids, so the engine, the chat templates and the tests
behave as they would with a released checkpoint.

Special-token ids follow the released vocabulary: 0 `<|pad|>`, 1 `<|startoftext|>`, 2
`<|endoftext|>`, 3-5 the fill-in-the-middle markers, 6 `<|im_start|>`, 7 `<|im_end|>`, then the
tool markers at 8-13 (`<|tool_list_start|>` ... `<|tool_response_end|>`). The released files put
the tool markers directly after `<|im_end|>` with no gap (checked against public tokenizer.json
fixtures of LFM2); code should still read ids from the tokenizer, never hard-code them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, pre_tokenizers, processors, trainers

from lfm2.bpe import build_tokenizer, pre_tokenizer
from lfm2.chat_template import DEFAULT_CHAT_TEMPLATE
from lfm2.errors import TokenizerError
from lfm2.files import atomic_write

# Used only while training with `words_alike=True`: the one character (space, quote, underscore,
# bracket) that the split regex lets a word carry in front becomes a piece of its own, so no merge
# ever joins it to the letters after it.
WORD_PREFIX_PATTERN = r"[^\p{L}\p{N}](?=\p{L})"

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|pad|>"

# In id order: the trainer gives special tokens the first ids, in the order listed.
SPECIAL_TOKENS = (
    PAD_TOKEN,  # 0
    BOS_TOKEN,  # 1
    "<|endoftext|>",  # 2
    "<|fim_pre|>",  # 3
    "<|fim_mid|>",  # 4
    "<|fim_suf|>",  # 5
    "<|im_start|>",  # 6
    EOS_TOKEN,  # 7: end of turn, what generation stops on
    "<|tool_list_start|>",  # 8
    "<|tool_list_end|>",  # 9
    "<|tool_call_start|>",  # 10
    "<|tool_call_end|>",  # 11
    "<|tool_response_start|>",  # 12
    "<|tool_response_end|>",  # 13
)

MODEL_MAX_LENGTH = 128_000  # LFM2's max_position_embeddings


def _bos_post_processor(bos_id: int) -> processors.TemplateProcessing:
    """BOS in front of every sequence, as LFM2's tokenizer.json does with add_special_tokens=True."""
    return processors.TemplateProcessing(
        single=f"{BOS_TOKEN}:0 $A:0",
        pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    out_dir: str | os.PathLike,
    chat_template: str | None = None,
    words_alike: bool = False,
) -> Path:
    """Train on `texts` and save `tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`.

    `vocab_size` counts everything: the special tokens, the 256 byte symbols and the merges.
    The folder loads with our `Tokenizer.from_dir` and with `transformers.AutoTokenizer`.
    `chat_template` defaults to lfm2's own LFM2 template. Returns the output folder.

    `words_alike=True` learns no merge that joins a word to the character before it, so a word is
    the same tokens after a space (` Vienna` in a request), a quote (`="Vienna"` in a tool call)
    or an underscore (`get_rent_price`). A tiny model can then copy a word it has never seen from
    the request into a call; with ordinary merges it would have to learn, word by word, that
    ` Vienna` and `Vienna` spell the same thing. The saved pipeline is still LFM2's (the split
    regex alone): with no such merge in the vocabulary the two encode identically, which the GGUF
    export checks, so llama.cpp's `lfm2` pre-tokenizer reads the files correctly. Text takes more
    tokens (a space is a token of its own).
    """
    minimum = len(SPECIAL_TOKENS) + 256
    if vocab_size < minimum:
        raise TokenizerError(
            f"train_tokenizer: vocab_size must be at least {minimum} ({len(SPECIAL_TOKENS)} special tokens "
            f"+ 256 byte symbols), got {vocab_size}"
        )
    tokenizer = build_tokenizer()
    tokenizer.pre_tokenizer = pre_tokenizer(WORD_PREFIX_PATTERN) if words_alike else pre_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.pre_tokenizer = pre_tokenizer()
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        found = tokenizer.token_to_id(token)
        if found != expected_id:
            raise TokenizerError(f"train_tokenizer: {token} should have id {expected_id}, got {found}")
    tokenizer.post_processor = _bos_post_processor(tokenizer.token_to_id(BOS_TOKEN))

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    special_map = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_map,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "chat_template": DEFAULT_CHAT_TEMPLATE if chat_template is None else chat_template,
    }
    files = {
        "tokenizer.json": tokenizer.to_str(pretty=True),
        "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
        "special_tokens_map.json": json.dumps(special_map, indent=2) + "\n",
    }
    for name, text in files.items():
        atomic_write(out / name, text, mode=0o644)  # tokenizer files are meant to be shared, whatever the umask
    return out
