"""Constrained decoding of tool calls: inside `<|tool_call_start|>...<|tool_call_end|>`, only tokens
that keep the call valid against the offered tools' schemas.

A model that decides to call a tool may still misspell the tool's name, invent a parameter, write a
word where the schema wants a number, or never close the list. With a constraint, every token it
samples inside a call block keeps the block a prefix of

    [name(param=value, ...), ...]<|tool_call_end|>

where each name is one of the listed tools, each parameter one of that tool's (once each, every
required one before the `)`), and each value a literal of the parameter's JSON-schema type (strings
quoted, numbers as digits, `True`/`False`/`None`, enums as one of their values; arrays, objects and
untyped parameters as any bracket-balanced literal). Outside call blocks nothing is constrained: the
model still chooses whether to call a tool at all. vLLM and llama.cpp do the same with grammars
(guided decoding); this is that idea for exactly one grammar, small enough to read. Where a
parameter's schema says more than a type and an enum (ranges, patterns, lengths, nested objects),
or the reply also has a format, the chat layer uses `lfm2.structured.calls_constraint` instead: the
same call syntax as a grammar for llguidance, which holds each value to its full schema.

How: `ToolCallGrammar` is a recognizer over bytes (byte-level BPE tokens are byte strings) whose
states are small hashable tuples. The tokens allowed in a state are found by walking a byte trie of
the vocabulary with the recognizer, pruning every branch it rejects, and the mask is cached per
state: a state recurs (every string value is in the same few states), so after the first call a
step costs a dictionary lookup. `ToolCallConstraint` follows one generation token by token.

Which tool: where a call's name begins, `choose_tool_names` scores every listed tool's whole name
(`name(`) with the model and the reply goes on with the most likely one (when sampling, one drawn
from the names' probabilities under the sampling parameters). Token by token, a mask lets the model
commit to a name's first token before it has read the rest: after `[`, the verb of `lookup_postcode`
is all it may choose, and a small model that cannot tell which verb goes with "postcode" is stuck
with the tool it picked. The name as a whole is a single choice among a handful, and its probability
counts the subject too. It is the whole name's probability (no per-token normalisation): once a trained
model has read which tool is meant, the rest of its name is near-certain, so a longer name costs
little. (Right tools of 400 held-out requests, token by token / whole names: the bundled model before
its recipe's step 9, 327 / 368; after it, a stage that trains telling similar tools apart by their
subject, 326 / 392; `benchmarks/tool_choice.py`.)
"""

from __future__ import annotations

import json
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from lfm2.errors import ToolError
from lfm2.sampling import SamplingParams, apply_temperature, draw, min_p_filter, top_k_filter, top_p_filter
from lfm2.tools import TOOL_CALL_END, TOOL_CALL_START, tool_schema

State = tuple  # ("kind", ...): see ToolCallGrammar.step
MAX_NUMBER_DIGITS = 20  # a greedy model can repeat a digit forever; no JSON number needs more
GRAMMAR_CACHE = 32  # tool lists whose grammars (and masks) a vocabulary keeps
_KIND_OF_TYPE = {"string": "string", "integer": "integer", "number": "number", "boolean": "boolean", "null": "null",
                 "array": "compound", "object": "compound"}  # JSON-schema type -> the literal form it takes
ANY_LITERAL = ("compound", "boolean", "null", "number", "string")  # untyped parameters (sorted, as kinds are)

_DIGITS = frozenset(b"0123456789")
_IDENT_START = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_IDENT = _IDENT_START | _DIGITS
_CLOSE = {ord("]"): ord("["), ord("}"): ord("{"), ord(")"): ord("(")}
# Bytes that keep a string (quoted by the key) or a compound literal's top level where they are.
_PLAIN_TEXT = {q: bytes(b for b in range(256) if b not in (q, ord("\\"), ord("\n"))) for q in (ord("'"), ord('"'))}
_PLAIN_COMPOUND = bytes(b for b in range(256) if b not in b"'\"[]{}()\n")


