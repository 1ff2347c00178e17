"""Structured output: a reply held to a JSON schema, a regular expression or a choice of strings.

The grammar engine is llguidance (github.com/guidance-ai/llguidance), chosen by measurement over
xgrammar and outlines-core on a 65,536-token vocabulary (`benchmarks/grammar_engines.py`,
figures in docs/structured-output.md): it compiled each of the 26 test schemas in about a
millisecond, computes a token mask in well under one on average, and it refuses the JSON Schema
keywords it cannot enforce by name, where the other two accepted them and would have produced a
looser grammar than asked for.

What a caller asks for becomes an `OutputFormat` (kind, llguidance grammar, the schema if any).
`GrammarConstraint` follows one generation through the engine's logits-processor protocol
(`lfm2.engine`): `mask()` the allowed tokens, `advance(token)`; `prepare()` starts computing the
next mask on a worker thread while the model's forward pass runs (llguidance releases the GIL),
so a constrained row costs the decode step almost nothing. The grammar ends on the request's stop
ids (`<|im_end|>` in chat): once the value is complete, only they are allowed.

JSON is written compactly (`{"a":1,"b":[2,3]}`) and object properties in the schema's order:
free whitespace lets a small model wander in newlines forever, and llguidance fixes the order of
properties (its documented departure from JSON Schema, which still validates).
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import weakref
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lfm2.errors import GenerationError

# Options of llguidance's JSON compiler: compact separators (see the module docstring).
JSON_OPTIONS = {"whitespace_flexible": False}
# Annotations JSON Schema defines that constrain nothing, and OpenAI's own markers.
_ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
                "readOnly", "writeOnly", "contentMediaType", "contentEncoding", "name", "strict"}


class StructuredOutputError(GenerationError):
    """A response format that cannot be enforced: bad shape, invalid schema or regex, or a JSON
    Schema keyword the grammar engine does not implement (`keyword` names it)."""

    def __init__(self, message: str, param: str = "response_format", keyword: str | None = None) -> None:
        super().__init__(message)
        self.param, self.keyword = param, keyword


@dataclass(frozen=True)
class OutputFormat:
    """What a reply must match: `kind` is json_schema, json_object, regex or choice; `lark` is the
    right side of llguidance's Lark rule for it (so that it can be one branch of a larger grammar,
    beside tool calls); `schema` the JSON schema for the JSON kinds (None otherwise)."""

    kind: str
    lark: str
    schema: dict[str, Any] | None = None
    name: str | None = None
    param: str = "response_format"  # the request field it came from, for error messages

    @property
    def grammar(self) -> str:
        """The whole reply as llguidance grammar text."""
        return lark_grammar(f"start: {self.lark}\n")


def lark_grammar(text: str) -> str:
    return _llguidance().LLMatcher.grammar_from_lark(text)


def _json_rule(schema: Mapping[str, Any]) -> str:
    return "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS})


def json_schema(schema: Any, name: str | None = None, param: str = "json_schema") -> OutputFormat:
    """A reply that is one JSON value valid against `schema` (a dict, or a pydantic model class)."""
    if hasattr(schema, "model_json_schema"):  # a pydantic model class
        schema = schema.model_json_schema()
    if schema is True:
        schema = {}
    if not isinstance(schema, Mapping):
        raise StructuredOutputError(f"{param}: expected a JSON schema object, found {schema!r:.100}", param)
    try:
        schema = json.loads(json.dumps(schema))  # plain JSON types
    except (TypeError, ValueError) as exc:
        raise StructuredOutputError(f"{param}: not JSON: {exc}", param) from exc
    return OutputFormat("json_schema", _json_rule(schema), schema, name, param)


def json_object() -> OutputFormat:
    """A reply that is any JSON object (OpenAI's `{"type": "json_object"}`)."""
    schema = {"type": "object"}
    return OutputFormat("json_object", _json_rule(schema), schema)


def regex(pattern: str, param: str = "regex") -> OutputFormat:
    """A reply that matches `pattern` whole (anchored at both ends)."""
    if not isinstance(pattern, str) or not pattern:
        raise StructuredOutputError(f"{param}: expected a non-empty regular expression string", param)
    try:
        re.compile(pattern)
    except re.error as exc:
        raise StructuredOutputError(f"{param}: not a valid regular expression: {exc}", param) from exc
    return OutputFormat("regex", "/" + pattern.replace("/", "\\/") + "/", param=param)


def choice(options: Sequence[str], param: str = "choice") -> OutputFormat:
    """A reply that is exactly one of `options`."""
    if isinstance(options, str) or not options or not all(isinstance(o, str) and o for o in options):
        raise StructuredOutputError(f"{param}: expected a list of non-empty strings, found {options!r:.200}", param)
    return OutputFormat("choice", " | ".join(json.dumps(o) for o in dict.fromkeys(options)), param=param)


def response_format(spec: Any, param: str = "response_format") -> OutputFormat | None:
    """OpenAI's `response_format` (chat completions) or `text.format` (Responses API, flat) as an
    `OutputFormat`; None for `{"type": "text"}` or None (free text)."""
    if spec is None or isinstance(spec, OutputFormat):
        return spec
    if not isinstance(spec, Mapping):
        raise StructuredOutputError(f"{param}: expected an object with a 'type', found {spec!r:.200}", param)
    kind = spec.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return dataclasses.replace(json_object(), param=param)
    if kind == "json_schema":
        inner = spec.get("json_schema", spec)  # chat completions nest it; the Responses API does not
        where = f"{param}.json_schema" if "json_schema" in spec else param
        if not isinstance(inner, Mapping) or "schema" not in inner:
            raise StructuredOutputError(f"{where}.schema: required for type 'json_schema'", f"{where}.schema")
        return json_schema(inner["schema"], inner.get("name"), f"{where}.schema")
    raise StructuredOutputError(
        f"{param}.type: {kind!r} is not supported; use 'text', 'json_object' or 'json_schema'", f"{param}.type")


# -- tool calls -----------------------------------------------------------------------------------
# A strict tool call in llguidance's Lark: the Pythonic call syntax of the chat format (spec
# section 7) with each argument's value a JSON literal held to that parameter's schema (JSON's
# strings, numbers, true/false/null, lists and dicts all parse as the literals `lfm2.tools` reads).
# `lfm2.constrain.ToolCallGrammar` enforces a parameter's type and enum only; this enforces the
# whole schema (ranges, patterns, lengths, nested objects, formats), so it is used where a schema
# asks for more (`needs_full_schemas`) and wherever a reply format is combined with tools.

_SHALLOW = {"type", "enum", "description", "title", "default", "examples"}


def needs_full_schemas(tools: Sequence[Mapping[str, Any]]) -> bool:
    """Whether some parameter's schema says more than a type and an enum (what `lfm2.constrain`'s
    own grammar enforces), so that only the full-schema grammar holds calls to it."""
    from lfm2.tools import tool_schema

    for tool in tools:
        params = tool_schema(tool)["function"].get("parameters") or {}
        for spec in (params.get("properties") or {}).values():
            if not isinstance(spec, Mapping):
                continue
            types = spec.get("type")
            types = {types} if isinstance(types, str) else set(types or ())
            if set(spec) - _SHALLOW or types & {"array", "object"}:
                return True
    return False


def tool_calls_rules(tools: Sequence[Mapping[str, Any]]) -> str:
    """Lark rules defining `calls`: one call block, `<|tool_call_start|>[f(a=1), g()]<|tool_call_end|>`.

    Arguments come in the order of the schema's `properties` (as llguidance writes JSON objects),
    required ones always, optional ones when the model wants; a tool whose parameters list no
    `properties` takes any keyword arguments with any JSON values."""
    from lfm2.tools import tool_schema

    lines = ['calls: <|tool_call_start|> "[" call (", " call)* "]" <|tool_call_end|>']
    alternatives = []
    for i, tool in enumerate(tools):
        fn = tool_schema(tool)["function"]
        params = fn.get("parameters") or {}
        props = params.get("properties")
        head = json.dumps(fn["name"] + "(")
        alternatives.append(f"f{i}")
        if not isinstance(props, Mapping):
            lines.append(f'f{i}: {head} (kwarg (", " kwarg)*)? ")"')
            continue
        names = list(props)
        if not names:
            lines.append(f'f{i}: {head} ")"')
            continue
        required = set(params.get("required") or ())
        shared = {k: params[k] for k in ("$defs", "definitions") if k in params}  # what $refs point into
        for k, key in enumerate(names):
            spec = props[key] if isinstance(props[key], Mapping) else {}
            lines.append(f"p{i}_{k}: {json.dumps(key + '=')} ({_value_rule(spec, shared)})")
        nullable = [all(n not in required for n in names[k:]) for k in range(len(names))] + [True]
        for k in reversed(range(len(names))):
            body = f"p{i}_{k}"
            if k + 1 < len(names):
                rest = f'", " a{i}_{k + 1}'
                body += f" ({rest})?" if nullable[k + 1] else f" {rest}"
            if names[k] not in required and k + 1 < len(names):
                body += f" | a{i}_{k + 1}"
            lines.append(f"a{i}_{k}: {body}")
        args = f"a{i}_0?" if nullable[0] else f"a{i}_0"
        lines.append(f'f{i}: {head} {args} ")"')
    lines.append("call: " + " | ".join(alternatives))
    lines.append('kwarg: /[A-Za-z_][A-Za-z0-9_]*/ "=" ' + _json_rule({}))
    return "\n".join(lines) + "\n"


def _value_rule(spec: Mapping[str, Any], shared: Mapping[str, Any]) -> str:
    """A parameter's value: a JSON literal valid against its schema, or, where the schema allows it
    exactly, the Python spelling LFM2 models are trained on (LFM2.5's template writes strings as
    `'...'` and booleans as `True`/`False`): plain or length-bounded strings, string enums,
    booleans and None."""
    alternatives = [_json_rule({**spec, **shared})]
    keys = set(spec) - _ANNOTATIONS - {"examples"}
    kind = spec.get("type")
    if kind == "string" and keys <= {"type", "minLength", "maxLength"}:
        low, high = int(spec.get("minLength", 0)), spec.get("maxLength")
        bound = "" if high is None else int(high)
        alternatives.append("/'[^'\\\\\\n]{" + f"{low},{bound}" + "}'/")
    enum = spec.get("enum")
    if keys <= {"enum", "type"} and isinstance(enum, list):
        alternatives += [json.dumps(f"'{v}'") for v in enum if isinstance(v, str) and not set(v) & set("'\\\n")]
        alternatives += [json.dumps(repr(v)) for v in enum if v is None or isinstance(v, bool)]
    if keys <= {"type"} and kind in ("boolean", "null"):
        alternatives += ['"True"', '"False"'] if kind == "boolean" else ['"None"']
    return " | ".join(alternatives)


def reply_grammar(fmt: OutputFormat | None, tools: Sequence[Mapping[str, Any]] | None, forced: bool = False,
                  lead_space: bool = False) -> str:
    """Grammar text for a whole chat reply: `fmt` alone (no tools); with tools, `fmt` or strict
    calls followed by any text (the model still chooses; a reply forced into a call is the call);
    tools without a format: text with strict call blocks anywhere in it. `lead_space`: a few
    blank characters may come first (the line break a reasoning model writes after its thought)."""
    lead = "LEAD " if lead_space else ""
    rules = "LEAD: /[ \\t\\n]{0,4}/\n" if lead_space else ""
    if not tools:
        if fmt is None:
            raise ValueError("a reply grammar needs a format or tools")
        return lark_grammar(f"start: {lead}answer\nanswer: {fmt.lark}\n" + rules)
    rules += tool_calls_rules(tools) + "TEXT: /(?s:.*)/\n"
    if forced or fmt is None:
        start = f"start: {lead}calls TEXT\n" if forced else "start: TEXT (calls TEXT)*\n"
    else:
        start = f"start: {lead}(answer | calls TEXT)\nanswer: {fmt.lark}\n"
    return lark_grammar(start + rules)


# -- the tokenizer side -------------------------------------------------------------------------

_TOKENIZERS: weakref.WeakKeyDictionary[Any, dict[tuple, Any]] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def grammar_tokenizer(tokenizer: Any, size: int, stop_ids: Sequence[int]) -> Any:
    """llguidance's view of `tokenizer` for a model with `size` logits, ending on `stop_ids`.
    Built once per tokenizer (about a second for 65,536 tokens) and shared."""
    key = (size, tuple(sorted(stop_ids)))
    with _LOCK:
        built = _TOKENIZERS.setdefault(tokenizer, {})
        if key not in built:
            built[key] = _llguidance().LLTokenizer(tokenizer.to_json(), n_vocab=size, eos_token=list(key[1]))
        return built[key]


def check(grammar: str, lltok: Any, param: str = "response_format") -> None:
    """Raise `StructuredOutputError` unless llguidance can enforce `grammar` exactly: a JSON Schema
    keyword it does not implement is named, never silently dropped."""
    error = _llguidance().LLMatcher.validate_grammar(grammar, lltok)
    if not error:
        return
    found = re.search(r"Unimplemented keys: \[([^\]]*)\]", error)
    if found:
        keys = [k.strip().strip('"') for k in found.group(1).split(",") if k.strip()]
        keys = [k for k in keys if k not in _ANNOTATIONS] or keys
        raise StructuredOutputError(
            f"{param}: the JSON Schema keyword{'s' if len(keys) > 1 else ''} {', '.join(map(repr, keys))} "
            "cannot be enforced by lfm2's structured output (llguidance); remove "
            f"{'them' if len(keys) > 1 else 'it'} or check the reply yourself", param, keys[0])
    first = error.strip().splitlines()[0][:300]
    raise StructuredOutputError(f"{param}: cannot build a grammar from it: {first}", param)


def constraint(fmt: OutputFormat, tokenizer: Any, size: int, stop_ids: Sequence[int],
               lead_space: bool = False) -> GrammarConstraint:
    """A checked, fresh `GrammarConstraint` for one generation held to `fmt` (`lead_space`: see
    `reply_grammar`)."""
    grammar = reply_grammar(fmt, None, lead_space=True) if lead_space else fmt.grammar
    lltok = grammar_tokenizer(tokenizer, size, stop_ids)
    check(grammar, lltok, fmt.param)
    return GrammarConstraint(grammar, lltok, size)


# -- the logits processor -----------------------------------------------------------------------

_WORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lfm2-grammar")


class GrammarConstraint:
    """Follows one generation held to an `OutputFormat` (the engine's logits-processor protocol)."""

    def __init__(self, grammar: str, lltok: Any, size: int) -> None:
        self.grammar, self.lltok, self.size = grammar, lltok, size
        self.matcher = _llguidance().LLMatcher(lltok, grammar)
        self._bits = torch.zeros(1, (size + 31) // 32, dtype=torch.int32)
        self._pending: Future | None = None
        self._stop = torch.zeros(size, dtype=torch.bool)
        for t in lltok.eos_tokens:
            if 0 <= t < size:
                self._stop[t] = True

    def fresh(self) -> GrammarConstraint:
        """A constraint for another generation (each choice of n needs its own)."""
        return GrammarConstraint(self.grammar, self.lltok, self.size)

    def at_name(self) -> bool:
        return False

    def look_ahead_room(self) -> int:
        return 0

    @staticmethod
    def look_ahead(*_: Any) -> None:
        return None

    def prepare(self) -> None:
        """Start computing the next mask (the engine calls this before its forward pass)."""
        if self._pending is None:
            self._pending = _WORKER.submit(self._fill)

    def _fill(self) -> None:
        # llguidance.torch's fill_next_token_bitmask does this, but importing that module pulls in
        # torch._dynamo (five seconds); the matcher writes the bits itself, without the GIL.
        words = self._bits[0]
        self.matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * words.element_size())

    def mask(self) -> torch.Tensor:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()
        else:
            self._fill()
        if self.matcher.is_error():  # cannot happen with a checked grammar; end the reply, not the server
            return self._stop.clone()
        words = self._bits[0].numpy().view(np.uint8)
        allowed = np.unpackbits(words, bitorder="little")[: self.size]
        return torch.from_numpy(allowed.astype(bool))

    def advance(self, token: int) -> None:
        if self._pending is not None:  # a mask computed for nothing (the row ended another way)
            self._pending.result()
            self._pending = None
        if not self.matcher.is_stopped():
            self.matcher.consume_token(token)


class CallsConstraint(GrammarConstraint):
    """A `GrammarConstraint` over a reply with strict tool calls (`reply_grammar` with tools) that,
    like `lfm2.constrain.ToolCallConstraint`, lets `choose_tool_names` pick each call's tool by its
    whole name: where a name begins (after `[` or `, ` inside a call block, outside any value), the
    look-ahead scores every `name(` and forces the winner's tokens."""

    def __init__(self, grammar: str, lltok: Any, size: int, token_bytes: Sequence[bytes | None],
                 markers: tuple[int, int], name_ids: list[list[int]] | None, prefix: Sequence[int] = ()) -> None:
        super().__init__(grammar, lltok, size)
        self.token_bytes, self.markers, self.name_ids, self.prefix = token_bytes, markers, name_ids, list(prefix)
        self.pending: list[int] = []
        self.in_block, self.depth, self.in_string, self.escaped, self.tail = False, 0, False, False, b""
        for t in self.prefix:
            self.advance(t)

    def fresh(self) -> CallsConstraint:
        return CallsConstraint(self.grammar, self.lltok, self.size, self.token_bytes, self.markers,
                               self.name_ids, self.prefix)

    def at_name(self) -> bool:
        return (self.name_ids is not None and not self.pending and self.in_block and not self.in_string
                and self.depth == 1 and (self.tail.endswith(b"[") or self.tail.endswith(b", ")))

    def force(self, ids: Sequence[int]) -> None:
        self.pending = list(ids)

    def look_ahead_room(self) -> int:
        return max(len(ids) for ids in self.name_ids) if self.at_name() else 0

    @staticmethod
    def look_ahead(model: Any, cache: Any, logits: torch.Tensor, processors: Sequence[Any], params: Sequence[Any],
                   generators: Sequence[Any]) -> None:
        from lfm2.constrain import choose_tool_names

        choose_tool_names(model, cache, logits, processors, params, generators)

    def mask(self) -> torch.Tensor:
        if self.pending:
            if self._pending is not None:
                self._pending.result()
                self._pending = None
            mask = torch.zeros(self.size, dtype=torch.bool)
            mask[self.pending[0]] = True
            return mask
        return super().mask()

    def advance(self, token: int) -> None:
        if self.pending:
            self.pending = self.pending[1:] if token == self.pending[0] else []
        super().advance(token)
        start, end = self.markers
        if token == start:
            self.in_block, self.depth, self.in_string, self.escaped, self.tail = True, 0, False, False, b""
        elif token == end:
            self.in_block = False
        elif self.in_block and 0 <= token < len(self.token_bytes) and self.token_bytes[token]:
            self._scan(self.token_bytes[token])

    def _scan(self, data: bytes) -> None:
        """Follow the call block's brackets and JSON strings (values are JSON: double quotes only)."""
        for b in data:
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif b == 0x5C:  # backslash
                    self.escaped = True
                elif b == 0x22:
                    self.in_string = False
            elif b == 0x22:
                self.in_string = True
            elif b in b"[({":
                self.depth += 1
            elif b in b"])}":
                self.depth -= 1
        self.tail = (self.tail + data)[-2:]


def calls_constraint(fmt: OutputFormat | None, tools: Sequence[Mapping[str, Any]], tokenizer: Any, size: int,
                     stop_ids: Sequence[int], forced: str = "", whole_names: bool = True, must_call: bool = False,
                     lead_space: bool = False) -> CallsConstraint:
    """A checked constraint for a chat reply with strict tool calls (and `fmt`, if given, as the
    alternative to calling). `forced` is `tool_choice`'s start of a call, already in the prompt;
    `must_call`: the reply is a call whose start will be forced by another processor (a reasoning
    model's, after its thought: `lfm2.reasoning.AfterReasoning`); `lead_space`: see `reply_grammar`."""
    from lfm2.tools import TOOL_CALL_END, TOOL_CALL_START, tool_schema

    markers = (tokenizer.token_to_id(TOOL_CALL_START), tokenizer.token_to_id(TOOL_CALL_END))
    if None in markers:
        raise StructuredOutputError(f"{tokenizer.name}: the vocabulary has no {TOOL_CALL_START} / {TOOL_CALL_END} "
                                    "tokens, so tool calls cannot be constrained", "tools")
    grammar = reply_grammar(fmt, tools, bool(forced) or must_call, lead_space)
    lltok = grammar_tokenizer(tokenizer, size, stop_ids)
    check(grammar, lltok, fmt.param if fmt is not None else "tools")
    names = [tokenizer.encode(tool_schema(t)["function"]["name"] + "(", add_special_tokens=False) for t in tools]
    prefix = tokenizer.encode(forced, add_special_tokens=False) if forced else []
    constraint = CallsConstraint(grammar, lltok, size, tokenizer.token_bytes(), markers,
                                 names if whole_names else None, prefix)
    if constraint.matcher.is_error():
        raise StructuredOutputError(f"forced reply text {forced!r} is not a valid start of a call to the offered "
                                    f"tools: {constraint.matcher.get_error()}", "tool_choice")
    return constraint


def _llguidance():
    try:
        import llguidance
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise StructuredOutputError("structured output needs the llguidance package: pip install llguidance") from exc
    return llguidance


__all__ = ["CallsConstraint", "GrammarConstraint", "OutputFormat", "StructuredOutputError", "calls_constraint",
           "check", "choice", "constraint", "grammar_tokenizer", "json_object", "json_schema", "lark_grammar",
           "needs_full_schemas", "regex", "reply_grammar", "response_format", "tool_calls_rules"]
