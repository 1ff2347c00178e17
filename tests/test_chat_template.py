"""Chat templates rendered by lfm2 must be byte-identical to transformers' `apply_chat_template`.

Each conversation is rendered with the three real LFM2 templates (from
../shared/reference/chat_templates beside the project, skipped when absent) and with lfm2's DEFAULT_CHAT_TEMPLATE,
by our `Tokenizer.apply_chat_template` and by `AutoTokenizer.apply_chat_template(tokenize=False)`
on the same tokenizer folder. Our side always gets OpenAI-shaped messages; templates that cannot
render `tool_calls` get, on the transformers side, the Pythonic call text already in `content`,
which is what LFM2 models were trained on.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
from pathlib import Path
from typing import Literal

import pytest

from lfm2.chat_template import DEFAULT_CHAT_TEMPLATE, compile_template, render_chat_template
from lfm2.errors import TokenizerError
from lfm2.tokenizer import Tokenizer
from lfm2.tools import render_chat
from lfm2.train.tokenizer import train_tokenizer
from tests.conftest import reference_file

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.reference
REFERENCE_TEMPLATES = ["LFM2-8B-A1B.jinja", "LFM2.5-Instruct.jinja", "LFM2.5-8B-A1B.jinja"]
TEMPLATE_NAMES = ["default", *REFERENCE_TEMPLATES]

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city — météo, 天气.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
SEARCH_BARE = {  # a bare function dict, as the model card's tool prompt lists them: rendered as given
    "name": "search",
    "description": "Search the web.",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
}
SEARCH = {"type": "function", "function": SEARCH_BARE}
ADD_BARE = {  # keys in an unusual order, an extra key: the template must see exactly this
    "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                   "required": ["a", "b"]},
    "name": "add",
    "strict": True,
    "description": "Add two numbers.",
}


def book_table(restaurant: str, people: int, time: str | None = None, seating: Literal["in", "out"] = "in",
               tags: list[str] | None = None) -> dict:
    """Book a table at a restaurant.

    Works for most places in town.

    Args:
        restaurant: the restaurant's name
        people: how many people, counting
            the one who books
        time: when, as HH:MM
        seating: where to sit
        tags: dietary notes (choices: ["vegan", "halal"])

    Returns:
        the booking, with its id
    """
    return {}

CALL_WEATHER = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
CALL_WEATHER_TEXT = "<|tool_call_start|>[get_weather(city='Paris')]<|tool_call_end|>"


def conv(name, messages, tools=None, *, hf_messages=None, hf_tools=None, hf_pythonic=None, kwargs=None):
    """One test case: what our side gets, and what transformers gets for each kind of template.

    `hf_messages` replaces `messages` for transformers on every template (e.g. JSON-string
    arguments already parsed); `hf_pythonic` replaces it on templates that cannot render
    `tool_calls` (content holding the Pythonic call text instead).
    """
    hf_messages = messages if hf_messages is None else hf_messages
    return pytest.param(
        {
            "messages": messages,
            "tools": tools,
            "hf_messages": hf_messages,
            "hf_tools": tools if hf_tools is None else hf_tools,
            "hf_pythonic": hf_messages if hf_pythonic is None else hf_pythonic,
            "kwargs": kwargs or {},
        },
        id=name,
    )


def assistant_calls(calls, content=None, **extra):
    return {"role": "assistant", "content": content, "tool_calls": calls, **extra}


CONVERSATIONS = [
    conv("single-user", [{"role": "user", "content": "Hello!"}]),
    conv("system", [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}]),
    conv(
        "multi-turn",
        [
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4."},
            {"role": "user", "content": "And 3+3?"},
            {"role": "assistant", "content": "6."},
        ],
    ),
    conv("tools-no-system", [{"role": "user", "content": "Weather?"}], [WEATHER]),
    conv(
        "tools-with-system",
        [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Go"}],
        [WEATHER, SEARCH],
    ),
    conv("bare-function-tool", [{"role": "user", "content": "Find it"}], [SEARCH_BARE]),
    conv("bare-tools-with-system", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Go"}],
         [SEARCH_BARE, ADD_BARE]),
    conv("mixed-tools", [{"role": "user", "content": "Weather, then search"}], [WEATHER, SEARCH_BARE, ADD_BARE]),
    conv("callable-tools", [{"role": "user", "content": "Book it"}], [book_table, SEARCH_BARE, WEATHER]),
    conv(
        "tool-call-and-result",
        [
            {"role": "user", "content": "Weather in Paris?"},
            assistant_calls([CALL_WEATHER]),
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21, "sky": "clear"}'},
            {"role": "assistant", "content": "It is 21 °C and clear."},
        ],
        [WEATHER],
        hf_pythonic=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": CALL_WEATHER_TEXT},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21, "sky": "clear"}'},
            {"role": "assistant", "content": "It is 21 °C and clear."},
        ],
    ),
    conv(
        "parallel-calls-with-text",
        [
            {"role": "user", "content": "Paris and Oslo, 3 days"},
            assistant_calls(
                [
                    {
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}},
                    },
                    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo", "days": 3}}},
                ],
                content="Checking both.",
            ),
        ],
        [WEATHER],
        hf_pythonic=[
            {"role": "user", "content": "Paris and Oslo, 3 days"},
            {
                "role": "assistant",
                "content": "Checking both.<|tool_call_start|>[get_weather(city='Paris', days=3), "
                "get_weather(city='Oslo', days=3)]<|tool_call_end|>",
            },
        ],
    ),
    conv(
        "json-string-arguments",
        [
            {"role": "user", "content": "Weather in Paris?"},
            assistant_calls([{**CALL_WEATHER, "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]),
        ],
        [WEATHER],
        hf_messages=[{"role": "user", "content": "Weather in Paris?"}, assistant_calls([CALL_WEATHER])],
        hf_pythonic=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": CALL_WEATHER_TEXT},
        ],
    ),
    conv(
        "argument-types",
        [
            {"role": "user", "content": "x"},
            assistant_calls(
                [
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "arguments": {
                                "n": -2,
                                "x": 1.5,
                                "ok": True,
                                "none": None,
                                "tags": ["a", 2],
                                "cfg": {"k": False},
                            },
                        },
                    }
                ]
            ),
        ],
        hf_pythonic=[
            {"role": "user", "content": "x"},
            {
                "role": "assistant",
                "content": "<|tool_call_start|>[f(n=-2, x=1.5, ok=True, none=None, tags=['a', 2], "
                'cfg={"k": false})]<|tool_call_end|>',
            },
        ],
    ),
    conv("empty-content", [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]),
    conv("empty-system", [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}]),
    conv(
        "non-ascii",
        [
            {"role": "system", "content": "Réponds en français. 用中文回答。"},
            {"role": "user", "content": 'مرحبا! 🎉 Ünïcödé "quotes" and \\backslash\\ <b>tags</b>'},
            {"role": "assistant", "content": "你好 👋 — ça va?"},
        ],
        [WEATHER],
    ),
    conv(
        "thinking-stripped-from-past-turns",
        [
            {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "<think>Let me think.\nStep 1.</think>\n\nA1"},
            {"role": "user", "content": "Q2"},
            {"role": "assistant", "content": "<think>More thought.</think>A2"},
        ],
    ),
    conv(
        "thinking-kept-when-asked",
        [
            {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "<think>Hidden.</think>A1"},
            {"role": "user", "content": "Q2"},
        ],
        kwargs={"keep_past_thinking": True, "preserve_thinking": True},
    ),
    conv(
        "reasoning-content-field",
        [
            {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A1", "reasoning_content": "old reasoning"},
            {"role": "user", "content": "Q2"},
            {"role": "assistant", "content": "A2", "reasoning_content": "new reasoning"},
        ],
    ),
    conv(
        "content-parts",
        [
            {
                "role": "user",
                "content": [{"type": "text", "text": "Part one. "}, {"type": "text", "text": "Part two."}],
            },
        ],
    ),
    conv(
        "tool-result-then-user",
        [
            {"role": "system", "content": "Sys"},
            {"role": "user", "content": "Search cats"},
            assistant_calls(
                [{"type": "function", "function": {"name": "search", "arguments": {"query": 'it\'s "cats"'}}}]
            ),
            {"role": "tool", "content": "[1, 2, 3]"},
            {"role": "assistant", "content": "Found 3."},
            {"role": "user", "content": "Thanks"},
        ],
        [SEARCH],
        hf_pythonic=[
            {"role": "system", "content": "Sys"},
            {"role": "user", "content": "Search cats"},
            {
                "role": "assistant",
                "content": "<|tool_call_start|>[search(query='it\\'s \"cats\"')]<|tool_call_end|>",
            },
            {"role": "tool", "content": "[1, 2, 3]"},
            {"role": "assistant", "content": "Found 3."},
            {"role": "user", "content": "Thanks"},
        ],
    ),
]


def template_source(name: str) -> str:
    if name == "default":
        return DEFAULT_CHAT_TEMPLATE
    return reference_file("chat_templates", name).read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    texts = [f"Sentence number {i}: the quick brown fox, 你好, مرحبا, ça va." for i in range(200)]
    return train_tokenizer(texts, 400, tmp_path_factory.mktemp("chat_tok"))


@pytest.fixture(scope="module")
def tokenizers_by_template(base_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """For each template: (our Tokenizer, transformers' tokenizer) loaded from one folder."""
    cache: dict[str, tuple[Tokenizer, object]] = {}

    def get(name: str):
        if name not in cache:
            source = template_source(name)
            folder = tmp_path_factory.mktemp(name.replace(".", "_"))
            shutil.copytree(base_dir, folder, dirs_exist_ok=True)
            config = json.loads((folder / "tokenizer_config.json").read_text())
            config["chat_template"] = source
            (folder / "tokenizer_config.json").write_text(json.dumps(config))
            cache[name] = (Tokenizer.from_dir(folder), transformers.AutoTokenizer.from_pretrained(folder))
        return cache[name]

    return get


@pytest.mark.parametrize("add_generation_prompt", [False, True], ids=["no-gen", "gen"])
@pytest.mark.parametrize("case", CONVERSATIONS)
@pytest.mark.parametrize("template", TEMPLATE_NAMES)
def test_matches_transformers(tokenizers_by_template, template: str, case: dict, add_generation_prompt: bool) -> None:
    ours, reference = tokenizers_by_template(template)
    renders_tool_calls = "tool_calls" in template_source(template)
    hf_messages = case["hf_messages"] if renders_tool_calls else case["hf_pythonic"]
    expected = reference.apply_chat_template(
        copy.deepcopy(hf_messages),
        tools=copy.deepcopy(case["hf_tools"]),
        add_generation_prompt=add_generation_prompt,
        tokenize=False,
        **case["kwargs"],
    )
    messages = copy.deepcopy(case["messages"])
    got = render_chat(ours, messages, tools=case["tools"], add_generation_prompt=add_generation_prompt,
                      **case["kwargs"])
    assert got == expected
    assert messages == case["messages"]  # the caller's messages are left untouched
    assert got.startswith("<|startoftext|>")
    assert got.endswith("<|im_start|>assistant\n") == add_generation_prompt


def test_reference_templates_cannot_or_can_render_tool_calls() -> None:
    # Guards the premise of the tool-call cases above: which templates render `tool_calls` themselves.
    assert "tool_calls" in DEFAULT_CHAT_TEMPLATE
    renders = {name: "tool_calls" in template_source(name) for name in REFERENCE_TEMPLATES}
    assert renders == {"LFM2-8B-A1B.jinja": False, "LFM2.5-Instruct.jinja": False, "LFM2.5-8B-A1B.jinja": True}


# -- the default template's format ----------------------------------------------------------------


def render_default(messages, tools=None, add_generation_prompt=False):
    return render_chat_template(
        DEFAULT_CHAT_TEMPLATE, messages, tools, add_generation_prompt, bos_token="<|startoftext|>"
    )


def test_default_template_format() -> None:
    messages = [
        {"role": "system", "content": "Sys"},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [CALL_WEATHER]},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "Sunny."},
    ]
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
    assert render_default(messages, [tool], add_generation_prompt=True) == (
        "<|startoftext|><|im_start|>system\nSys\n"
        'List of tools: <|tool_list_start|>[{"type": "function", "function": {"name": "get_weather", '
        '"parameters": {}}}]<|tool_list_end|><|im_end|>\n'
        "<|im_start|>user\nWeather?<|im_end|>\n"
        f"<|im_start|>assistant\n{CALL_WEATHER_TEXT}<|im_end|>\n"
        "<|im_start|>tool\n<|tool_response_start|>sunny<|tool_response_end|><|im_end|>\n"
        "<|im_start|>assistant\nSunny.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_default_template_renders_calls_like_lfm2_tools() -> None:
    """The default template's tool calls equal `lfm2.tools.render_tool_calls`, which the parser reads back."""
    tools = pytest.importorskip("lfm2.tools")
    rng = random.Random(0)
    values = [
        "plain",
        "it's",
        'say "hi"',
        "back\\slash",
        "line\nbreak\ttab\r",
        "ünï 中文 🎉",
        "",
        "<|tool_call_end|> sneaky",
        0,
        -7,
        2.5,
        1e-07,
        True,
        False,
        None,
        [1, "a", [True, None]],
        {"k": "v", "n": [1, 2], "x": "<|tool_call_end|>"},
        [],
    ]
    for _ in range(30):
        arguments = {f"a{i}": rng.choice(values) for i in range(rng.randint(0, 4))}
        calls = [{"type": "function", "function": {"name": "ns.fn", "arguments": arguments}}]
        rendered = render_default([{"role": "assistant", "content": "", "tool_calls": calls}])
        expected_text = tools.render_tool_calls(calls)
        assert rendered == f"<|startoftext|><|im_start|>assistant\n{expected_text}<|im_end|>\n"
        content, parsed = tools.parse_tool_calls(expected_text)
        assert content == "" and json.loads(parsed[0]["function"]["arguments"]) == arguments


def test_default_template_strips_only_past_thinking() -> None:
    messages = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "<think>a</think>\nA1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "<think>b</think>A2", "reasoning_content": "r"},
    ]
    text = render_default(messages)
    assert "<|im_start|>assistant\nA1<|im_end|>" in text
    assert "<|im_start|>assistant\n<think>r</think><think>b</think>A2<|im_end|>" in text


