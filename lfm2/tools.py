"""LFM2's Pythonic tool calls, in and out of OpenAI's shape, without ever evaluating model text.

LFM2 writes tool calls as a Python list of calls between two special tokens::

    <|tool_call_start|>[get_weather(city='Paris', days=3), clock.now()]<|tool_call_end|>

while clients speak OpenAI's JSON (`tool_calls` with `arguments` as a JSON string). This module
converts both ways:

- `tool_schema` turns OpenAI tool dicts, bare function dicts or Python callables into OpenAI's
  tool shape, the one view that parsing, constraints and the server read; `template_tools` is what
  the chat template lists: dicts as the caller gave them, callables as transformers converts them.
- `prepare_messages` readies OpenAI messages for a chat template: most LFM2 templates render an
  assistant's `content` only, so `tool_calls` are rendered into the Pythonic text first.
  `render_chat` is the chat layer's prompt: both readied, then the tokenizer's template, which
  itself knows nothing of tools.
- `render_tool_calls` is that rendering, identical to LFM2.5-8B-A1B.jinja's macro for simple
  values and, unlike the macro, safe for any string (quotes, backslashes, newlines).
- `parse_tool_calls` and `ToolCallStreamParser` read calls back out of generated text with
  `ast.parse` and a walk over literal nodes only: nothing the model writes is ever evaluated.
  A block that is not a list of plain calls with literal arguments stays in the content, with a
  warning, so a bad generation never raises.
- `run_tool_calls` executes parsed calls against Python callables the caller passes in, and
  returns OpenAI `tool` messages; failures become the message text, never an exception.

Only text between the markers is a tool call: a model that writes `f(x=1)` without them is just
talking, and is left alone.
"""

from __future__ import annotations

import ast
import copy
import enum
import inspect
import json
import math
import re
import secrets
import string
import types
import typing
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, Union

from lfm2.errors import ToolError

TOOL_CALL_START = "<|tool_call_start|>"
TOOL_CALL_END = "<|tool_call_end|>"

ROLES = ("system", "user", "assistant", "tool")

Event = tuple[str, Any]  # ("content", str) or ("tool_calls", list[dict])


# --------------------------------------------------------------------------------------------
# Tool definitions
# --------------------------------------------------------------------------------------------


def tool_schema(tool: Mapping[str, Any] | Callable[..., Any]) -> dict[str, Any]:
    """Return `tool` in OpenAI's shape: `{"type": "function", "function": {name, description, parameters}}`.

    Accepts that shape itself, a bare `{"name", "description", "parameters"}` dict, or a Python
    callable (converted by `function_schema`). The result is a new dict, so callers may change it
    without touching their tool definitions. This is the normalized view that parsing, constraints
    and the server read; the chat template gets `template_tools`, what the caller passed.
    """
    if isinstance(tool, Mapping):
        return _schema_from_dict(tool)
    if callable(tool):
        return function_schema(tool)
    raise ToolError(
        f"a tool must be a dict (OpenAI's {{'type': 'function', 'function': {{...}}}} or "
        f"{{'name', 'description', 'parameters'}}) or a Python callable, got {type(tool).__name__}"
    )


def template_tools(tools: Sequence[Mapping[str, Any] | Callable[..., Any]] | None) -> list[Any] | None:
    """The tools as a chat template lists them: each dict exactly as given (bare or OpenAI-wrapped;
    the model card's own prompt lists bare ones), each callable as `function_schema` describes it.

    transformers' `apply_chat_template` does the same (`render_jinja_template` in
    transformers/utils/chat_template_utils.py), so prompts match it byte for byte. Rewriting the
    dicts into one shape would show the model a prompt that differs from its training format.
    """
    if tools is None:
        return None
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Iterable):
        raise ToolError(f"tools must be a list of tool dicts or callables, got {type(tools).__name__}")
    out: list[Any] = []
    for i, tool in enumerate(tools):
        if isinstance(tool, Mapping):
            out.append(copy.deepcopy(dict(tool)))
        elif callable(tool):
            out.append(function_schema(tool))
        else:
            raise ToolError(f"tools[{i}] must be a dict or a Python callable, got {type(tool).__name__}")
    return out


