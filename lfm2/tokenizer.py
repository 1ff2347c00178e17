"""The tokenizer of a checkpoint folder: text <-> ids, special tokens, stop ids, chat prompts.

It wraps the `tokenizers` library on the checkpoint's own `tokenizer.json` and reads the special
tokens and chat template from `tokenizer_config.json` / `special_tokens_map.json` /
`chat_template.jinja` the way transformers does, so prompts and ids match `AutoTokenizer`
without importing transformers. It renders what it is given and knows nothing of tools: readying
OpenAI-style messages and Python-callable tools for the template is the chat layer's job
(`lfm2.tools.render_chat`).

`IncrementalDetokenizer` turns a stream of generated ids into text for streaming output.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer

from lfm2.chat_template import DEFAULT_CHAT_TEMPLATE, render_chat_template
from lfm2.errors import TokenizerError

_SPECIAL_TOKEN_FIELDS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Tokens that end a turn or a document in LFM2; generation stops on them as well as on eos.
_STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")
_REPLACEMENT_CHAR = "\ufffd"


def _read_json(path: Path) -> dict | None:
    """The JSON object in `path`, None when the file is absent; a TokenizerError when it is corrupt."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"{path}: expected a JSON object, could not parse it: {exc}") from exc
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _token_text(value: Any, path: Path, field: str) -> str | None:
    """A special token as written in tokenizer_config.json: a string, or an AddedToken dict with `content`."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"{path}: field {field!r} should be a token string or {{'content': ...}}, found {value!r}")


def _eos_ids(value: Any, path: Path) -> list[int]:
    """`eos_token_id` from a generation_config.json / config.json: an int or a list of ints."""
    if value is None:
        return []
    ids = value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise TokenizerError(f"{path}: field 'eos_token_id' should be an int or a list of ints, found {value!r}")
    return ids


class Tokenizer:
    """A checkpoint's tokenizer: encode/decode, special tokens, stop ids and the chat template."""

    def __init__(
        self,
        tokenizer: _HFTokenizer,
        special_tokens: dict[str, str],
        chat_template: str | dict[str, str] | None = None,
        extra_eos_ids: Iterable[int] = (),
        name: str = "tokenizer",
    ) -> None:
        self._tok = tokenizer
        self._token_bytes: list[bytes | None] | None = None  # filled on first use (constrained decoding)
        self.special_tokens = dict(special_tokens)
        self.chat_template = chat_template
        self.name = name
        for field, token in self.special_tokens.items():
            if tokenizer.token_to_id(token) is None:
                raise TokenizerError(f"{name}: {field} {token!r} is not in the vocabulary of tokenizer.json")
        stop = set(extra_eos_ids)
        if self.eos_id is not None:
            stop.add(self.eos_id)
        stop.update(i for i in map(tokenizer.token_to_id, _STOP_TOKENS) if i is not None)
        self.stop_ids: frozenset[int] = frozenset(stop)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Load `tokenizer.json` and the special tokens, chat template and eos ids beside it."""
        root = Path(path)
        if not root.is_dir():
            raise TokenizerError(f"{root}: expected a checkpoint folder holding tokenizer.json, found no folder")
        tok_path = root / "tokenizer.json"
        if not tok_path.is_file():
            raise TokenizerError(f"{tok_path}: file not found; a checkpoint folder needs its tokenizer.json")
        try:
            tok = _HFTokenizer.from_file(str(tok_path))
        except Exception as exc:  # the Rust loader raises a bare Exception for every kind of bad file
            raise TokenizerError(f"{tok_path}: not a valid tokenizers file: {exc}") from exc

        config_path = root / "tokenizer_config.json"
        config = _read_json(config_path) or {}
        special_map_path = root / "special_tokens_map.json"
        special_map = _read_json(special_map_path) or {}
        special: dict[str, str] = {}
        for field in _SPECIAL_TOKEN_FIELDS:
            # tokenizer_config.json wins, as in transformers; special_tokens_map.json fills gaps.
            for source, origin in ((config, config_path), (special_map, special_map_path)):
                token = _token_text(source.get(field), origin, field)
                if token is not None:
                    special[field] = token
                    break

        template: str | dict[str, str] | None = config.get("chat_template")
        if isinstance(template, list):  # older format: [{"name": ..., "template": ...}, ...]
            try:
                template = {t["name"]: t["template"] for t in template}
            except (TypeError, KeyError) as exc:
                raise TokenizerError(
                    f"{config_path}: 'chat_template' list entries need 'name' and 'template', found {template!r:.200}"
                ) from exc
        jinja_path = root / "chat_template.jinja"
        if jinja_path.is_file():  # a separate template file takes priority, as in transformers
            try:
                template = jinja_path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise TokenizerError(
                    f"{jinja_path}: expected a UTF-8 Jinja template, could not read it: {exc}"
                ) from exc
        if template is not None and not isinstance(template, (str, dict)):
            raise TokenizerError(f"{config_path}: 'chat_template' should be a string, found {type(template).__name__}")

        eos_ids: list[int] = []
        for name in ("generation_config.json", "config.json"):
            data = _read_json(root / name)
            if data is not None:
                eos_ids += _eos_ids(data.get("eos_token_id"), root / name)
        return cls(tok, special, template, eos_ids, name=str(root))

    # -- vocabulary ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the embedding may be padded beyond it)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def token_bytes(self) -> list[bytes | None]:
        """Each id's bytes as it decodes inside text (None for added tokens such as the call markers).

        Byte-level BPE stores a token as the printable stand-ins of its bytes (GPT-2's table), so
        the bytes are read back through that table; a token outside it (another kind of
        tokenizer) is decoded on its own. Constrained decoding matches these against a grammar.
        """
        if self._token_bytes is None:
            byte_of = {ch: b for b, ch in _byte_level_alphabet().items()}
            added = set(self._tok.get_added_tokens_decoder())
            out: list[bytes | None] = []
            for tid in range(self.vocab_size):
                piece = self._tok.id_to_token(tid)
                if piece is None or tid in added:
                    out.append(None)
                elif all(ch in byte_of for ch in piece):
                    out.append(bytes(byte_of[ch] for ch in piece))
                else:
                    out.append(self._tok.decode([tid]).encode())
            self._token_bytes = out
        return self._token_bytes

    def to_json(self) -> str:
        """The underlying `tokenizers` pipeline serialized as tokenizer.json text (what grammar
        engines such as llguidance read to learn each token's bytes)."""
        return self._tok.to_str()

    def _special_id(self, field: str) -> int | None:
        token = self.special_tokens.get(field)
        return None if token is None else self._tok.token_to_id(token)

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def bos_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @property
    def eos_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_id(self) -> int | None:
        return self._special_id("pad_token")

    # -- text <-> ids -------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Ids of `text`. Special-token strings in the text become their ids.

        `add_special_tokens` defaults to False, unlike transformers, because nearly everything we
        encode is a rendered chat prompt, which already starts with BOS; adding another would give
        the model two. Pass True for raw text that should get BOS from the post-processor.

        A long text goes through `encode_batch`, which releases Python's GIL while it works (`encode`
        holds it: seconds for megabytes), so that a server's other threads keep running meanwhile.
        """
        if len(text) > 16384:
            return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_with_offsets(self, text: str) -> list[tuple[int, tuple[int, int]]]:
        """(id, (start, end) character span) per token, no special tokens added: for loss masks."""
        enc = self._tok.encode(text, add_special_tokens=False)
        return list(zip(enc.ids, enc.offsets, strict=True))

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # -- chat ---------------------------------------------------------------------------------

    def chat_template_source(self, tools: Sequence[Any] | None = None) -> str:
        """The template text to use: the checkpoint's (its "tool_use" one when tools are given), else ours."""
        template = self.chat_template
        if template is None:
            return DEFAULT_CHAT_TEMPLATE
        if isinstance(template, str):
            return template
        if tools is not None and "tool_use" in template:
            return template["tool_use"]
        if "default" in template:
            return template["default"]
        raise TokenizerError(
            f"{self.name}: the checkpoint has several chat templates {sorted(template)} and none named 'default'"
        )

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = False,
        **kwargs: Any,
    ) -> str:
        """Render a conversation to the prompt text (encode it with `encode`, no special tokens added).

        `messages` and `tools` reach the template as they are: tools as JSON dicts, messages as the
        template reads them. `lfm2.tools.render_chat` readies OpenAI-style ones first (callables
        described as transformers describes them, assistant `tool_calls` as LFM2's call text where
        the template cannot render them), and is what the chat API and the server use. Extra keyword
        arguments reach the template (e.g. LFM2.5's `keep_past_thinking=True`).
        """
        if tools is not None and not all(isinstance(t, Mapping) for t in tools):
            raise TokenizerError("apply_chat_template takes tools as JSON dicts; lfm2.tools.render_chat (or "
                                 "template_tools) describes Python callables first")
        source = self.chat_template_source(tools)
        template_vars = {**self.special_tokens, **kwargs}
        return render_chat_template(
            source,
            messages,
            tools=None if tools is None else list(tools),
            add_generation_prompt=add_generation_prompt,
            template_name=f"chat template of {self.name}",
            **template_vars,
        )


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level BPE vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class IncrementalDetokenizer:
    """Turn generated ids, fed one at a time, into text pieces for streaming.

    Byte-level BPE tokens can end in the middle of a UTF-8 character, so decoding each token on its
    own would print U+FFFD where a character is split. We decode a window of recent tokens that
    starts at a character boundary (`_start`), and print the window's new text except a trailing
    U+FFFD, which may still be completed by the next token. When the window decodes with no
    trailing U+FFFD its end is a character boundary, and the window restarts there, so each step
    costs the few tokens since the last boundary rather than the whole sequence. `flush()` prints
    whatever was held back. The pieces, joined, equal `tokenizer.decode(all_ids)`.

    This relies on the decoder joining tokens' bytes (true of byte-level BPE, LFM2's tokenizer).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []  # the current window: tokens since the last character boundary
        self._emitted = 0  # characters of the window's text already returned

    def _window_text(self) -> str:
        return self.tokenizer.decode(self._ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Feed one id; return the text it completes (possibly empty)."""
        self._ids.append(int(token_id))
        text = self._window_text()
        if text.endswith(_REPLACEMENT_CHAR):
            # The last character may be an incomplete byte sequence: keep it back for now.
            stable = len(text) - 1
            piece = text[self._emitted : stable] if stable > self._emitted else ""
            self._emitted = max(self._emitted, stable)
            return piece
        piece = text[self._emitted :]
        self._ids.clear()  # the window ended on a character boundary: start afresh after it
        self._emitted = 0
        return piece

    def add_many(self, token_ids: Iterable[int]) -> str:
        return "".join(self.add(t) for t in token_ids)

    def flush(self) -> str:
        """Return the held-back tail (at the end of generation an incomplete character prints as U+FFFD)."""
        piece = self._window_text()[self._emitted :] if self._ids else ""
        self._ids.clear()
        self._emitted = 0
        return piece
