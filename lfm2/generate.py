"""Generation: prefill, then token-by-token decode with the caches, for a batch of prompts.

Two layers, kept apart so that the engine knows nothing about text (nanochat's rule):
- `decode_tokens` works on token ids only: it left-pads the prompts, prefills the cache in one
  call, then samples and feeds one token per row per step until every row has stopped (a stop
  id, or `max_new_tokens`). It yields each step's tokens, so callers can stream.
- `TextStream` turns one row's tokens into text pieces: an incremental detokenizer (never a
  broken UTF-8 character) plus stop strings, holding back any tail that could still become a
  stop string so a partial stop string is never printed.
`generate_text` / `stream_text` join the two for the Python API and the CLI.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from lfm2.constrain import ToolCallConstraint, apply_constraints, choose_tool_names
from lfm2.errors import GenerationError
from lfm2.models.lfm2 import Lfm2ForCausalLM
from lfm2.sampling import SamplingParams, TokenHistory, make_generator, sample_next
from lfm2.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class GenerationStats:
    """Per-request figures available to the caller (`llm.last_stats`, the CLI's `--verbose`)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    time_to_first_token_s: float = 0.0
    total_s: float = 0.0
    finish_reason: str = "length"  # "stop" (stop id or stop string) or "length" (max_new_tokens)

    @property
    def decode_tokens_per_s(self) -> float:
        """Generated tokens per second after the first token (the decode rate)."""
        decode_s = self.total_s - self.time_to_first_token_s
        return (self.completion_tokens - 1) / decode_s if self.completion_tokens > 1 and decode_s > 0 else 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.time_to_first_token_s if self.time_to_first_token_s > 0 else 0.0


@dataclass
class Step:
    """One decode step: the token each row produced, and which rows produced one (not yet stopped)."""

    tokens: list[int]
    active: list[bool]
    stopped_by_id: list[bool] = field(default_factory=list)


PREFILL_CHUNK = 512  # prompt tokens per forward pass during prefill


@torch.inference_mode()
def decode_tokens(
    model: Lfm2ForCausalLM,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    max_new_tokens: int,
    stop_ids: frozenset[int] | set[int] = frozenset(),
    ignore_eos: bool = False,
    pad_id: int = 0,
    should_stop: list[bool] | None = None,
    constraints: Sequence[ToolCallConstraint | None] | None = None,
) -> Iterator[Step]:
    """Generate up to `max_new_tokens` per prompt, yielding one `Step` per decode step.

    A row stops when it samples one of `stop_ids` (not yielded as active; unless `ignore_eos`),
    at `max_new_tokens`, or when the caller sets `should_stop[row] = True` (stop strings).
    `constraints[row]` (see `lfm2.constrain`) restricts the row's tokens inside tool-call blocks.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise GenerationError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens={max_new_tokens} must be at least 1")
    cfg = model.config
    B, T = len(prompts), max(len(p) for p in prompts)
    if T + max_new_tokens > cfg.max_position_embeddings:
        raise GenerationError(
            f"prompt of {T} tokens plus max_new_tokens={max_new_tokens} exceeds the model's context of "
            f"{cfg.max_position_embeddings} tokens; shorten the prompt or lower max_new_tokens"
        )
    for p in prompts:
        bad = [t for t in p if not 0 <= t < cfg.vocab_size]
        if bad:
            raise GenerationError(f"token id {bad[0]} is outside the vocabulary (size {cfg.vocab_size})")
    device = model.model.embed_tokens.weight.device
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for r, p in enumerate(prompts):  # left padding: every row's last prompt token is at T-1
        ids[r, T - len(p) :] = torch.tensor(list(p))
        mask[r, T - len(p) :] = True
    ids, mask = ids.to(device), mask.to(device)
    history = TokenHistory(ids, cfg.vocab_size, pad_mask=~mask) if params.needs_history else None
    generator = None if params.greedy else make_generator(params.seed, device)
    cache = model.make_cache(B, T + max_new_tokens)
    padded = not bool(mask.all())
    # Chunked prefill: activations (and the dequantized tiles of quantized layers) stay bounded by
    # the chunk, whatever the prompt length; the cache makes the result equal a single pass.
    for start in range(0, T, PREFILL_CHUNK):
        chunk = slice(start, start + PREFILL_CHUNK)
        logits = model(ids[:, chunk], cache, attention_mask=mask[:, chunk] if padded else None, last_only=True)
    logits = logits[:, -1]
    step_fn = getattr(model, "decode_step", None) or model  # lfm2.compile: a compiled step
    active = [True] * B
    should_stop = should_stop if should_stop is not None else [False] * B
    for step in range(max_new_tokens):
        if constraints:
            choose_tool_names(model, cache, logits, constraints, [params] * B, [generator] * B)
            logits = apply_constraints(logits, constraints)
        nxt = sample_next(logits, params, generator, history)
        tokens = nxt.tolist()
        for r, c in enumerate(constraints or ()):
            if c is not None:
                c.advance(tokens[r])
        by_id = [active[r] and not ignore_eos and tokens[r] in stop_ids for r in range(B)]
        now = [active[r] and not by_id[r] for r in range(B)]
        yield Step(tokens, now, by_id)
        active = [now[r] and not should_stop[r] for r in range(B)]
        if not any(active) or step == max_new_tokens - 1:
            return
        if history is not None:
            history.update(nxt, torch.tensor(active, device=device))
        logits = step_fn(nxt[:, None], cache)[:, -1]


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
    model: Lfm2ForCausalLM,
    tokenizer: Tokenizer,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    max_new_tokens: int,
    stop: Sequence[str] = (),
    ignore_eos: bool = False,
    stats: list[GenerationStats] | None = None,
    constraints: Sequence[ToolCallConstraint | None] | None = None,
) -> Iterator[tuple[int, str]]:
    """Yield (row, text piece) as tokens are generated; fills `stats` (one per row) as it goes."""
    streams = [TextStream(tokenizer, stop) for _ in prompts]
    stats = stats if stats is not None else []
    stats[:] = [GenerationStats(prompt_tokens=len(p)) for p in prompts]
    stop_flags = [False] * len(prompts)
    start = time.perf_counter()
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    steps = decode_tokens(model, prompts, params, max_new_tokens, tokenizer.stop_ids, ignore_eos, pad, stop_flags,
                          constraints)
    for step in steps:
        now = time.perf_counter() - start
        for r, tok in enumerate(step.tokens):
            st = stats[r]
            if step.stopped_by_id[r]:  # decode_tokens has already retired the row
                st.finish_reason, st.total_s = "stop", now
                if st.completion_tokens == 0:
                    st.time_to_first_token_s = now
            if not step.active[r]:
                continue
            if st.completion_tokens == 0:
                st.time_to_first_token_s = now
            st.completion_tokens += 1
            st.total_s = now
            piece = streams[r].push(tok)
            if streams[r].stopped:
                st.finish_reason = "stop"
                stop_flags[r] = True
            if piece:
                yield r, piece
    for r, s in enumerate(streams):
        piece = s.finish()
        if piece:
            yield r, piece