class _Tool:
    """What the grammar needs of one tool: its name, parameters, their value kinds, and the required ones."""

    def __init__(self, schema: Mapping[str, Any]) -> None:
        fn = tool_schema(schema)["function"]
        self.name: bytes = fn["name"].encode()
        params = fn.get("parameters") or {}
        props = params.get("properties")
        # No "properties" at all: any identifier may be a parameter, with any literal value.
        self.free = not isinstance(props, Mapping)
        self.params: dict[bytes, tuple[str, ...]] = {}
        for key, spec in (props or {}).items():
            self.params[key.encode()] = _value_kinds(spec if isinstance(spec, Mapping) else {})
        required = params.get("required") or []
        self.required = frozenset(r.encode() for r in required if isinstance(r, str) and r.encode() in self.params)


def _value_kinds(spec: Mapping[str, Any]) -> tuple[str, ...]:
    """The literal forms a parameter's schema admits: ("enum", UTF-8 reprs...) or a set of kinds."""
    if isinstance(spec.get("enum"), list) and spec["enum"]:
        reprs: list[str] = []
        for v in spec["enum"]:
            if isinstance(v, str):
                reprs += [repr(v), '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"']
            elif v is None or isinstance(v, (bool, int, float)):
                reprs.append(repr(v))
            else:
                return ANY_LITERAL  # an enum of lists or dicts
        return ("enum", *dict.fromkeys(r.encode() for r in reprs))
    types = spec.get("type")
    types = [types] if isinstance(types, str) else types if isinstance(types, list) else []
    kinds = {_KIND_OF_TYPE[t] for t in types if t in _KIND_OF_TYPE}
    if not kinds:  # untyped, or types we do not know
        return ANY_LITERAL
    if "number" in kinds:
        kinds.discard("integer")
    return tuple(sorted(kinds))


