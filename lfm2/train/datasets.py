"""User data for fine-tuning: JSONL files checked row by row and turned into token files.

Formats (one JSON object per line):
- conversations (SFT): `{"messages": [{"role": ..., "content": ...}, ...], "tools": [...]}` in
  OpenAI's shape, assistant `tool_calls` included; rendered with the checkpoint's own chat
  template, loss on assistant tokens only. For a vision model (LFM2-VL), content may be a list of
  parts with images: OpenAI's `{"type": "image_url", "image_url": {"url": ...}}` or transformers'
  `{"type": "image", "image" | "path" | "url": ...}`, a path (relative ones from the JSONL file's
  folder) or a `data:image/...;base64,` URL. The prompt is made as a chat prompt is
  (`lfm2.images.split_images`, the chat template, `ImageProcessor.expand`);
- preference pairs (DPO): `{"prompt": str | "messages": [...], "chosen": ..., "rejected": ...}`
  where a response is a string or an assistant message;
- text (distillation, continued pretraining): `{"text": str}` rows, or a plain `.txt` file
  whose paragraphs (blank-line separated) are the documents.

A bad row is never dropped silently: with `on_error="raise"` (the default) the first one stops
the run with its line number and what is wrong; with `on_error="skip"` every skipped row is
reported on stderr with its line number, then a count.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from lfm2.errors import LFM2Error
from lfm2.images import ImageProcessor, decode_image, image_bytes, split_images
from lfm2.tokenizer import Tokenizer
from lfm2.train.data import TOKEN_DTYPE, assistant_mask, is_validation, prepare_text, write_images, write_tokens

ROLES = {"system", "user", "assistant", "tool"}


class DataError(LFM2Error):
    """A row of a data file that cannot be used; the message names the file and line."""


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) for each non-blank line; malformed JSON raises DataError."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: data file not found")
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ValueError(f"message {i} needs a role among {sorted(ROLES)}, got {m!r:.80}")
        content = m.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                if kind in ("image", "image_url"):
                    raise ValueError(f"message {i}: content part {j} is an image; images are for SFT conversations "
                                     "with a vision model (LFM2-VL)")
                if kind != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"message {i}: content part {j} ({kind!r}) must be a text part "
                                     '{"type": "text", "text": ...}')
        elif content is not None and not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string or a list of parts, got {type(content).__name__}")
        if content is None and not m.get("tool_calls"):
            raise ValueError(f"message {i} ({m['role']}) has neither content nor tool_calls")


def _image_ref(ref: Any, folder: Path) -> str:
    """An image reference of a data row: data URLs as they are, paths made absolute from the data file's folder."""
    if not isinstance(ref, str):
        raise ValueError(f"an image must be a path or a data URL (a string), got {type(ref).__name__}")
    if ref.startswith(("data:", "http://", "https://")):
        return ref  # remote URLs: `image_bytes` says they are not fetched
    path = Path(ref.removeprefix("file://")).expanduser()
    return str(path if path.is_absolute() else folder / path)


def _response(value: Any, what: str) -> dict[str, Any]:
    if isinstance(value, str):
        return {"role": "assistant", "content": value}
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict) and value.get("role", "assistant") == "assistant":
        return {"role": "assistant", **value}
    raise ValueError(f"'{what}' must be a string or one assistant message")


