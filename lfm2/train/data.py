"""Training data on disk: token files that are memory-mapped, never loaded whole.

Two kinds, each a pair of files `NAME.bin` (raw little-endian uint32 tokens) and `NAME.json`
(what is in it):
- pretraining text: documents tokenized, joined with `<|endoftext|>`, cut into windows of
  `seq_len + 1` tokens at training time (the input and its next-token targets);
- chat (SFT): each conversation rendered with the checkpoint's chat template, stored with a
  parallel `NAME.mask.bin` of 0/1 bytes that is 1 exactly on assistant tokens, so the loss is
  taken on what the model should say and never on prompts or tool results. Conversations with
  images (LFM2-VL) keep the images' encoded files, once each, in `NAME.images.bin`, and the
  metadata lists each conversation's images as byte ranges of it in prompt order: a run keeps
  working when the original files move, and the vision tower encodes them at training time.

Documents go to the train or the validation split by a hash of their text, so the split does
not depend on the order of the input and a document never sits in both.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lfm2.errors import LFM2Error
from lfm2.files import atomic_path, atomic_write
from lfm2.tokenizer import Tokenizer
from lfm2.tools import render_chat

TOKEN_DTYPE = np.uint32


def is_validation(text: str, val_fraction: float) -> bool:
    """Whether a document belongs to the validation split (stable: a hash of its text)."""
    h = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")
    return (h % 1_000_000) < val_fraction * 1_000_000


def _write_array(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        array.tofile(tmp)


def write_tokens(out: Path, name: str, ids: np.ndarray, meta: dict[str, Any], mask: np.ndarray | None = None) -> None:
    """Write a token file (and its loss mask) atomically, the metadata last."""
    out.mkdir(parents=True, exist_ok=True)
    _write_array(out / f"{name}.bin", ids.astype(TOKEN_DTYPE))
    if mask is not None:
        _write_array(out / f"{name}.mask.bin", mask.astype(np.uint8))
    atomic_write(out / f"{name}.json", json.dumps({**meta, "tokens": int(ids.size)}, indent=2) + "\n")


def prepare_text(
    documents: Iterable[str], tokenizer: Tokenizer, out_dir: str | os.PathLike, val_fraction: float = 0.02
) -> dict[str, int]:
    """Tokenize documents into `train.bin` / `val.bin`; returns the token count of each split."""
    eot = tokenizer.token_to_id("<|endoftext|>")
    if eot is None:
        raise LFM2Error("the tokenizer has no <|endoftext|> token to separate documents")
    splits: dict[str, list[int]] = {"train": [], "val": []}
    for doc in documents:
        if doc.strip():
            splits["val" if is_validation(doc, val_fraction) else "train"].extend(tokenizer.encode(doc) + [eot])
    out = Path(out_dir)
    for name, ids in splits.items():
        write_tokens(out, name, np.asarray(ids, dtype=TOKEN_DTYPE), {"kind": "text"})
    return {name: len(ids) for name, ids in splits.items()}


def assistant_mask(
    tokenizer: Tokenizer, messages: Sequence[dict[str, Any]], tools=None, last_only: bool = False,
    expand: Callable[[str], str] | None = None,
) -> tuple[list[int], list[int]]:
    """Token ids of a rendered conversation and a 0/1 mask that is 1 on assistant tokens.

    Each assistant message's span is found by rendering the conversation up to it (with the
    generation prompt) and up to and including it: the characters in between are the reply and
    its end-of-turn marker, which the model must learn to produce (tool calls included; tool
    results are a `tool` turn and never trained on). Token offsets map characters to tokens; a
    token is trained on when it starts inside a reply span. `last_only` masks the final
    assistant message only (preference pairs: the response, not the earlier turns). `expand`
    rewrites every rendering before it is measured and tokenized (images: each `<image>` marker
    becomes its image's tokens, `ImageProcessor.expand`, as a chat prompt's do).
    """
    def render(part: Sequence[dict[str, Any]], prompt: bool = False) -> str:
        text = render_chat(tokenizer, part, tools, add_generation_prompt=prompt)
        return text if expand is None else expand(text)

    text = render(messages)
    spans = []
    for i, m in enumerate(messages):
        if m.get("role") == "assistant" and (not last_only or i == len(messages) - 1):
            before = render(messages[:i], prompt=True)
            upto = render(messages[: i + 1])
            if not (text.startswith(before) and text.startswith(upto)):
                raise LFM2Error(f"message {i}: the chat template does not render conversations prefix by prefix")
            spans.append((len(before), len(upto)))
    enc = tokenizer.encode_with_offsets(text)
    ids = [t for t, _ in enc]
    mask = [int(any(a <= start < b for a, b in spans)) for _, (start, _) in enc]
    return ids, mask


def prepare_chat(
    conversations: Iterable[dict[str, Any]], tokenizer: Tokenizer, out_dir: str | os.PathLike, name: str,
    max_len: int, drop_longer: bool = False, max_text_len: int | None = None,
) -> int:
    """Render conversations (`{"messages": [...], "tools": [...]}`) into `NAME.bin` + `NAME.mask.bin`.

    A `{"text": ...}` row is plain text, trained on every token and cut to `max_len` (or the shorter
    `max_text_len`, which keeps documents from outweighing the conversations' few trained tokens): mixed into
    fine-tuning data it keeps the model's language modelling from being forgotten. A
    `{"ids": [...], "mask": [...]}` row is taken as it is (token ids and their 0/1 loss mask), such as
    `copy_rows`, which keep a model's copying from being forgotten.

    Each conversation is stored whole, followed by an offsets table in the metadata, so batches
    never mix the end of one conversation with the start of another. Conversations longer than
    `max_len` tokens raise an error naming their index, or with `drop_longer=True` are left out
    (for generated data, where a rare long one is not worth a longer row; the count is printed).
    """
    ids: list[int] = []
    mask: list[int] = []
    offsets = [0]
    eot = tokenizer.token_to_id("<|endoftext|>")
    dropped = 0
    text_len = min(max_len, max_text_len or max_len)
    for i, conv in enumerate(conversations):
        if "text" in conv:  # plain text, trained on every token, cut to text_len
            t = (tokenizer.encode(conv["text"]) + ([eot] if eot is not None else []))[:text_len]
            m = [1] * len(t)
        elif "ids" in conv:  # pre-tokenized, with its own loss mask
            t, m = [int(x) for x in conv["ids"]], [int(x) for x in conv["mask"]]
            if len(t) != len(m):
                raise LFM2Error(f"row {i}: {len(t)} token ids but {len(m)} mask values")
        else:
            t, m = assistant_mask(tokenizer, conv["messages"], conv.get("tools"))
        if len(t) > max_len:
            if not drop_longer:
                raise LFM2Error(f"conversation {i} has {len(t)} tokens, more than max_len={max_len}")
            dropped += 1
            continue
        ids.extend(t)
        mask.extend(m)
        offsets.append(len(ids))
    if dropped:
        print(f"{name}: left out {dropped} conversation(s) longer than {max_len} tokens")
    write_tokens(Path(out_dir), name, np.asarray(ids), {"kind": "chat", "offsets": offsets},
                 mask=np.asarray(mask))
    return len(offsets) - 1


def copy_rows(
    rows: int, seq_len: int, token_ids: tuple[int, int], seed: int, span: tuple[int, int] = (8, 40),
) -> tuple[np.ndarray, np.ndarray]:
    """`rows` rows of `seq_len + 1` random tokens in which one span of random length appears twice,
    and their loss masks (ids and mask arrays, both (rows, seq_len + 1)).

    The loss is on the second copy only (from its second token: the first cannot be predicted).
    Why: a tiny model pretrained on a few hundred steps of text never learns to copy from its
    context (no induction heads: its loss on a repeated random sequence equals its loss on the
    first copy), yet calling an unseen tool means copying its name and the user's argument
    values. On this task the loss sits at chance for a few hundred steps, then falls sharply as
    induction heads form. The span length varies so that "copy from k tokens back" for a fixed k
    is no solution. `token_ids` is the [low, high) range of ordinary tokens to draw from.
    """
    lo, hi = token_ids
    if not (0 <= lo < hi) or not (1 <= span[0] <= span[1]) or 2 * span[1] > seq_len + 1:
        raise LFM2Error(f"copy rows: need 0 <= low < high and spans of 1..{(seq_len + 1) // 2} tokens, "
                        f"got token_ids={token_ids}, span={span}, seq_len={seq_len}")
    rng = np.random.default_rng(seed)
    n = seq_len + 1
    ids = rng.integers(lo, hi, size=(rows, n), dtype=np.int64)
    mask = np.zeros((rows, n), dtype=np.uint8)
    for r in range(rows):
        length = int(rng.integers(span[0], span[1] + 1))
        start = int(rng.integers(0, n - 2 * length + 1))
        ids[r, start + length : start + 2 * length] = ids[r, start : start + length]
        mask[r, start + length + 1 : start + 2 * length] = 1
    return ids, mask


def prepare_copy(
    out_dir: str | os.PathLike, name: str, rows: int, seq_len: int, token_ids: tuple[int, int], seed: int,
    span: tuple[int, int] = (8, 40),
) -> int:
    """`copy_rows` written as a token file of one example per row (see `copy_rows` for why)."""
    ids, mask = copy_rows(rows, seq_len, token_ids, seed, span)
    n = seq_len + 1
    offsets = list(range(0, rows * n + 1, n))
    write_tokens(Path(out_dir), name, ids.reshape(-1), {"kind": "chat", "offsets": offsets}, mask=mask.reshape(-1))
    return rows


def write_images(out: Path, name: str, images: Sequence[Sequence[bytes]]) -> list[list[list[int]]]:
    """Write each example's encoded images into `NAME.images.bin`, a file stored once however many
    examples show it; returns each example's images as [start, end) byte ranges, for the metadata."""
    blob, where, ranges = bytearray(), {}, []
    for example in images:
        rows = []
        for data in example:
            key = hashlib.sha256(data).digest()
            if key not in where:
                where[key] = [len(blob), len(blob) + len(data)]
                blob += data
            rows.append(where[key])
        ranges.append(rows)
    out.mkdir(parents=True, exist_ok=True)
    _write_array(out / f"{name}.images.bin", np.frombuffer(bytes(blob), dtype=np.uint8))
    return ranges


@dataclass
class TokenFile:
    """A memory-mapped token file written by `prepare_text` or `prepare_chat` (or `lfm2.train.datasets`)."""

    ids: np.ndarray
    mask: np.ndarray | None
    meta: dict[str, Any]
    image_data: np.ndarray | None = None  # `NAME.images.bin`: the examples' encoded images

    def __post_init__(self) -> None:
        self._packs: tuple[int, list[tuple[int, int]]] | None = None

    @classmethod
    def open(cls, directory: str | os.PathLike, name: str) -> TokenFile:
        d = Path(directory)
        meta_path = d / f"{name}.json"
        if not meta_path.is_file():
            raise LFM2Error(f"{meta_path}: token file metadata not found; prepare the data first")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        ids = np.memmap(d / f"{name}.bin", dtype=TOKEN_DTYPE, mode="r")
        if ids.size != meta["tokens"]:
            raise LFM2Error(f"{d / name}.bin holds {ids.size} tokens, its metadata says {meta['tokens']}")
        mask_path = d / f"{name}.mask.bin"
        mask = np.memmap(mask_path, dtype=np.uint8, mode="r") if mask_path.is_file() else None
        images = None
        if meta.get("images"):
            path = d / f"{name}.images.bin"
            if not path.is_file():
                raise LFM2Error(f"{path}: not found, but {meta_path} lists images; prepare the data again")
            images = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
        return cls(ids, mask, meta, images)

    @property
    def num_images(self) -> int:
        return sum(len(rows) for rows in self.meta.get("images") or ())

    def images(self, indices: Sequence[int], seq_len: int, pack: bool = False) -> list[bytes]:
        """The encoded images of the rows `batch(indices, seq_len, pad_id, pack)` makes, in row-major
        prompt order: the order in which their features fill the rows' `<image>` tokens."""
        per_example = self.meta.get("images")
        if not per_example:
            return []
        if pack and self.meta["kind"] == "chat":
            packs = self.packs(seq_len)
            indices = [k for i in indices for k in range(*packs[i])]
        return [bytes(self.image_data[a:b]) for i in indices for a, b in per_example[i]]

    def num_examples(self, seq_len: int, pack: bool = False) -> int:
        kind = self.meta["kind"]
        if kind == "text":
            return (self.ids.size - 1) // seq_len
        if kind == "pairs":
            return (len(self.meta["offsets"]) - 1) // 2
        return len(self.packs(seq_len)) if pack else len(self.meta["offsets"]) - 1

    def packs(self, seq_len: int) -> list[tuple[int, int]]:
        """Ranges [first, last) of consecutive conversations that fit one row of `seq_len` inputs.

        Next-fit in file order, so the packing is a pure function of the file and `seq_len`
        (resumed and multi-process runs see the same rows)."""
        if self._packs is None or self._packs[0] != seq_len:
            offsets = self.meta["offsets"]
            ranges, first, used = [], 0, 0
            for i in range(len(offsets) - 1):
                n = offsets[i + 1] - offsets[i] - 1  # inputs this conversation adds
                if i > first and used + n > seq_len:
                    ranges.append((first, i))
                    first, used = i, 0
                used += n
            ranges.append((first, len(offsets) - 1))
            self._packs = (seq_len, ranges)
        return self._packs[1]

    def batch(
        self, indices: Sequence[int], seq_len: int, pad_id: int, pack: bool = False
    ) -> tuple[torch.Tensor, ...]:
        """Inputs (B, T) and targets (B, T), targets -100 where no loss is taken.

        Preference pairs give 2B rows (chosen, rejected, chosen, ...). With `pack`, each row holds
        several conversations and a third tensor of segment ids (B, T) tells the model where
        each one starts (no attention or convolution state crosses them)."""
        kind = self.meta["kind"]
        if kind == "text":
            rows = [np.asarray(self.ids[i * seq_len : i * seq_len + seq_len + 1], dtype=np.int64) for i in indices]
            x = torch.tensor(np.stack([r[:-1] for r in rows]))
            y = torch.tensor(np.stack([r[1:] for r in rows]))
            return x, y
        if kind == "chat" and pack:
            return self._packed_batch(indices, seq_len, pad_id)
        if kind == "pairs":
            indices = [j for i in indices for j in (2 * i, 2 * i + 1)]
        offsets = self.meta["offsets"]
        spans = [(offsets[i], offsets[i + 1]) for i in indices]
        T = min(seq_len, max(b - a for a, b in spans) - 1)
        x = torch.full((len(spans), T), pad_id, dtype=torch.long)
        y = torch.full((len(spans), T), -100, dtype=torch.long)
        for r, (a, b) in enumerate(spans):  # right padding: pads come after, causal attention never sees them
            ids = torch.tensor(np.asarray(self.ids[a:b], dtype=np.int64))[: T + 1]
            m = torch.tensor(np.asarray(self.mask[a:b], dtype=np.int64))[: T + 1]
            n = ids.numel() - 1
            x[r, :n] = ids[:-1]
            y[r, :n] = torch.where(m[1:].bool(), ids[1:], -100)
        return x, y

    def _packed_batch(self, indices: Sequence[int], seq_len: int, pad_id: int) -> tuple[torch.Tensor, ...]:
        offsets, packs = self.meta["offsets"], self.packs(seq_len)
        rows = []
        for i in indices:
            first, last = packs[i]
            xs, ys, segs = [], [], []
            for k in range(first, last):
                a, b = offsets[k], offsets[k + 1]
                ids = np.asarray(self.ids[a:b], dtype=np.int64)
                m = np.asarray(self.mask[a:b], dtype=bool)
                xs.append(ids[:-1])
                ys.append(np.where(m[1:], ids[1:], -100))
                segs.append(np.full(b - a - 1, k - first))
            rows.append((np.concatenate(xs)[:seq_len], np.concatenate(ys)[:seq_len], np.concatenate(segs)[:seq_len]))
        T = max(len(r[0]) for r in rows)
        x = torch.full((len(rows), T), pad_id, dtype=torch.long)
        y = torch.full((len(rows), T), -100, dtype=torch.long)
        seg = torch.full((len(rows), T), -1, dtype=torch.long)  # padding: a segment of its own
        for r, (xi, yi, si) in enumerate(rows):
            x[r, : len(xi)], y[r, : len(yi)], seg[r, : len(si)] = map(torch.from_numpy, (xi, yi, si))
        return x, y, seg