class ToolCallGrammar:
    """The language of call blocks for a list of tools, recognised byte by byte.

    States (tuples, so they hash): ("open",) before `[`; ("name", prefix, space_ok); ("args", tool,
    used, space_ok); ("param", tool, used, prefix); ("value", tool, used, param); ("str", tool, used,
    quote, escaped); ("num", tool, used, integer, phase, digits); ("word", tool, used, options, done);
    ("compound", tool, used, stack, quote, escaped); ("after_value", tool, used); ("after_call",);
    ("end",) where only `<|tool_call_end|>` may follow. `step` returns the next state or None.
    `masks` caches the allowed tokens per state for the vocabulary the grammar is used with.
    """

    def __init__(self, tools: Sequence[Mapping[str, Any]]) -> None:
        if not tools:
            raise ToolError("constrained tool calls need at least one tool")
        self.tools = [_Tool(t) for t in tools]
        self.masks: dict[State, torch.Tensor] = {}
        self.name_ids: list[list[int]] | None = None  # each tool's `name(` as tokens, for `choose_tool_names`

    def initial(self) -> State:
        return ("open",)

    def loop_bytes(self, state: State) -> bytes | None:
        """Bytes that leave `state` as it is (a string's plain characters), or None: every token made
        only of them is allowed there, which spares walking most of the vocabulary in a string."""
        if state[0] == "str" and not state[4]:
            return _PLAIN_TEXT[state[3]]
        if state[0] == "compound" and not state[5]:
            return _PLAIN_TEXT[state[4]] if state[4] is not None else _PLAIN_COMPOUND
        return None

    def feed(self, state: State | None, data: bytes) -> State | None:
        for byte in data:
            if state is None:
                return None
            state = self.step(state, byte)
        return state

    def step(self, state: State, b: int) -> State | None:  # noqa: C901 - one branch per state, flat on purpose
        kind = state[0]
        if kind == "open":
            return ("name", b"", False) if b == ord("[") else None
        if kind == "name":
            prefix, space_ok = state[1], state[2]
            if b == ord(" ") and space_ok and not prefix:
                return ("name", b"", False)
            if b == ord("("):
                for i, t in enumerate(self.tools):
                    if t.name == prefix:
                        return ("args", i, frozenset(), False)
                return None
            longer = prefix + bytes([b])
            return ("name", longer, False) if any(t.name.startswith(longer) for t in self.tools) else None
        if kind == "args":
            i, used, space_ok = state[1:]
            if b == ord(")"):
                return self._close(i, used)
            if b == ord(" ") and space_ok:
                return ("args", i, used, False)
            return self.step(("param", i, used, b""), b)
        if kind == "param":
            i, used, prefix = state[1], state[2], state[3]
            tool = self.tools[i]
            if b == ord("="):
                if prefix and (prefix in tool.params or tool.free) and prefix not in used:
                    return ("value", i, used | {prefix}, prefix)
                return None
            longer = prefix + bytes([b])
            if tool.free:
                ok = b in (_IDENT if prefix else _IDENT_START)
            else:
                ok = any(p.startswith(longer) for p in tool.params if p not in used)
            return ("param", i, used, longer) if ok else None
        if kind == "value":
            i, used, param = state[1], state[2], state[3]
            tool = self.tools[i]
            kinds = tool.params.get(param, ANY_LITERAL)  # a free tool's parameters are untyped
            if kinds[0] == "enum":
                return self.step(("word", i, used, kinds[1:], 0), b)
            if b in (ord("'"), ord('"')) and "string" in kinds:
                return ("str", i, used, b, False)
            if (b in _DIGITS or b == ord("-")) and ("number" in kinds or "integer" in kinds):
                return self.step(("num", i, used, "number" not in kinds, "start", 0), b)
            words = ((b"True", b"False") if "boolean" in kinds else ()) + ((b"None",) if "null" in kinds else ())
            if words and b in b"TFN":
                return self.step(("word", i, used, words, 0), b)
            if b in (ord("["), ord("{")) and "compound" in kinds:
                return ("compound", i, used, bytes([b]), None, False)
            return None
        if kind == "str":
            i, used, quote, escaped = state[1:]
            inside = _quoted_byte(b, quote, escaped)
            if inside is None:
                return None
            return ("str", i, used, quote, inside[1]) if inside[0] else ("after_value", i, used)
        if kind == "num":
            i, used, integer, phase, digits = state[1:]
            if b == ord("-") and phase == "start":
                return ("num", i, used, integer, "sign", 0)
            if b in _DIGITS:
                if digits >= MAX_NUMBER_DIGITS or phase == "zero":  # Python allows no 07
                    return None
                if phase in ("start", "sign"):
                    phase = "zero" if b == ord("0") else "int"
                elif phase == "dot":
                    phase = "frac"
                return ("num", i, used, integer, phase, digits + 1)
            if b == ord(".") and phase in ("int", "zero") and not integer:
                return ("num", i, used, integer, "dot", digits)
            if phase in ("int", "zero", "frac"):
                return self.step(("after_value", i, used), b)
            return None
        if kind == "word":
            i, used, options, done = state[1:]
            left = tuple(o for o in options if len(o) > done and o[done] == b)
            if left:
                return ("word", i, used, left, done + 1)
            if any(len(o) == done for o in options):
                return self.step(("after_value", i, used), b)
            return None
        if kind == "compound":
            i, used, stack, quote, escaped = state[1:]
            if quote is not None:
                inside = _quoted_byte(b, quote, escaped)
                if inside is None:
                    return None
                return ("compound", i, used, stack, quote if inside[0] else None, inside[1])
            if b in (ord("'"), ord('"')):
                return ("compound", i, used, stack, b, False)
            if b in (ord("["), ord("{"), ord("(")):
                return ("compound", i, used, stack + bytes([b]), None, False)
            if b in _CLOSE:
                if stack[-1] != _CLOSE[b]:
                    return None
                return ("compound", i, used, stack[:-1], None, False) if len(stack) > 1 else ("after_value", i, used)
            return None if b == ord("\n") else state
        if kind == "after_value":
            i, used = state[1], state[2]
            if b == ord(","):
                tool = self.tools[i]
                more = tool.free or any(p not in used for p in tool.params)
                return ("args", i, used, True) if more else None
            return self._close(i, used) if b == ord(")") else None
        if kind == "after_call":
            if b == ord(","):
                return ("name", b"", True)
            return ("end",) if b == ord("]") else None
        return None  # "end": only the end marker, which is a token, not bytes

    def _close(self, tool: int, used: frozenset[bytes]) -> State | None:
        """`)`: the call ends, once every required parameter has been given."""
        return ("after_call",) if self.tools[tool].required <= used else None


def _quoted_byte(b: int, quote: int, escaped: bool) -> tuple[bool, bool] | None:
    """Byte `b` inside a string opened by `quote`: (still inside, next byte escaped), or None where
    it cannot stand (a raw newline)."""
    if b == ord("\n"):
        return None
    if escaped:
        return True, False
    if b == ord("\\"):
        return True, True
    return b != quote, False