# -- the rendering environment --------------------------------------------------------------------


def test_raise_exception_becomes_tokenizer_error() -> None:
    source = "{% if messages[0].role != 'user' %}{{ raise_exception('first message must be user') }}{% endif %}"
    with pytest.raises(TokenizerError, match="first message must be user"):
        render_chat_template(source, [{"role": "system", "content": "x"}])


def test_syntax_error_names_the_template() -> None:
    with pytest.raises(TokenizerError, match=r"my template is not valid Jinja.*line 1"):
        render_chat_template("{% if %}", [{"role": "user", "content": "x"}], template_name="my template")


def test_render_failure_names_the_template() -> None:
    with pytest.raises(TokenizerError, match=r"my template could not render.*TypeError"):
        render_chat_template("{{ 1 + 'a' }}", [{"role": "user", "content": "x"}], template_name="my template")


def test_bad_messages_are_refused() -> None:
    with pytest.raises(TokenizerError, match="non-empty list"):
        render_chat_template("x", [])
    with pytest.raises(TokenizerError, match=r"messages\[1\] must be a dict"):
        render_chat_template("x", [{"role": "user", "content": "a"}, "hello"])


def test_sandbox_refuses_underscore_namespace_attributes() -> None:
    with pytest.raises(TokenizerError, match="underscore"):
        render_chat_template("{% set ns = namespace(_x=1) %}", [{"role": "user", "content": "x"}])
    with pytest.raises(TokenizerError, match="SecurityError"):
        render_chat_template("{{ messages.__class__.__mro__ }}", [{"role": "user", "content": "x"}])


