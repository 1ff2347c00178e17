"""Reasoning models: a reply's `<think>...</think>` block split from its answer, and a thinking budget.

A reasoning model (LFM2.5-1.2B-Thinking, and LFM2.5 templates generally) writes its chain of
thought in a block before the answer::

    <think>The user wants ... so the answer is 4.</think>

    2 + 2 = 4.

Clients want the two apart, as vLLM and llama.cpp serve them: the thought in `reasoning_content`
and the answer in `content`. This module holds the pieces every path (`LLM.chat`, the server, the
CLI, `/v1/responses`) shares:

- `reasoning_tags(tokenizer, reasoning)`: whether a model's replies are split at all. Both servers
  turn a reasoning parser on per model (vLLM's `--reasoning-parser`, llama.cpp's check that the
  chat template contains `<think>`), so a model without thinking support keeps a reply that merely
  contains the text "<think>". Here it is on when the vocabulary has `<think>` and `</think>` as
  tokens of their own (what vLLM's parsers require) and the chat template mentions either (what
  llama.cpp requires): a model trained to think has both. `reasoning=True/False` overrides it.
- `split_reasoning(text)` and `ReasoningStreamParser`: the split, whole or piece by piece. As in
  llama.cpp (`common/chat-parser.cpp`, `try_parse_reasoning`): the reasoning is the block at the
  start of the reply (leading whitespace allowed, consecutive blocks joined with a newline); a
  `<think>` later in the answer is content. An unclosed block is all reasoning (vLLM's
  `BaseThinkingReasoningParser` and llama.cpp agree: a reply cut off by the token limit while
  thinking has no answer). Reasoning is stripped of surrounding whitespace and the answer of the
  whitespace after `</think>`, as llama.cpp does. When the prompt itself ends inside the block
  (a template that opens `<think>` in the generation prompt, like DeepSeek-R1's), parsing starts
  inside it (`started=True`).
- `ReplyParser` / `parse_reply`: that split composed with tool-call parsing
  (`lfm2.tools.ToolCallStreamParser` / `parse_tool_calls`): the answer goes through tool-call
  parsing as usual; the thought never does, and never reaches `content`.
- `AfterReasoning`: a logits processor (the engine's protocol, see `lfm2.engine`) that wraps the
  reply's own processor (tool-call constraint, `NoToolCalls`, a grammar) so that it applies to the
  answer only, counts the tokens of the thought and closes the block when `max_reasoning_tokens`
  is reached.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lfm2.errors import GenerationError
from lfm2.tools import partial_marker_length

THINK_START = "<think>"
THINK_END = "</think>"

Event = tuple[str, Any]  # ("reasoning", str), ("content", str) or ("tool_calls", list[dict])


# --------------------------------------------------------------------------------------------
# Which models think
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ThinkTags:
    """A vocabulary's thinking markers: their token ids, and the ids of whitespace-only tokens
    (which may come before `<think>` without starting the answer)."""

    start_id: int
    end_id: int
    whitespace: frozenset[int]


_TAGS: weakref.WeakKeyDictionary[Any, ThinkTags | None] = weakref.WeakKeyDictionary()


def think_tags(tokenizer: Any) -> ThinkTags | None:
    """The vocabulary's `<think>` / `</think>` tokens, or None unless both are tokens of their own."""
    if tokenizer in _TAGS:
        return _TAGS[tokenizer]
    start, end = tokenizer.token_to_id(THINK_START), tokenizer.token_to_id(THINK_END)
    tags = None
    if start is not None and end is not None:
        space = frozenset(i for i, b in enumerate(tokenizer.token_bytes()) if b and b.isspace())
        tags = ThinkTags(start, end, space)
    _TAGS[tokenizer] = tags
    return tags


def template_mentions_thinking(tokenizer: Any) -> bool:
    """Whether any of the tokenizer's chat templates (lfm2's default where it has none) mentions a
    thinking marker: a template written for a model that thinks renders or strips its blocks."""
    from lfm2.chat_template import DEFAULT_CHAT_TEMPLATE

    template = tokenizer.chat_template
    sources = [DEFAULT_CHAT_TEMPLATE] if template is None else [template] if isinstance(template, str) \
        else [t for t in template.values() if isinstance(t, str)]
    return any(THINK_START in s or THINK_END in s for s in sources)