class _Trie:
    """The vocabulary's byte strings as a trie: node = (ids ending here, {byte: child})."""

    def __init__(self, token_bytes: Sequence[bytes | None]) -> None:
        self.root: tuple[list[int], dict[int, Any]] = ([], {})
        for tid, data in enumerate(token_bytes):
            if not data:
                continue
            node = self.root
            for byte in data:
                node = node[1].setdefault(byte, ([], {}))
            node[0].append(tid)


class ToolCallConstraint:
    """Follows one generation; `mask()` is None outside call blocks, else the allowed token ids.

    `forced` is text already in the prompt that the model's reply continues (tool_choice's
    `<|tool_call_start|>[` or `<|tool_call_start|>[name(`): the constraint starts where it ends.
    """

    def __init__(self, grammar: ToolCallGrammar, vocab: TokenVocabulary, forced: str = "",
                 whole_names: bool = True) -> None:
        self.grammar, self.vocab, self.forced, self.whole_names = grammar, vocab, forced, whole_names
        self.state: State | None = None
        self.pending: list[int] = []  # a chosen name's tokens, still to be emitted (see `choose_tool_names`)
        if forced:
            if not forced.startswith(TOOL_CALL_START):
                raise ToolError(f"forced reply text {forced!r} does not start a tool call")
            self.state = grammar.feed(grammar.initial(), forced[len(TOOL_CALL_START):].encode())
            if self.state is None:
                raise ToolError(f"forced reply text {forced!r} is not a valid start of a call to the offered tools")

    def fresh(self) -> ToolCallConstraint:
        """A constraint for another generation from the same prompt (each choice of n needs its own)."""
        return ToolCallConstraint(self.grammar, self.vocab, self.forced, self.whole_names)

    @property
    def name_ids(self) -> list[list[int]] | None:
        """Each offered tool's `name(` as tokens (what `choose_tool_names` scores)."""
        return self.grammar.name_ids

    def at_name(self) -> bool:
        """Whether a call's name begins here and is to be chosen whole (`choose_tool_names`)."""
        return (self.whole_names and self.grammar.name_ids is not None and not self.pending
                and self.state is not None and self.state[0] == "name" and not self.state[1])

    def force(self, ids: Sequence[int]) -> None:
        """Emit `ids` next, whatever the logits say (`mask` allows only the next of them)."""
        self.pending = list(ids)

    def look_ahead_room(self) -> int:
        """Cache slots the look-ahead needs now (the engine's logits-processor protocol): where a
        call's name begins, room to score the longest listed name; elsewhere 0 (no look-ahead)."""
        return max(len(ids) for ids in self.grammar.name_ids) if self.at_name() else 0

    @staticmethod
    def look_ahead(model: Any, cache: Any, logits: torch.Tensor, processors: Sequence[Any],
                   params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]) -> None:
        """The engine's look-ahead hook: choose the rows' tool names whole (`choose_tool_names`)."""
        choose_tool_names(model, cache, logits, processors, params, generators)

    def mask(self) -> torch.Tensor | None:
        """The tokens allowed next, or None where nothing is constrained. A state no token can
        continue (a vocabulary without single-byte tokens) ends the constraint rather than the text."""
        if self.state is None:
            return None
        if self.pending:
            mask = torch.zeros(self.vocab.size, dtype=torch.bool)
            mask[self.pending[0]] = True
            return mask
        masks = self.grammar.masks
        if self.state not in masks:
            masks[self.state] = self.vocab.allowed(self.grammar, self.state)
        mask = masks[self.state]
        if not bool(mask.any()):
            self.state = None
            return None
        return mask

    def advance(self, token: int) -> None:
        v = self.vocab
        if self.pending:
            self.pending = self.pending[1:] if token == self.pending[0] else []
        if self.state is None:
            if token == v.start_id:
                self.state = self.grammar.initial()
        elif self.state == ("end",):
            self.state = None  # the end marker closed the block (the mask allowed nothing else)
        else:
            data = v.token_bytes[token] if 0 <= token < len(v.token_bytes) else None
            self.state = self.grammar.feed(self.state, data) if data else None