@pytest.mark.parametrize(
    "source",
    [
        "{{ messages | tojson }}",
        "{{ messages | tojson(indent=2) }}",
        "{{ messages | tojson(sort_keys=true, separators=(',', ':')) }}",
        "{{ messages | tojson(ensure_ascii=true) }}",
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}[{{ m.content }}]{% endfor %}",
        "{% generation %}gen:{{ messages[0].content }}{% endgeneration %}|",
        "  {% if true %}\n    x\n  {% endif %}\n",  # trim_blocks and lstrip_blocks
        "{{ dict(a=1) | tojson }} {{ documents is none }} {{ bos_token }}{{ extra }}",
        "{{ messages[1].keys() | list | tojson }}",  # None values dropped, reasoning aliased
    ],
)
def test_environment_matches_transformers(source: str) -> None:
    from transformers.utils.chat_template_utils import render_jinja_template

    messages = [
        {"role": "user", "content": '<b>ünï</b> & "q"'},
        {"role": "assistant", "content": None, "reasoning": "why"},
    ]
    kwargs = {"bos_token": "<s>", "extra": "!"}
    from transformers.utils.chat_template_utils import _normalize_chat_messages

    expected = render_jinja_template([_normalize_chat_messages(messages)], chat_template=source, **kwargs)[0][0]
    assert render_chat_template(source, messages, **kwargs) == expected


def test_strftime_now_is_available() -> None:
    text = render_chat_template("{{ strftime_now('%Y') }}", [{"role": "user", "content": "x"}])
    assert text.isdigit() and len(text) == 4


def test_templates_are_compiled_once() -> None:
    compile_template.cache_clear()
    source = "{{ messages[0].content }}-cached"
    for _ in range(3):
        render_chat_template(source, [{"role": "user", "content": "x"}])
    info = compile_template.cache_info()
    assert (info.misses, info.hits) == (1, 2)