def _schema_from_dict(tool: Mapping[str, Any]) -> dict[str, Any]:
    if "function" in tool or tool.get("type") == "function":
        if tool.get("type", "function") != "function":
            raise ToolError(f"tool 'type' must be 'function', got {tool.get('type')!r}")
        function = tool.get("function")
        if not isinstance(function, Mapping):
            raise ToolError(f"tool 'function' must be a dict with a 'name', got {function!r}")
    else:
        function = tool
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise ToolError(f"tool has no 'name' (a non-empty string); found keys {sorted(function)}")
    description = function.get("description", "")
    if not isinstance(description, str):
        raise ToolError(f"tool {name!r}: 'description' must be a string, got {type(description).__name__}")
    parameters = function.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(parameters, Mapping):
        raise ToolError(f"tool {name!r}: 'parameters' must be a JSON-schema dict, got {parameters!r}")
    out = {key: copy.deepcopy(value) for key, value in function.items()}
    out.update(name=name, description=description, parameters=copy.deepcopy(dict(parameters)))
    return {"type": "function", "function": out}


def function_schema(fn: Callable[..., Any]) -> dict[str, Any]:
    """A Python callable as an OpenAI tool, from its signature, type hints and Google-style docstring.

    The schema is the one transformers' `get_json_schema` writes (same keys, order and values:
    `nullable` for Optional, a `return` entry, `(choices: [...])` in an argument's description
    becoming an `enum`), so a callable renders into the same prompt in both. Where transformers
    refuses (no docstring, an undescribed or unannotated argument) we describe what we can instead.
    """
    name = getattr(fn, "__name__", None)
    if not isinstance(name, str) or not name or name == "<lambda>":
        raise ToolError(f"callable {fn!r} has no usable __name__; wrap it in a def or pass a dict")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError) as e:
        raise ToolError(f"cannot read the signature of tool {name!r}: {e}") from e
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable forward references: fall back to untyped parameters
        hints = {}
    description, arg_docs, return_doc = _parse_docstring(inspect.getdoc(fn) or "")
    params = list(signature.parameters.values())
    if params and params[0].name in ("self", "cls") and params[0].annotation is inspect.Parameter.empty:
        params = params[1:]  # an unbound method's receiver is not the model's to fill
    properties: dict[str, Any] = {}
    required: list[str] = []
    for param in params:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            star = "*" if param.kind == param.VAR_POSITIONAL else "**"
            raise ToolError(
                f"tool {name!r}: parameter {star}{param.name} cannot be described to the model; use named parameters"
            )
        schema = _type_schema(hints.get(param.name, param.annotation), f"{name}.{param.name}")
        if param.name in arg_docs:
            doc = arg_docs[param.name]
            choices = _CHOICES.search(doc)
            if choices:
                try:
                    values = json.loads(choices.group(1))
                except json.JSONDecodeError as e:
                    raise ToolError(f"tool {name!r}: the choices of argument {param.name!r} are not JSON: {e}") from e
                schema["enum"] = [v.strip() if isinstance(v, str) else v for v in values]
                doc = doc[: choices.start()].strip()
            schema["description"] = doc
        properties[param.name] = schema
        if param.default is param.empty:
            required.append(param.name)
    parameters: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        parameters["required"] = required
    out: dict[str, Any] = {"name": name, "description": description, "parameters": parameters}
    if "return" in hints:
        try:
            returns = _type_schema(hints["return"], f"{name} return value")
        except ToolError:
            returns = None  # the model never writes the return value: leave it out rather than fail
        if returns is not None:
            if return_doc is not None:
                returns["description"] = return_doc
            out["return"] = returns
    return {"type": "function", "function": out}


_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null"}
_BARE_TYPES = {**_JSON_TYPES, list: "array", tuple: "array", dict: "object"}