class NoToolCalls:
    """A reply that may not call tools: the call markers are masked, everything else is free.

    A model cannot call a tool that was not offered (no tools, or `tool_choice="none"`), so the
    marker that opens a call must never reach the reply: left alone, a model trained on tool use
    may still open a block and the user would see `<|tool_call_start|>[...` as text. It follows
    the engine's logits-processor protocol (`mask`, `advance`, `look_ahead_room`) and `fresh`, as
    `ToolCallConstraint` does, so the engine treats it like any other constraint.
    """

    def __init__(self, banned: Sequence[int], size: int) -> None:
        self.banned = [t for t in banned if 0 <= t < size]
        self._mask = torch.ones(size, dtype=torch.bool)
        self._mask[self.banned] = False

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, size: int) -> NoToolCalls | None:
        """None when the vocabulary has no call markers (nothing to keep out)."""
        ids = [tokenizer.token_to_id(m) for m in (TOOL_CALL_START, TOOL_CALL_END)]
        ids = [i for i in ids if i is not None]
        return cls(ids, size) if ids else None

    def fresh(self) -> NoToolCalls:
        return self  # stateless

    def at_name(self) -> bool:
        return False

    def look_ahead_room(self) -> int:
        return 0

    def force(self, ids: Sequence[int]) -> None:
        raise ToolError("a reply that may not call tools cannot be forced into a call")

    def mask(self) -> torch.Tensor:
        return self._mask

    def advance(self, token: int) -> None:
        pass


class TokenVocabulary:
    """A tokenizer's tokens as bytes (None for special tokens), its trie, and the call markers' ids."""

    def __init__(self, token_bytes: Sequence[bytes | None], start_id: int, end_id: int, size: int) -> None:
        self.token_bytes = list(token_bytes)
        self.start_id, self.end_id, self.size = start_id, end_id, size
        self.trie = _Trie(self.token_bytes)
        self.grammars: OrderedDict[str, ToolCallGrammar] = OrderedDict()
        self._loops: dict[bytes, tuple[torch.Tensor, _Trie]] = {}

    def _loop_split(self, loop: bytes) -> tuple[torch.Tensor, _Trie]:
        """The tokens made only of `loop` bytes (a mask), and a trie of all the others."""
        if loop not in self._loops:
            inside = [bool(b) and not b.translate(None, loop) for b in self.token_bytes]
            mask = torch.zeros(self.size, dtype=torch.bool)
            mask[: len(inside)] = torch.tensor(inside, dtype=torch.bool)
            rest = _Trie([None if keep else b for b, keep in zip(self.token_bytes, inside, strict=True)])
            self._loops[loop] = (mask, rest)
        return self._loops[loop]

    def grammar(self, tools: Sequence[Mapping[str, Any]]) -> ToolCallGrammar:
        """The grammar of `tools`, reused (with its masks) while the same tool list keeps coming."""
        key = json.dumps([tool_schema(t) for t in tools], sort_keys=True, default=str)
        if key in self.grammars:
            self.grammars.move_to_end(key)
        else:
            self.grammars[key] = ToolCallGrammar(tools)
            if len(self.grammars) > GRAMMAR_CACHE:
                self.grammars.popitem(last=False)
        return self.grammars[key]

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, size: int | None = None) -> TokenVocabulary:
        start, end = tokenizer.token_to_id(TOOL_CALL_START), tokenizer.token_to_id(TOOL_CALL_END)
        if start is None or end is None:
            raise ToolError(
                f"{tokenizer.name}: the vocabulary has no {TOOL_CALL_START} / {TOOL_CALL_END} tokens, so tool calls "
                "cannot be constrained"
            )
        return cls(tokenizer.token_bytes(), start, end, size or tokenizer.vocab_size)

    def allowed(self, grammar: ToolCallGrammar, state: State) -> torch.Tensor:
        """Boolean mask over the vocabulary: the tokens whose bytes `grammar` accepts from `state`."""
        mask = torch.zeros(self.size, dtype=torch.bool)
        if state == ("end",):
            mask[self.end_id] = True
            return mask
        trie, loop = self.trie, grammar.loop_bytes(state)
        if loop is not None:
            inside, trie = self._loop_split(loop)
            mask |= inside
        ids: list[int] = []
        stack = [(trie.root, state)]
        while stack:
            (_, children), st = stack.pop()
            for byte, child in children.items():
                nxt = grammar.step(st, byte)
                if nxt is not None:
                    ids.extend(child[0])
                    if child[1]:
                        stack.append((child, nxt))
        if ids:
            mask[torch.tensor(ids)] = True
        return mask


