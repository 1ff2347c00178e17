"""Text over the engine: token ids in, text pieces out, for the Python API and the CLI.

`lfm2.engine.Engine` produces tokens (prefill, decode, sampling, prefix reuse); this module turns
each request's tokens into text:
- `TextStream` is an incremental detokenizer (never a broken UTF-8 character) plus stop strings,
  holding back any tail that could still become a stop string so a partial one is never printed;
  the server uses it too;
- `stream_text` runs a batch of prompts through an engine and yields (row, text piece) as they come.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator, Sequence
from typing import Any

from lfm2.engine import Engine, Request, Result, TokenLogprob
from lfm2.errors import GenerationError
from lfm2.sampling import SamplingParams
from lfm2.tokenizer import IncrementalDetokenizer, Tokenizer


class TextStream:
    """One row's tokens to text pieces, with stop strings cut out and never partially printed."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        if isinstance(stop, str):
            stop = [stop]
        if any(not isinstance(s, str) or not s for s in stop):
            raise GenerationError(f"stop strings must be non-empty strings, got {list(stop)!r}")
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stop = list(stop)
        self.pending = ""
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; return the text that is now safe to print."""
        if self.stopped:
            return ""
        self.pending += self.detok.add(token_id)
        return self._release(final=False)

    def finish(self) -> str:
        """End of generation: return whatever is still held back (minus a stop string)."""
        if self.stopped:
            return ""
        self.pending += self.detok.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            out, self.pending, self.stopped = self.pending[: min(hits)], "", True
            return out
        hold = 0 if final else self._partial_stop_suffix()
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def _partial_stop_suffix(self) -> int:
        """Length of the longest tail of `pending` that is the start of some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(s[:n]):
                    best = n
                    break
        return best


def stream_text(
    engine: Engine,
    tokenizer: Tokenizer,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | Sequence[SamplingParams],
    max_new_tokens: int,
    stop: Sequence[str] = (),
    ignore_eos: bool = False,
    stats: list[Result] | None = None,
    constraints: Sequence[Any] | None = None,
    checkpoints: Sequence[Sequence[int]] | None = None,
    logprobs: int | None = None,
    token_logprobs: list[list[TokenLogprob]] | None = None,
    embeds: Sequence[Any] | None = None,
) -> Iterator[tuple[int, str]]:
    """Yield (row, text piece) as `engine` generates each prompt's reply (all decoded together).

    `params`: one for every row, or a list with each row's. Fills `stats` with one `Result` per row
    when they finish, and `token_logprobs` (one list per row) with each generated token's logprob
    and `logprobs` alternatives when `logprobs` is set.
    `checkpoints[row]`: prompt lengths whose state the prefix cache keeps (ends of chat turns).
    `embeds[row]`: the row's `Request.embed` (a prompt with images), or None.
    """
    streams = [TextStream(tokenizer, stop) for _ in prompts]
    pieces: collections.deque[tuple[int, str]] = collections.deque()

    def on_token(row: int):
        def push(token: int) -> bool:
            piece = streams[row].push(token)
            if piece:
                pieces.append((row, piece))
            return streams[row].stopped
        return push

    row_params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    requests = [
        Request(list(p), row_params[r], max_new_tokens, on_token(r), stop_ids=tokenizer.stop_ids, ignore_eos=ignore_eos,
                constraint=None if not constraints else constraints[r], logprobs=logprobs,
                checkpoints=() if not checkpoints else checkpoints[r], embed=None if not embeds else embeds[r])
        for r, p in enumerate(prompts)
    ]
    for _ in engine.run(requests):
        while pieces:
            yield pieces.popleft()
    for r, s in enumerate(streams):
        piece = s.finish()
        if piece:
            yield r, piece
    if stats is not None:
        stats[:] = [r.result for r in requests]
    if token_logprobs is not None:
        token_logprobs[:] = [r.token_logprobs for r in requests]
    failed = next((r.result for r in requests if r.result.finish_reason == "error"), None)
    if failed is not None:
        raise GenerationError(f"generation failed: {failed.error}")


def token_bytes(tokenizer: Tokenizer, token: int) -> bytes:
    """A token's bytes as it decodes inside text; an added token (markers, `<|im_end|>`) as its own text."""
    table = tokenizer.token_bytes()
    data = table[token] if 0 <= token < len(table) else None
    return data if data is not None else (tokenizer.id_to_token(token) or "").encode()


def token_text(tokenizer: Tokenizer, token: int) -> str:
    """A token as text for logprobs (bytes of a partial UTF-8 character shown as U+FFFD)."""
    return token_bytes(tokenizer, token).decode("utf-8", errors="replace")


def logprob_entries(tokenizer: Tokenizer, items: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
    """`TokenLogprob`s in OpenAI's chat format: `{"token", "logprob", "bytes", "top_logprobs"}` per
    token, the token as its text (a partial UTF-8 character shown as U+FFFD, whole in `bytes`)."""

    def one(token: int, logprob: float) -> dict[str, Any]:
        data = token_bytes(tokenizer, token)
        return {"token": data.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(data)}

    return [{**one(i.token, i.logprob), "top_logprobs": [one(t, lp) for t, lp in i.top]} for i in items]