def _type_schema(hint: Any, where: str) -> dict[str, Any]:
    """JSON schema for a type hint, as transformers writes it; `Optional[X]` is X with `nullable`."""
    if hint is inspect.Parameter.empty or hint is Any:
        return {}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is None and isinstance(hint, type) and issubclass(hint, enum.Enum):
        return _enum_schema([member.value for member in hint], where)
    if origin is None and hint in _BARE_TYPES:
        return {"type": _BARE_TYPES[hint]}
    if origin is Union or origin is types.UnionType:
        options = [_type_schema(a, where) for a in args if a is not type(None)]
        if len(options) == 1:
            out = options[0]
        elif all(o.keys() == {"type"} and isinstance(o["type"], str) for o in options):
            names = sorted({o["type"] for o in options})
            out = {"type": names[0] if len(names) == 1 else names}
        else:
            out = {"anyOf": options}
        if type(None) in args:
            out["nullable"] = True
        return out
    if origin is Literal and args:
        return _enum_schema(list(args), where)
    if origin is list:
        return {"type": "array", "items": _type_schema(args[0], where)} if args else {"type": "array"}
    if origin is tuple:
        if not args:
            return {"type": "array"}
        if len(args) == 1 or Ellipsis in args:
            raise ToolError(f"tool parameter {where}: use list[...] for a variable-length sequence, not {hint!r}")
        return {"type": "array", "prefixItems": [_type_schema(a, where) for a in args]}
    if origin is dict:
        out = {"type": "object"}
        if len(args) == 2:
            out["additionalProperties"] = _type_schema(args[1], where)
        return out
    # Hints transformers refuses; we describe them as the JSON the model would write for them.
    if hint in (set, frozenset) or origin in (set, frozenset, Sequence, Iterable):
        return {"type": "array", "items": _type_schema(args[0], where)} if args else {"type": "array"}
    if origin is Mapping:
        return {"type": "object", "additionalProperties": _type_schema(args[1], where)} if len(args) == 2 else {
            "type": "object"}
    raise ToolError(
        f"tool parameter {where}: cannot describe type {hint!r} in JSON schema; use str, int, float, "
        "bool, list[...], tuple[...], dict[str, ...], Optional[...], Literal[...] or an Enum"
    )


def _enum_schema(values: list[Any], where: str) -> dict[str, Any]:
    """An enum of JSON scalars; "type" lists each value's JSON type once, in order of appearance."""
    if not values or any(type(v) not in _JSON_TYPES for v in values):
        raise ToolError(f"tool parameter {where}: an enum needs one or more str, int, float, bool or None values")
    kinds = list(dict.fromkeys(_JSON_TYPES[type(v)] for v in values))
    return {"type": kinds[0] if len(kinds) == 1 else kinds, "enum": values}


# Google-style docstring sections, read as transformers' `parse_google_format_docstring` reads them:
# the description is everything before the first Args:/Returns:/Raises: line; an argument's text
# runs to the next `name:` line that is not indented deeper than it.
_DESCRIPTION = re.compile(r"^(.*?)[\n\s]*(?:Args:|Returns:|Raises:|\Z)", re.DOTALL)
_ARGS = re.compile(r"\n\s*Args:\n(.*?)[\n\s]*(?:Returns:|Raises:|\Z)", re.DOTALL)
_RETURNS = re.compile(r"\n\s*Returns:\n\s*(.*?)[\n\s]*(?:Raises:|\Z)", re.DOTALL)
_ARG_ENTRY = re.compile(
    r"(?:^|\n)([ \t]*)(\w+)(?:[ \t]*\([^()\n]*\))?:\s*(.*?)\s*(?=\n(?!\1[ \t])[ \t]*\w+(?:[ \t]*\([^()\n]*\))?:|\Z)",
    re.DOTALL,
)
_CHOICES = re.compile(r"\(choices:\s*(.*?)\)\s*$", re.IGNORECASE)


def _parse_docstring(doc: str) -> tuple[str, dict[str, str], str | None]:
    """A Google-style docstring's description, its `Args:` descriptions and its `Returns:` text."""
    doc = doc.strip()
    description = _DESCRIPTION.search(doc)
    args_block = _ARGS.search(doc)
    returns = _RETURNS.search(doc)
    args: dict[str, str] = {}
    if args_block:
        block = "\n".join(line for line in args_block.group(1).split("\n") if line.strip())
        for _, arg, text in _ARG_ENTRY.findall(block):
            args[arg] = re.sub(r"\s*\n+\s*", " ", text.strip())
    return (description.group(1).strip() if description else ""), args, (returns.group(1).strip() if returns else None)