def reasoning_tags(tokenizer: Any, reasoning: bool | None = None) -> ThinkTags | None:
    """The markers to split replies at, or None where replies are not split.

    `reasoning=None` (default): split when the vocabulary has both markers as tokens and the chat
    template mentions them (see the module docstring). True: split whenever the vocabulary has
    them; False: never (the thought stays in `content`, as text).
    """
    if reasoning is not None and not isinstance(reasoning, bool):
        raise GenerationError(f"reasoning={reasoning!r}: expected True, False or None (decide from the model)")
    if reasoning is False:
        return None
    tags = think_tags(tokenizer)
    if reasoning and tags is None:
        raise GenerationError(f"reasoning=True: the vocabulary of {tokenizer.name} has no {THINK_START} and "
                              f"{THINK_END} tokens, so this model writes no thinking block to split off")
    if tags is None or (reasoning is None and not template_mentions_thinking(tokenizer)):
        return None
    return tags


def prompt_opens_thinking(prompt: str) -> bool:
    """Whether a rendered prompt ends inside a thinking block (the template opened it): the reply
    then starts with the thought, without a `<think>` of its own."""
    return prompt.rstrip().endswith(THINK_START)


def check_budget(max_reasoning_tokens: Any, tags: ThinkTags | None) -> int | None:
    """`max_reasoning_tokens` checked: None, or a positive integer for a model whose replies are split."""
    if max_reasoning_tokens is None:
        return None
    if isinstance(max_reasoning_tokens, bool) or not isinstance(max_reasoning_tokens, int) or max_reasoning_tokens < 1:
        raise GenerationError(f"max_reasoning_tokens={max_reasoning_tokens!r} must be a positive integer (the most "
                              "tokens the thinking block may have)")
    if tags is None:
        raise GenerationError(f"max_reasoning_tokens={max_reasoning_tokens}: this model's replies have no thinking "
                              f"block to limit (its vocabulary lacks {THINK_START}/{THINK_END} tokens or its chat "
                              "template does not use them, or reasoning is turned off); leave it out")
    return max_reasoning_tokens


# --------------------------------------------------------------------------------------------
# Splitting text
# --------------------------------------------------------------------------------------------


def split_reasoning(text: str, started: bool = False) -> tuple[str | None, str]:
    """(reasoning, content) of a whole reply; reasoning None when there is none.

    See the module docstring for the rules; `ReasoningStreamParser` gives the same split piece by
    piece. `started`: the prompt ended inside the block, so the reply begins with the thought.
    """
    parts: list[str] = []
    rest, inside = text, started
    while True:
        if not inside:
            stripped = rest.lstrip()
            if not stripped.startswith(THINK_START):
                break
            rest = stripped[len(THINK_START):]
        inside = False
        end = rest.find(THINK_END)
        if end < 0:  # unclosed: the rest is thought
            parts.append(rest.strip())
            rest = ""
            break
        parts.append(rest[:end].strip())
        rest = rest[end + len(THINK_END):].lstrip()
    reasoning = "\n".join(p for p in parts if p)
    return reasoning or None, rest


class ReasoningStreamParser:
    """`split_reasoning` for text that arrives piece by piece.

    `feed` returns `("reasoning", text)` and `("content", text)` events as soon as they are
    certain. Held back, only while it matters: the reply's leading whitespace and any partial
    `<think>` at its start (is a block coming?), a partial `</think>` at the end of the thought,
    the thought's trailing whitespace (dropped if the block closes after it) and whitespace after
    `</think>` (dropped before the answer). For any split of a text, the events joined equal what
    `split_reasoning` returns for the whole of it.
    """

    def __init__(self, started: bool = False) -> None:
        self._state = "reasoning" if started else "start"  # start, reasoning, after (a block closed), content
        self._buffer = ""
        self._begun = False  # the current block has shown a non-space character
        self._any = False  # some reasoning emitted (a later block is joined with a newline)
        self._space = ""  # the thought's trailing whitespace, held back
        self._events: list[Event] = []

    def feed(self, piece: str) -> list[Event]:
        """Take the next piece of generated text; return the events it completes."""
        self._buffer += piece
        while self._step():
            pass
        return self._take()

    def finish(self) -> list[Event]:
        """End of the reply: what is still held (an unclosed block is thought; a partial `<think>` is content)."""
        if self._state == "reasoning":
            self._reason(self._buffer, closing=True)
        elif self._state == "start":
            self._emit("content", self._buffer)
        elif self._state == "after":
            self._emit("content", self._buffer.lstrip())
        self._buffer, self._state = "", "content"
        return self._take()

    def _step(self) -> bool:
        """Consume what the buffer allows; True when the loop should look again."""
        state, buffer = self._state, self._buffer
        if state == "content":
            self._emit("content", buffer)
            self._buffer = ""
            return False
        if state == "reasoning":
            end = buffer.find(THINK_END)
            if end >= 0:
                self._reason(buffer[:end], closing=True)
                self._buffer, self._state = buffer[end + len(THINK_END):], "after"
                return True
            keep = partial_marker_length(buffer, THINK_END)
            self._reason(buffer[: len(buffer) - keep], closing=False)
            self._buffer = buffer[len(buffer) - keep:]
            return False
        # "start" or "after": is a block opening here?
        stripped = buffer.lstrip()
        if stripped.startswith(THINK_START):
            self._buffer, self._state, self._begun = stripped[len(THINK_START):], "reasoning", False
            return True
        if not stripped or THINK_START.startswith(stripped):  # only whitespace, or a partial marker so far
            return False
        self._buffer, self._state = (buffer if state == "start" else stripped), "content"
        return True

    def _reason(self, text: str, closing: bool) -> None:
        """Emit thought text, stripped at the block's start and (when `closing`) at its end."""
        if not self._begun:
            text = text.lstrip()
            if not text:
                return
            self._begun = True
            if self._any:
                text = "\n" + text
        text = self._space + text
        body = text.rstrip()
        self._space = "" if closing else text[len(body):]
        if body:
            self._any = True
            self._emit("reasoning", body)

    def _emit(self, kind: str, text: str) -> None:
        if not text:
            return
        if self._events and self._events[-1][0] == kind:
            self._events[-1] = (kind, self._events[-1][1] + text)
        else:
            self._events.append((kind, text))

    def _take(self) -> list[Event]:
        events, self._events = self._events, []
        return events