_VOCABULARIES: weakref.WeakKeyDictionary[Any, TokenVocabulary] = weakref.WeakKeyDictionary()


def tool_call_constraint(tokenizer: Any, tools: Iterable[Mapping[str, Any]], forced: str = "",
                         vocab_size: int | None = None, whole_names: bool = True) -> ToolCallConstraint:
    """A fresh constraint for one generation (each tokenizer's vocabulary trie is built once).
    `whole_names`: choose each call's tool by its whole name (`choose_tool_names`), not token by token."""
    vocab = _VOCABULARIES.get(tokenizer)
    if vocab is None or (vocab_size and vocab.size != vocab_size):
        vocab = _VOCABULARIES[tokenizer] = TokenVocabulary.from_tokenizer(tokenizer, vocab_size)
    grammar = vocab.grammar(list(tools))
    if grammar.name_ids is None:
        grammar.name_ids = [tokenizer.encode(t.name.decode() + "(", add_special_tokens=False) for t in grammar.tools]
    return ToolCallConstraint(grammar, vocab, forced, whole_names)


@torch.inference_mode()
def choose_tool_names(model: Any, cache: Any, logits: torch.Tensor, constraints: Sequence[ToolCallConstraint | None],
                      params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]) -> None:
    """For each row whose constraint is where a call's name begins (`ToolCallConstraint.at_name`), score
    every listed tool's `name(` with the model and force the best (greedy) or one drawn from the names'
    probabilities under the row's temperature, top-k, top-p and min-p (penalties, which count tokens,
    do not apply to a choice among names); see the module's docstring for why.

    `logits` (B, V) are the model's next-token logits for the rows of `cache`: they score each name's
    first token. The rest are scored by running each candidate through the model from `cache`, which is
    rolled back afterwards (`Cache.snapshot`), one forward pass per candidate index for all rows."""
    rows = [r for r, c in enumerate(constraints) if c is not None and c.at_name()]
    if not rows:
        return
    names = {r: constraints[r].name_ids for r in rows}
    longest = max(len(ids) for r in rows for ids in names[r])
    if cache.length + longest - 1 > cache.max_len:  # no room left to score the names: token by token then
        return
    first = torch.log_softmax(logits.float(), dim=-1)
    scores = {r: [first[r, ids[0]].item() for ids in names[r]] for r in rows}
    if longest > 1:
        snap = cache.snapshot()
        for k in range(max(len(names[r]) for r in rows)):
            block = torch.zeros(logits.shape[0], longest - 1, dtype=torch.long)
            for r in rows:
                if k < len(names[r]):
                    ids = names[r][k][:-1]
                    block[r, : len(ids)] = torch.tensor(ids)
            out = torch.log_softmax(model(block.to(logits.device), cache).float(), dim=-1)
            cache.restore(snap)
            for r in rows:
                if k < len(names[r]):
                    ids = names[r][k]
                    scores[r][k] += sum(out[r, i, ids[i + 1]].item() for i in range(len(ids) - 1))
    for r in rows:
        constraints[r].force(names[r][_pick(torch.tensor([scores[r]]), params[r], generators[r])])


def _pick(scores: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """An index into `scores` (1, K), the names' log-probabilities, as `sample_next` picks a token."""
    if params.greedy:
        return int(scores.argmax())
    logits = apply_temperature(scores, params.temperature)
    logits = min_p_filter(top_p_filter(top_k_filter(logits, params.top_k), params.top_p), params.min_p)
    return int(draw(logits.softmax(dim=-1), generator))


def wants_constraint(tools: Sequence[Any], tool_choice: Any, strict_tools: bool | None) -> bool:
    """Whether a reply's tool calls are constrained: `strict_tools` if given, else when `tool_choice`
    forces a call ("required" or a named function) or any offered function says `"strict": true`."""
    if strict_tools is not None:
        return bool(strict_tools)
    if tool_choice == "required" or isinstance(tool_choice, Mapping):
        return True
    return any(isinstance(t, Mapping) and (t.get("function", t) or {}).get("strict") is True for t in tools)