# --------------------------------------------------------------------------------------------
# Messages for the chat template
# --------------------------------------------------------------------------------------------


def prepare_messages(messages: Sequence[Mapping[str, Any]], template_renders_tool_calls: bool) -> list[dict[str, Any]]:
    """Return copies of OpenAI chat `messages` that a LFM2 chat template can render.

    Assistant `function.arguments` arrive as JSON strings from OpenAI clients but templates index
    them as dicts, so they are parsed. Templates that cannot render `tool_calls` (all but the
    LFM2.5-8B-A1B one) get them appended to `content` as Pythonic text, which is exactly what the
    model produced in the first place. Tool results that are not strings become JSON text.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ToolError(f"messages must be a list of dicts, got {type(messages).__name__}")
    return [_prepare_message(i, m, template_renders_tool_calls) for i, m in enumerate(messages)]


def render_chat(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any] | Callable[..., Any]] | None = None,
    add_generation_prompt: bool = False,
    **kwargs: Any,
) -> str:
    """The prompt text of an OpenAI-style conversation, as transformers' `apply_chat_template` renders it.

    `tokenizer` is an `lfm2.tokenizer.Tokenizer`: its template sees the tools as `template_tools`
    lists them and the messages as `prepare_messages` readies them for that template (whether it
    renders `tool_calls` itself). Neither the caller's messages nor its tools are changed. Extra
    keyword arguments reach the template.
    """
    source = tokenizer.chat_template_source(tools)
    schemas = template_tools(tools)
    ready = prepare_messages(messages, template_renders_tool_calls="tool_calls" in source)
    return tokenizer.apply_chat_template(ready, tools=schemas, add_generation_prompt=add_generation_prompt, **kwargs)


def _prepare_message(index: int, message: Any, renders_tool_calls: bool) -> dict[str, Any]:
    where = f"messages[{index}]"
    if not isinstance(message, Mapping):
        raise ToolError(f"{where} must be a dict with 'role' and 'content', got {type(message).__name__}")
    out = copy.deepcopy(dict(message))
    role = out.get("role")
    if role not in ROLES:
        raise ToolError(f"{where}: 'role' must be one of {', '.join(ROLES)}; got {role!r}")
    content = out.get("content")
    if content is not None and not isinstance(content, (str, list)) and role != "tool":
        raise ToolError(
            f"{where}: 'content' must be a string, a list of content parts or null; got {type(content).__name__}"
        )
    if role == "tool":
        out["content"] = _tool_result_text(content)
        return out
    if content is None:
        out["content"] = ""
    tool_calls = out.pop("tool_calls", None)
    if tool_calls is None:
        return out
    if role != "assistant":
        raise ToolError(f"{where}: only assistant messages may carry 'tool_calls', found on a {role!r} message")
    calls = _normalize_tool_calls(tool_calls, f"{where}.tool_calls")
    if renders_tool_calls and calls:  # an empty list would still render an empty call block
        out["tool_calls"] = calls
    elif calls:
        out["content"] = _append_text(out["content"], render_tool_calls(calls))
    return out


def _tool_result_text(content: Any) -> str:
    """A tool result as the text the model reads: OpenAI text parts joined, anything else as JSON."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, Mapping) and p.get("type") == "text" for p in content):
        return "".join(str(part.get("text", "")) for part in content)
    return json.dumps(content, ensure_ascii=False)


def _append_text(content: str | list[Any], text: str) -> str | list[Any]:
    if isinstance(content, str):
        return content + text
    return [*content, {"type": "text", "text": text}]