ToolList = Sequence[Mapping[str, Any] | Callable[..., Any]] | None


class ReplyParser:
    """A reply split as it streams: thought, answer text and tool calls.

    `feed(piece)` and `finish()` return events, in order:
    `("reasoning", str)` pieces of the thought (only when `reasoning` is on), then `("content", str)`
    pieces of the answer and `("tool_calls", [call, ...])` (OpenAI's shape) as each call block
    closes (only when `tools` is not None; otherwise call markers stay content). Content and calls
    follow `lfm2.tools.ToolCallStreamParser`'s rules on the answer alone, so a thought never
    reaches either. `prefix`: text already in the prompt that the reply continues (tool_choice's
    forced `<|tool_call_start|>[`), parsed first; its events come with the first `feed` or `finish`.
    Unparsable call blocks stay content with a warning, as `parse_tool_calls` does; callers that
    must not warn (the server) filter warnings around `feed`/`finish`.
    """

    def __init__(self, tools: ToolList = None, reasoning: bool = False, started: bool = False,
                 prefix: str = "") -> None:
        from lfm2.tools import ToolCallStreamParser

        self._thought = ReasoningStreamParser(started) if reasoning else None
        self._calls = ToolCallStreamParser(tools) if tools is not None else None
        self._pending: list[Event] = []
        self._pending = self.feed(prefix) if prefix else []

    def feed(self, piece: str) -> list[Event]:
        """Take the next piece of generated text; return the events it completes."""
        events = self._thought.feed(piece) if self._thought is not None else [("content", piece)]
        return self._route(events)

    def finish(self) -> list[Event]:
        """End of the reply: flush what is held."""
        events = self._route(self._thought.finish() if self._thought is not None else [])
        if self._calls is not None:
            events += self._calls.finish()
        return events

    def _route(self, events: list[Event]) -> list[Event]:
        out, self._pending = self._pending, []
        for kind, value in events:
            if kind == "content" and self._calls is not None:
                out += self._calls.feed(value)
            elif value:
                out.append((kind, value))
        return out


def parse_reply(text: str, tools: ToolList = None, reasoning: bool = False,
                started: bool = False) -> tuple[str | None, str, list[dict[str, Any]]]:
    """(reasoning, content, tool_calls) of a whole reply: `ReplyParser`'s split, at once.

    Tool calls are parsed (`lfm2.tools.parse_tool_calls`) only when `tools` is not None.
    """
    from lfm2.tools import parse_tool_calls

    thought, content = split_reasoning(text, started) if reasoning else (None, text)
    calls: list[dict[str, Any]] = []
    if tools is not None:
        content, calls = parse_tool_calls(content, tools)
    return thought, content, calls


# --------------------------------------------------------------------------------------------
# The budget, and constraints that apply to the answer only
# --------------------------------------------------------------------------------------------