def _rows(path: str | os.PathLike, on_error: str, convert) -> Iterator[tuple[int, Any]]:
    """Converted rows; bad ones raise or are reported and skipped, per `on_error`."""
    if on_error not in ("raise", "skip"):
        raise LFM2Error(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    skipped = 0
    for n, row in read_jsonl(path):
        try:
            yield n, convert(row)
        except (ValueError, LFM2Error, TypeError, KeyError) as e:
            message = f"{path}:{n}: {e}"
            if on_error == "raise":
                raise DataError(message + " (use on_error='skip' / --skip-bad-rows to skip such rows)") from None
            print(f"skipped {message}", file=sys.stderr)
            skipped += 1
    if skipped:
        print(f"{path}: skipped {skipped} bad row(s)", file=sys.stderr)


def tokenize_conversations(
    path: str | os.PathLike, tokenizer: Tokenizer, max_len: int, on_error: str = "raise",
    image_processor: ImageProcessor | None = None,
) -> list[tuple[list[int], list[int]]] | list[tuple[list[int], list[int], list[bytes]]]:
    """(ids, assistant mask) per conversation row of a JSONL file; with an `image_processor` (a vision
    model's), (ids, mask, encoded images in prompt order). A missing or unreadable image is a bad row:
    the error names the line and the image's path."""
    folder = Path(path).parent
    image_id = None if image_processor is None else tokenizer.token_to_id(image_processor.image_token)

    def convert(row: Any) -> tuple[list[int], list[int]] | tuple[list[int], list[int], list[bytes]]:
        if not isinstance(row, dict) or "messages" not in row:
            raise ValueError("expected an object with a 'messages' list")
        messages, refs = row["messages"], []
        if image_processor is not None:
            messages, refs = split_images(messages, image_processor.image_token)
        _check_messages(messages)
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError("no assistant message: nothing to learn from this row")
        blobs, layouts = [], []
        for ref in refs:
            data, source = image_bytes(_image_ref(ref, folder))
            layouts.append(image_processor(decode_image(data, source)))
            blobs.append(data)
        expand = None
        if layouts:  # each rendering's `<image>` markers, in order, become their images' tokens
            def expand(text: str) -> str:
                return image_processor.expand(text, layouts[: text.count(image_processor.image_token)])
        try:
            ids, mask = assistant_mask(tokenizer, messages, row.get("tools"), expand=expand)
        except LFM2Error as e:
            raise ValueError(f"the chat template cannot render this row: {e}") from None
        if len(ids) > max_len:
            raise ValueError(f"{len(ids)} tokens, more than the maximum length {max_len}")
        if image_processor is None:
            return ids, mask
        if ids.count(image_id) != sum(x.num_tokens for x in layouts):
            raise ValueError(f"the text holds {ids.count(image_id) - sum(x.num_tokens for x in layouts)} more "
                             f"{image_processor.image_token} tokens than its {len(layouts)} image(s) fill")
        return ids, mask, blobs

    return [r for _, r in _rows(path, on_error, convert)]


def tokenize_pairs(
    path: str | os.PathLike, tokenizer: Tokenizer, max_len: int, on_error: str = "raise"
) -> list[tuple[tuple[list[int], list[int]], tuple[list[int], list[int]]]]:
    """((chosen ids, mask), (rejected ids, mask)) per preference row; masks cover the response only."""

    def convert(row: Any):
        if not isinstance(row, dict) or "chosen" not in row or "rejected" not in row:
            raise ValueError("expected an object with 'chosen', 'rejected' and 'prompt' or 'messages'")
        if "messages" in row:
            prompt = row["messages"]
        elif isinstance(row.get("prompt"), str):
            prompt = [{"role": "user", "content": row["prompt"]}]
        else:
            raise ValueError("expected 'prompt' (a string) or 'messages' (a list)")
        _check_messages(prompt)
        out = []
        for key in ("chosen", "rejected"):
            messages = [*prompt, _response(row[key], key)]
            _check_messages(messages)
            try:
                ids, mask = assistant_mask(tokenizer, messages, row.get("tools"), last_only=True)
            except LFM2Error as e:
                raise ValueError(f"the chat template cannot render this row: {e}") from None
            if len(ids) > max_len:
                raise ValueError(f"'{key}' has {len(ids)} tokens, more than the maximum length {max_len}")
            out.append((ids, mask))
        return tuple(out)

    return [r for _, r in _rows(path, on_error, convert)]


def read_texts(path: str | os.PathLike, on_error: str = "raise") -> list[str]:
    """Documents of a `.txt` file (paragraphs) or a JSONL file of `{"text": ...}` rows."""
    p = Path(path)
    if p.suffix == ".txt":
        if not p.is_file():
            raise DataError(f"{p}: data file not found")
        return [d.strip() for d in p.read_text(encoding="utf-8").split("\n\n") if d.strip()]

    def convert(row: Any) -> str:
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise ValueError("expected an object with a 'text' string")
        return row["text"]

    return [t for _, t in _rows(p, on_error, convert)]


def write_chat(
    examples: list[tuple[list[int], list[int]]] | list[tuple[list[int], list[int], list[bytes]]],
    out_dir: str | os.PathLike, name: str, kind: str = "chat",
) -> int:
    """Store tokenized sequences with their masks (and images, where the examples carry them) as a chat (or
    `pairs`) token file (see `lfm2.train.data`)."""
    if not examples:
        raise DataError(f"no usable rows for '{name}'")
    offsets = np.cumsum([0] + [len(e[0]) for e in examples]).tolist()
    ids = np.concatenate([np.asarray(e[0], dtype=TOKEN_DTYPE) for e in examples])
    mask = np.concatenate([np.asarray(e[1], dtype=np.uint8) for e in examples])
    meta: dict[str, Any] = {"kind": kind, "offsets": offsets}
    if any(len(e) > 2 and e[2] for e in examples):
        meta["images"] = write_images(Path(out_dir), name, [e[2] if len(e) > 2 else [] for e in examples])
    write_tokens(Path(out_dir), name, ids, meta, mask=mask)
    return len(examples)


def write_pairs(pairs, out_dir: str | os.PathLike, name: str) -> int:
    """Store preference pairs: sequences 2i (chosen) and 2i+1 (rejected) of a `pairs` token file."""
    if not pairs:
        raise DataError(f"no usable rows for '{name}'")
    write_chat([seq for pair in pairs for seq in pair], out_dir, name, kind="pairs")
    return len(pairs)


def prepare_finetune_data(
    kind: str, data: str | os.PathLike, tokenizer: Tokenizer, out_dir: str | os.PathLike, max_len: int,
    eval_data: str | os.PathLike | None = None, on_error: str = "raise", val_fraction: float = 0.05,
    image_processor: ImageProcessor | None = None,
) -> None:
    """Tokenize `data` (and `eval_data`) into `out_dir` as the `train` / `val` token files.

    Without `eval_data`, a `val_fraction` of the rows (chosen by a hash of their tokens and mask, so
    the split is stable) is held out for the periodic evaluation loss. `image_processor` (a vision
    model's) lets conversations carry images.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if kind == "text":
        docs = read_texts(data, on_error)
        if eval_data is None:
            prepare_text(docs, tokenizer, out, val_fraction=val_fraction)
        else:
            prepare_text(docs, tokenizer, out, val_fraction=0.0)
            held = read_texts(eval_data, on_error)
            ids = [t for d in held for t in tokenizer.encode(d) + [tokenizer.token_to_id("<|endoftext|>")]]
            write_tokens(out, "val", np.asarray(ids, dtype=TOKEN_DTYPE), {"kind": "text"})
        return
    if kind == "chat":
        def tokenize(path):
            return tokenize_conversations(path, tokenizer, max_len, on_error, image_processor)
    else:
        def tokenize(path):
            return tokenize_pairs(path, tokenizer, max_len, on_error)
    write = write_chat if kind == "chat" else write_pairs
    rows = tokenize(data)
    if eval_data is not None:
        train, val = rows, tokenize(eval_data)
    else:
        keyed = [(is_validation(json.dumps(r[:2]), val_fraction), r) for r in rows]
        train, val = [r for v, r in keyed if not v], [r for v, r in keyed if v]
        if len(train) > 1 and not val:  # tiny data sets: still hold one row out for the eval loss
            train, val = train[:-1], train[-1:]
    write(train, out, "train")
    if val:
        write(val, out, "val")