def _normalize_tool_calls(tool_calls: Any, where: str) -> list[dict[str, Any]]:
    """Copies of OpenAI `tool_calls` with `function.arguments` always a dict, validated."""
    if isinstance(tool_calls, (str, bytes, Mapping)) or not isinstance(tool_calls, Sequence):
        raise ToolError(f"{where} must be a list of tool calls, got {type(tool_calls).__name__}")
    out = []
    for i, call in enumerate(tool_calls):
        here = f"{where}[{i}]"
        if not isinstance(call, Mapping):
            raise ToolError(f"{here} must be a dict with a 'function', got {type(call).__name__}")
        if call.get("type", "function") != "function":
            raise ToolError(f"{here}: 'type' must be 'function', got {call.get('type')!r}")
        function = call.get("function")
        if not isinstance(function, Mapping):
            raise ToolError(f"{here}: 'function' must be a dict with 'name' and 'arguments', got {function!r}")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise ToolError(f"{here}.function: 'name' must be a non-empty string, got {name!r}")
        arguments = _arguments_dict(function.get("arguments"), f"{here}.function.arguments")
        new_call = copy.deepcopy(dict(call))
        new_call["function"] = {**copy.deepcopy(dict(function)), "name": name, "arguments": arguments}
        out.append(new_call)
    return out


def _arguments_dict(arguments: Any, where: str) -> dict[str, Any]:
    if arguments is None or arguments == "":
        return {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as e:
            raise ToolError(f"{where} is not valid JSON ({e}): {arguments[:200]!r}") from e
    if not isinstance(arguments, Mapping):
        raise ToolError(f"{where} must be a JSON object (dict), got {type(arguments).__name__}")
    return copy.deepcopy(dict(arguments))


# --------------------------------------------------------------------------------------------
# Rendering calls as Pythonic text
# --------------------------------------------------------------------------------------------


def render_tool_calls(tool_calls: Sequence[Mapping[str, Any]]) -> str:
    """Render OpenAI `tool_calls` as LFM2 writes them: `<|tool_call_start|>[f(a='x', n=1)]<|tool_call_end|>`.

    Follows LFM2.5-8B-A1B.jinja's `render_tool_calls` macro (strings in single quotes, dicts as
    JSON, everything else through `str()`), except that strings are escaped like `repr` does, so
    quotes, backslashes and newlines survive a round trip through `parse_tool_calls`.
    """
    rendered = []
    for i, call in enumerate(_normalize_tool_calls(tool_calls, "tool_calls")):
        name, arguments = call["function"]["name"], call["function"]["arguments"]
        if not _is_dotted_name(name):
            raise ToolError(f"tool_calls[{i}]: name {name!r} is not a Python (dotted) identifier")
        parts = []
        for key, value in arguments.items():
            if not isinstance(key, str) or not key.isidentifier():
                raise ToolError(f"tool_calls[{i}] ({name}): argument name {key!r} is not a Python identifier")
            parts.append(f"{key}={_format_value(value)}")
        rendered.append(f"{name}({', '.join(parts)})")
    return f"{TOOL_CALL_START}[{', '.join(rendered)}]{TOOL_CALL_END}"


def _is_dotted_name(name: str) -> bool:
    return all(part.isidentifier() for part in name.split("."))


def _format_value(value: Any) -> str:
    if isinstance(value, str):
        return _quote(value)
    if isinstance(value, Mapping):
        return _escape_markers(json.dumps(value, ensure_ascii=False), "\\u007c")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_format_value(v) for v in value) + "]"
    return str(value)


def _quote(text: str) -> str:
    """`text` as a single-quoted Python literal (the template's quote style), escaped as `repr` does."""
    literal = repr(text)
    if literal.startswith('"'):  # repr chose double quotes because text holds ' and no "
        literal = "'" + literal[1:-1].replace("'", "\\'") + "'"
    return _escape_markers(literal, "\\x7c")


def _escape_markers(literal: str, bar_escape: str) -> str:
    """Spell `|` in markers inside string literals as an escape, so they cannot end a block early."""
    for marker in (TOOL_CALL_START, TOOL_CALL_END):
        literal = literal.replace(marker, marker.replace("|", bar_escape))
    return literal


# --------------------------------------------------------------------------------------------
# Parsing generated text
# --------------------------------------------------------------------------------------------


class _NotLiteral(ValueError):
    """A tool-call block holds something other than plain calls with literal arguments."""


