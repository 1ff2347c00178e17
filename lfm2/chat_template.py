"""Render a checkpoint's Jinja chat template exactly as transformers' `apply_chat_template` does.

A checkpoint's template is the contract its model was trained on, so we run the template itself
rather than re-implementing the prompt format. To produce byte-identical prompts we copy the
environment transformers builds (`transformers/utils/chat_template_utils.py`):

- a sandboxed, immutable Jinja environment (templates come from the Hub: untrusted code) with
  `trim_blocks` and `lstrip_blocks`, and the `loopcontrols` extension (`break`/`continue`);
- the `{% generation %}...{% endgeneration %}` block, which only marks assistant text for
  training masks and renders its body unchanged;
- `tojson` without Jinja's HTML escaping, non-ASCII kept, with `indent`, `separators` and
  `sort_keys`; `raise_exception(msg)`; `strftime_now(fmt)`; a `dict` that cannot be abused for
  attribute tricks; a `namespace` that refuses underscore-prefixed attributes;
- the same input clean-up: message objects become dicts, keys whose value is None are dropped,
  everything is rebuilt from plain JSON types, and a message's reasoning given as
  `reasoning_content`, `thinking` or `reasoning` is visible under `thinking` and
  `reasoning_content`;
- the variables `messages`, `tools`, `documents`, `add_generation_prompt`, plus the special
  tokens and any extra keyword arguments.

Compiled templates are cached by source text.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lfm2.errors import TokenizerError

# lfm2's own LFM2 template, for checkpoints that ship none. It renders the format of the released
# LFM2 templates (spec section 7) and, like LFM2.5-8B-A1B.jinja, OpenAI-style assistant
# `tool_calls` as Pythonic calls. Strings are quoted '...' as LFM2.5 does, unless they hold a quote,
# backslash or newline, where a JSON string (also a valid Python literal) keeps the call parseable.
# Reasoning (`<think>...</think>`) is dropped from assistant turns before the last user turn, as
# LFM2.5 templates do; a message's `thinking` field is rendered for the turns after it.
DEFAULT_CHAT_TEMPLATE = """\
{{- bos_token -}}
{%- macro render_content(content) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- elif content is mapping -%}
        {{- content | tojson -}}
    {%- elif content is iterable -%}
        {%- for part in content -%}
            {%- if part is mapping and part.get("type") == "text" -%}
                {{- part["text"] -}}
            {%- elif part is string -%}
                {{- part -}}
            {%- else -%}
                {{- part | tojson -}}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{- content | tojson -}}
    {%- endif -%}
{%- endmacro -%}
{%- macro render_value(value) -%}
    {%- if value is string -%}
        {{- ("'" + value | replace("\\\\", "\\\\\\\\") | replace("'", "\\\\'") | replace("\\n", "\\\\n")
            | replace("\\r", "\\\\r") | replace("\\t", "\\\\t") + "'")
            | replace("<|tool_call_start|>", "<\\\\x7ctool_call_start\\\\x7c>")
            | replace("<|tool_call_end|>", "<\\\\x7ctool_call_end\\\\x7c>") -}}
    {%- elif value is mapping -%}
        {{- value | tojson | replace("<|tool_call_start|>", "<\\\\u007ctool_call_start\\\\u007c>")
            | replace("<|tool_call_end|>", "<\\\\u007ctool_call_end\\\\u007c>") -}}
    {%- elif value is iterable -%}
        {%- set items = namespace(list=[]) -%}
        {%- for item in value -%}
            {%- set items.list = items.list + [render_value(item)] -%}
        {%- endfor -%}
        {{- "[" + (items.list | join(", ")) + "]" -}}
    {%- else -%}
        {{- value | string -}}
    {%- endif -%}
{%- endmacro -%}
{%- macro render_tool_calls(tool_calls) -%}
    {%- set calls = namespace(items=[]) -%}
    {%- for tool_call in tool_calls -%}
        {%- set function = tool_call["function"] if "function" in tool_call else tool_call -%}
        {%- set arguments = function.get("arguments", {}) -%}
        {%- set args = namespace(items=[]) -%}
        {%- if arguments is mapping -%}
            {%- for name, value in arguments.items() -%}
                {%- set args.items = args.items + [name + "=" + render_value(value)] -%}
            {%- endfor -%}
        {%- elif arguments -%}
            {{- raise_exception("tool call arguments must be a mapping, got the string " + arguments) -}}
        {%- endif -%}
        {%- set calls.items = calls.items + [function["name"] + "(" + (args.items | join(", ")) + ")"] -%}
    {%- endfor -%}
    {{- "<|tool_call_start|>[" + (calls.items | join(", ")) + "]<|tool_call_end|>" -}}
{%- endmacro -%}
{%- set ns = namespace(system_prompt="", last_user_index=-1) -%}
{%- if messages and messages[0]["role"] == "system" -%}
    {%- set ns.system_prompt = render_content(messages[0].get("content", "")) -%}
    {%- set messages = messages[1:] -%}
{%- endif -%}
{%- if tools -%}
    {%- set tool_texts = namespace(items=[]) -%}
    {%- for tool in tools -%}
        {%- set tool_texts.items = tool_texts.items + [tool if tool is string else tool | tojson] -%}
    {%- endfor -%}
    {%- set ns.system_prompt = ns.system_prompt + ("\\n" if ns.system_prompt else "")
        + "List of tools: <|tool_list_start|>[" + (tool_texts.items | join(", ")) + "]<|tool_list_end|>" -%}
{%- endif -%}
{%- if ns.system_prompt -%}
    {{- "<|im_start|>system\\n" + ns.system_prompt + "<|im_end|>\\n" -}}
{%- endif -%}
{%- for message in messages -%}
    {%- if message["role"] == "user" -%}
        {%- set ns.last_user_index = loop.index0 -%}
    {%- endif -%}
{%- endfor -%}
{%- for message in messages -%}
    {{- "<|im_start|>" + message["role"] + "\\n" -}}
    {%- set content = render_content(message.get("content", "")) -%}
    {%- if message["role"] == "assistant" -%}
        {%- generation -%}
        {%- if loop.index0 > ns.last_user_index -%}
            {%- if message.get("thinking") -%}
                {{- "<think>" + message["thinking"] + "</think>" -}}
            {%- endif -%}
        {%- elif "</think>" in content -%}
            {%- set content = content.split("</think>")[-1] | trim -%}
        {%- endif -%}
        {{- content -}}
        {%- if message.get("tool_calls") -%}
            {{- render_tool_calls(message["tool_calls"]) -}}
        {%- endif -%}
        {{- "<|im_end|>\\n" -}}
        {%- endgeneration -%}
    {%- elif message["role"] == "tool" -%}
        {{- "<|tool_response_start|>" + content + "<|tool_response_end|><|im_end|>\\n" -}}
    {%- else -%}
        {{- content + "<|im_end|>\\n" -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- "<|im_start|>assistant\\n" -}}
{%- endif -%}
"""

# Names a message's reasoning arrives under; templates read `thinking` or `reasoning_content`.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: marks assistant text for training masks; renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore-prefixed attributes, which could reach Python internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # `self` taken from args so namespace(self=...) works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes on a namespace, got {name!r}"
            )


class _TemplateDict:
    """The `dict` global: builds dicts, but exposes no class internals to the template."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """transformers' `tojson`: plain `json.dumps`, so no HTML escaping and non-ASCII kept as is."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise TokenizerError(f"the chat template refused this conversation: {message}")


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    """Compile a chat template once; later calls with the same text reuse it."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env.from_string(source)


def _as_dicts(value: Any) -> Any:
    """Message objects (dataclasses, pydantic models such as the OpenAI SDK's) become plain dicts."""
    if isinstance(value, Mapping):
        return {key: _as_dicts(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_as_dicts(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_as_dicts(item) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _as_dicts(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _as_dicts(value.model_dump())
    return value


def _plain(value: Any) -> Any:
    """Rebuild `value` from plain JSON types, so the sandbox sees no methods of rich objects.

    Anything else (arrays, images, ...) becomes an inert "<TypeName>" placeholder, as in transformers.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    if isinstance(value, np.generic):
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def normalize_messages(messages: Sequence[Any]) -> list[dict]:
    """The messages as the template sees them: plain dicts, None-valued keys dropped, reasoning aliased.

    Dropping None matters: OpenAI clients send `content=None` beside `tool_calls`, and many templates
    would print "None" or fail on it, while they handle a missing key.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise TokenizerError(
            f"chat template: messages must be a non-empty list of message dicts, got {messages!r:.200}"
        )
    normalized = []
    for index, message in enumerate(_as_dicts(list(messages))):
        if not isinstance(message, dict):
            raise TokenizerError(
                f"chat template: messages[{index}] must be a dict with 'role' and 'content', "
                f"got {type(message).__name__}: {message!r:.200}"
            )
        message = _plain({key: value for key, value in message.items() if value is not None})
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        normalized.append(message)
    return normalized


def render_chat_template(
    source: str,
    messages: Sequence[Any],
    tools: list[dict] | None = None,
    add_generation_prompt: bool = False,
    documents: list[dict] | None = None,
    *,
    template_name: str = "chat template",
    **kwargs: Any,
) -> str:
    """Render `source` for one conversation, as `apply_chat_template(..., tokenize=False)` would.

    `tools` must already be dicts (see `lfm2.tools.template_tools`); `kwargs` carries the
    special tokens (`bos_token`, `eos_token`, ...) and any template-specific switches.
    `template_name` says where the template came from, for error messages.
    """
    try:
        template = compile_template(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TokenizerError(
            f"{template_name} is not valid Jinja: {exc.message} (line {exc.lineno}); "
            "fix the template or pass another one"
        ) from exc
    chat = normalize_messages(messages)
    try:
        return template.render(
            messages=chat,
            tools=_plain(tools),
            documents=_plain(documents),
            add_generation_prompt=add_generation_prompt,
            **_plain(kwargs),
        )
    except TokenizerError:
        raise
    except Exception as exc:  # any failure inside untrusted template code becomes one clear error
        raise TokenizerError(
            f"{template_name} could not render this conversation: {type(exc).__name__}: {exc}"
        ) from exc