class AfterReasoning:
    """A logits processor that leaves the thought free and applies `inner` to the answer only.

    Phases: "start" (the reply's first token: `<think>` opens the thought, anything else starts
    the answer; whitespace-only tokens wait), "reasoning" (inside the block: no mask, tokens
    counted) and "answer" (every `mask`/`advance`/`look_ahead_room`/`look_ahead` call is delegated
    to `inner`, which never sees the thought). `inner` may be None (a budget alone), a tool-call
    constraint, `NoToolCalls`, or any processor of the engine's protocol, such as a grammar for
    structured output: it then constrains the answer exactly as it would a reply without thought.

    `budget` (max_reasoning_tokens): once the block holds that many tokens, `</think>` is forced
    and the model answers. Nothing else is forced: whatever the model writes after `</think>` (its
    usual blank line) is its own, and the reply's parser drops that whitespace from the content.
    `inner` sees the answer from the token after `</think>` on, that whitespace included, so a
    grammar should allow leading whitespace (JSON grammars do).
    `started`: the prompt opened the block, so the reply starts in "reasoning".
    `forced`: token ids the answer must begin with (tool_choice's `<|tool_call_start|>[name(`):
    for a thinking model they cannot go in the prompt, which would skip the thought, so they are
    forced after `</think>`, or as the first tokens where the model does not open a block (at
    "start" only `<think>` or the first forced token is allowed). They pass through `inner` like
    the model's own tokens, so `inner` must start from the state before them.

    The markers are recognised as the vocabulary's tokens (`ThinkTags`), which a model trained
    on them writes; a `</think>` spelled in several ordinary tokens is text to this processor. A
    second block right after the first (which the text parsers join to the thought, as llama.cpp
    does) is answer to this processor: `inner` applies to it and the budget does not count it.
    """

    def __init__(self, inner: Any, tags: ThinkTags, size: int, budget: int | None = None,
                 started: bool = False, forced: Sequence[int] = ()) -> None:
        self.inner, self.tags, self.size, self.budget = inner, tags, size, budget
        self.started, self.forced = started, tuple(forced)
        self.phase = "reasoning" if started else "start"
        self.thought = 0  # tokens inside the block so far
        self.pending: list[int] = []  # tokens to force next: `</think>`, then `forced`

    def fresh(self) -> AfterReasoning:
        """A processor for another generation from the same prompt (each choice of n needs its own)."""
        inner = None if self.inner is None else self.inner.fresh()
        return AfterReasoning(inner, self.tags, self.size, self.budget, self.started, self.forced)

    @property
    def answering(self) -> bool:
        """Whether `inner` is in charge now."""
        return self.phase == "answer" and not self.pending

    def mask(self) -> torch.Tensor | None:
        if self.pending:
            return self._only(self.pending[0])
        if self.phase == "reasoning":
            return None
        if self.phase == "start" and self.forced:
            return self._only(self.tags.start_id, self.forced[0])
        allowed = None if self.inner is None else self.inner.mask()
        if self.phase == "start" and allowed is not None:
            allowed = allowed.clone()
            allowed[self.tags.start_id] = True
        return allowed

    def advance(self, token: int) -> None:
        tags = self.tags
        if self.phase == "reasoning":
            if self.pending:  # the forced `</think>`
                self.pending.pop(0)
            if token == tags.end_id:
                self.phase, self.pending = "answer", list(self.forced)
                return
            self.thought += 1
            if self.budget is not None and self.thought >= self.budget:
                self.pending = [tags.end_id]
            return
        if self.phase == "start":
            if token == tags.start_id:
                self.phase = "reasoning"
                return
            if self.forced:
                self.phase, self.pending = "answer", list(self.forced)
            elif token not in tags.whitespace:
                self.phase = "answer"
        if self.pending:
            self.pending = self.pending[1:] if token == self.pending[0] else []
        if self.inner is not None:
            self.inner.advance(token)

    def look_ahead_room(self) -> int:
        return self.inner.look_ahead_room() if self.answering and self.inner is not None else 0

    def prepare(self) -> None:
        """The engine's early-mask hook: an answering inner processor (a grammar) starts its next
        mask while the forward pass runs."""
        prepare = getattr(self.inner, "prepare", None) if self.answering else None
        if prepare is not None:
            prepare()

    @staticmethod
    def look_ahead(model: Any, cache: Any, logits: torch.Tensor, processors: Sequence[Any],
                   params: Sequence[Any], generators: Sequence[Any]) -> None:
        """The engine's look-ahead hook: the inner processors of the rows that are answering look ahead."""
        from lfm2.engine import run_look_ahead

        inner = [p.inner if isinstance(p, AfterReasoning) and p.answering else None for p in processors]
        run_look_ahead(model, cache, logits, inner, params, generators)

    def _only(self, *ids: int) -> torch.Tensor:
        mask = torch.zeros(self.size, dtype=torch.bool)
        mask[list(ids)] = True
        return mask