_NAMED_CONSTANTS = {"True": True, "False": False, "None": None, "true": True, "false": False, "null": None}
_ID_ALPHABET = string.ascii_letters + string.digits


def parse_tool_calls(
    text: str, tools: Sequence[Mapping[str, Any] | Callable[..., Any]] | None = None
) -> tuple[str, list[dict[str, Any]]]:
    """Split generated `text` into its content and its OpenAI-style `tool_calls`.

    Every `<|tool_call_start|>...<|tool_call_end|>` block is parsed with `ast.parse` as a list of
    calls (or one call without brackets) whose arguments are literals; nothing is evaluated. A
    block that does not parse, a start marker with no end, and a stray end marker stay in the
    content verbatim, with a warning.

    Content is the text outside the parsed blocks, with the whitespace that touches a parsed block
    dropped and a single newline where text remains on both sides of one. Text with no parsed
    block comes back unchanged. Positional arguments take the names of the matching tool's
    parameters, in schema order, when `tools` lists it, else `arg0`, `arg1`, ...
    """
    param_names = _param_names(tools)
    segments: list[str] = []  # the text around parsed blocks: len(segments) == len(blocks) + 1
    calls: list[dict[str, Any]] = []
    current, pos = "", 0
    while True:
        start = text.find(TOOL_CALL_START, pos)
        if start < 0:
            current += text[pos:]
            break
        body_start = start + len(TOOL_CALL_START)
        end = text.find(TOOL_CALL_END, body_start)
        if end < 0:
            warnings.warn("tool call start marker without an end marker: kept as content", stacklevel=2)
            current += text[pos:]
            break
        parsed = _parse_block(text[body_start:end], param_names)
        if parsed is None:
            current += text[pos : end + len(TOOL_CALL_END)]
        else:
            segments.append(current + text[pos:start])
            calls.extend(parsed)
            current = ""
        pos = end + len(TOOL_CALL_END)
    segments.append(current)
    if any(TOOL_CALL_END in _without_blocks(s) for s in segments):
        warnings.warn("tool call end marker without a start marker: kept as content", stacklevel=2)
    if len(segments) == 1:
        return segments[0], calls
    stripped = [segments[0].rstrip(), *(s.strip() for s in segments[1:-1]), segments[-1].lstrip()]
    return "\n".join(s for s in stripped if s), calls


def _without_blocks(text: str) -> str:
    """`text` less its start...end spans, to tell a stray end marker from one that closes a block."""
    return re.sub(re.escape(TOOL_CALL_START) + ".*?" + re.escape(TOOL_CALL_END), "", text, flags=re.S)


def _param_names(tools: Sequence[Any] | None) -> dict[str, list[str]]:
    if not tools:
        return {}
    names = {}
    for tool in tools:
        function = tool_schema(tool)["function"]
        properties = function["parameters"].get("properties") or {}
        names[function["name"]] = list(properties)
    return names


def _parse_block(body: str, param_names: Mapping[str, list[str]]) -> list[dict[str, Any]] | None:
    """The calls in one block, or None (with a warning) when it is not a list of literal calls."""
    try:
        tree = ast.parse(body.strip(), mode="eval").body
        nodes = tree.elts if isinstance(tree, (ast.List, ast.Tuple)) else [tree]
        return [_call_from_node(node, param_names) for node in nodes]
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError, OverflowError) as e:
        warnings.warn(f"unparsable tool call kept as content ({type(e).__name__}: {e}): {body[:200]!r}", stacklevel=3)
        return None


def _call_from_node(node: ast.expr, param_names: Mapping[str, list[str]]) -> dict[str, Any]:
    if not isinstance(node, ast.Call):
        raise _NotLiteral(f"expected a call like name(arg=value), found {type(node).__name__}")
    name = _dotted_name(node.func)
    arguments: dict[str, Any] = {}
    known = param_names.get(name, [])
    for i, arg in enumerate(node.args):
        if isinstance(arg, ast.Starred):
            raise _NotLiteral(f"{name}: *args unpacking is not a literal")
        arguments[known[i] if i < len(known) else f"arg{i}"] = _literal(arg)
    for keyword in node.keywords:
        if keyword.arg is None:
            raise _NotLiteral(f"{name}: **kwargs unpacking is not a literal")
        if keyword.arg in arguments:
            raise _NotLiteral(f"{name}: argument {keyword.arg!r} given twice")
        arguments[keyword.arg] = _literal(keyword.value)
    return {
        "id": "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24)),
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)},
    }


def _dotted_name(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted_name(node.value)}.{node.attr}"
    raise _NotLiteral(f"a tool name must be a (dotted) identifier, found {type(node).__name__}")


def _literal(node: ast.expr) -> Any:
    """The JSON value of a literal node, like `ast.literal_eval` plus JSON's true/false/null."""
    if isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, float) and not math.isfinite(value):
            raise _NotLiteral(f"{value} has no JSON form")
        if value is None or isinstance(value, (str, bool, int, float)):
            return value
        raise _NotLiteral(f"{type(value).__name__} literal has no JSON form")
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        operand = node.operand
        if isinstance(operand, ast.Constant) and type(operand.value) in (int, float):
            return -operand.value if isinstance(node.op, ast.USub) else operand.value
        raise _NotLiteral("a sign applies to numbers only")
    if isinstance(node, ast.Name) and node.id in _NAMED_CONSTANTS:
        return _NAMED_CONSTANTS[node.id]
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        return [_literal(element) for element in node.elts]
    if isinstance(node, ast.Dict):
        out = {}
        for key, value in zip(node.keys, node.values, strict=True):
            if key is None:
                raise _NotLiteral("**unpacking inside a dict is not a literal")
            key_value = _literal(key)
            if not isinstance(key_value, (str, int, float, bool)) and key_value is not None:
                raise _NotLiteral(f"dict key {key_value!r} has no JSON form")
            out[key_value] = _literal(value)
        return out
    raise _NotLiteral(f"{ast.unparse(node)[:80]!r} is not a literal")


class ToolCallStreamParser:
    """`parse_tool_calls` for text that arrives piece by piece, as a model generates it.

    `feed` returns events as soon as they are certain: `("content", text)` for text outside tool
    call blocks and `("tool_calls", calls)` when a block closes. Held back, and only for as long
    as needed: a trailing piece that could be the start of `<|tool_call_start|>` (markers may be
    split anywhere), an open block until its end marker, and trailing whitespace (it is dropped
    if a block follows). `finish` flushes what is left; an unclosed block comes out as content.
    For any split of a text, the content events joined and the calls listed equal what
    `parse_tool_calls` returns on the whole text (ids aside). Stray end markers are kept as
    content like `parse_tool_calls` does, but without its warning.
    """

    def __init__(self, tools: Sequence[Mapping[str, Any] | Callable[..., Any]] | None = None) -> None:
        self._param_names = _param_names(tools)
        self._buffer = ""
        self._in_block = False
        self._searched = 0  # in a block: buffer prefix already known to hold no end marker
        self._held_space = ""  # trailing whitespace not yet emitted
        self._after_block = False  # a parsed block since the last content: drop whitespace, join with \n
        self._emitted = False  # any content emitted yet
        self._events: list[Event] = []

    def feed(self, piece: str) -> list[Event]:
        """Take the next piece of generated text; return the events it completes."""
        self._buffer += piece
        while self._step():
            pass
        return self._take_events()

    def finish(self) -> list[Event]:
        """End of generation: return what is still held, an unclosed block included, as content."""
        if self._in_block:
            warnings.warn("tool call start marker without an end marker: kept as content", stacklevel=2)
            self._content(TOOL_CALL_START + self._buffer)
        else:
            self._content(self._buffer)
        self._buffer, self._in_block, self._searched = "", False, 0
        if self._held_space and not self._after_block:
            self._emit(self._held_space)
        self._held_space = ""
        return self._take_events()

    def _step(self) -> bool:
        """Consume what the buffer allows; True when the loop should look again."""
        if not self._in_block:
            start = self._buffer.find(TOOL_CALL_START)
            if start < 0:
                keep = partial_marker_length(self._buffer, TOOL_CALL_START)
                self._content(self._buffer[: len(self._buffer) - keep])
                self._buffer = self._buffer[len(self._buffer) - keep :]
                return False
            self._content(self._buffer[:start])
            self._buffer = self._buffer[start + len(TOOL_CALL_START) :]
            self._in_block, self._searched = True, 0
            return True
        end = self._buffer.find(TOOL_CALL_END, self._searched)
        if end < 0:
            self._searched = max(0, len(self._buffer) - len(TOOL_CALL_END) + 1)
            return False
        body, self._buffer = self._buffer[:end], self._buffer[end + len(TOOL_CALL_END) :]
        self._in_block = False
        calls = _parse_block(body, self._param_names)
        if calls is None:
            self._content(TOOL_CALL_START + body + TOOL_CALL_END)
        else:
            self._held_space, self._after_block = "", True
            if calls:
                self._events.append(("tool_calls", calls))
        return True

    def _content(self, text: str) -> None:
        """Apply `parse_tool_calls`' whitespace rule to content as it streams."""
        if self._after_block:
            text = text.lstrip()
            if not text:
                return
            prefix, self._after_block = ("\n" if self._emitted else ""), False
        else:
            prefix, self._held_space = self._held_space, ""
        body = text.rstrip()
        if body:
            self._emit(prefix + body)
            self._held_space = text[len(body) :]
        else:
            self._held_space = prefix + text

    def _emit(self, text: str) -> None:
        self._emitted = True
        if self._events and self._events[-1][0] == "content":
            self._events[-1] = ("content", self._events[-1][1] + text)
        else:
            self._events.append(("content", text))

    def _take_events(self) -> list[Event]:
        events, self._events = self._events, []
        return events


def partial_marker_length(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper prefix of `marker`."""
    for length in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:length]):
            return length
    return 0


# --------------------------------------------------------------------------------------------
# Running calls
# --------------------------------------------------------------------------------------------


def run_tool_calls(
    tool_calls: Sequence[Mapping[str, Any]],
    functions: Mapping[str, Callable[..., Any]] | Sequence[Callable[..., Any]],
) -> list[dict[str, Any]]:
    """Call each of `tool_calls` on the matching one of `functions`; return OpenAI `tool` messages.

    Only the callables given are ever called, looked up by exact name (a list is keyed by each
    callable's `__name__`). A call to an unknown name, bad arguments, or an exception inside the
    function becomes `"Error: ..."` content for the model to read, so one failing tool cannot end
    a conversation. Results that are not strings are sent as JSON (or `str()` when not JSON-able).
    """
    if isinstance(functions, Mapping):
        table = dict(functions)
    else:
        table = {fn.__name__: fn for fn in functions}
    messages = []
    for i, call in enumerate(tool_calls):
        function = call.get("function") if isinstance(call, Mapping) else None
        name = function.get("name") if isinstance(function, Mapping) else None
        call_id = call.get("id", "") if isinstance(call, Mapping) else ""
        try:
            if not isinstance(name, str):
                raise ToolError(f"tool_calls[{i}] has no function name")
            if name not in table:
                raise ToolError(f"unknown function {name!r}; available: {', '.join(sorted(table)) or 'none'}")
            arguments = _arguments_dict(function.get("arguments"), f"arguments of {name}")
            content = _result_text(_call(table[name], arguments))
        except Exception as e:  # the model reads the failure and may retry; it must not propagate
            content = f"Error: {type(e).__name__}: {e}"
        messages.append({"role": "tool", "tool_call_id": call_id, "name": name, "content": content})
    return messages


def _call(fn: Callable[..., Any], arguments: dict[str, Any]) -> Any:
    """Call `fn`, passing `arg0`, `arg1`, ... positionally unless `fn` has parameters of those names."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    positional = []
    while f"arg{len(positional)}" in arguments and f"arg{len(positional)}" not in params:
        positional.append(arguments.pop(f"arg{len(positional)}"))
    return fn(*positional, **arguments)


def _result_text(result: Any) -> str:
    if isinstance(result, str):
        return result
    try:
        return json.dumps(result, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(result)
