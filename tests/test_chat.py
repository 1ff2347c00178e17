"""`llm.chat` / `llm.chat_stream` with tools, on a model whose replies are scripted.

A forward hook makes the random model produce exact token sequences, so the engine, the chat
template, the tool-call parser and the tool loop are tested end to end without trained weights.
"""

from __future__ import annotations

import json

import pytest

import lfm2
from lfm2.errors import GenerationError


def get_weather(city: str, unit: str = "celsius") -> str:
    """Current weather in a city.

    Args:
        city: the city name
        unit: celsius or fahrenheit
    """
    if city == "Atlantis":
        raise ValueError("no such city")
    return f"sunny, 22 degrees {unit} in {city}"


class Script:
    """Force the model to reply with `replies[i]` (then end of turn) on its i-th generation."""

    def __init__(self, llm, replies: list[str]) -> None:
        tok = llm.tokenizer
        self.replies = [tok.encode(r) + [tok.token_to_id("<|im_end|>")] for r in replies]
        self.generation, self.step, self.prompts = -1, 0, []
        # Every generation must start with a prefill that the hooks see: no prefix reuse meanwhile.
        self.cache, self.cache_bytes = llm.prefix_cache, llm.prefix_cache.max_bytes
        llm.prefix_cache.max_bytes = 0
        self.handles = [
            llm.model.register_forward_pre_hook(self.pre),
            llm.model.lm_head.register_forward_hook(self.post),
        ]

    def pre(self, module, args):
        ids = args[0]
        # Several tokens on a filled cache: strict tool calls scoring the listed names, not a prefill.
        self.scoring = ids.shape[1] > 1 and args[1].length > 0
        if ids.shape[1] > 1 and not self.scoring:  # a prefill: a new generation starts
            self.generation += 1
            self.step = 0
            self.prompts.append(ids[0].tolist())

    def post(self, module, args, out):
        script = self.replies[self.generation]
        out = out.clone()
        if self.scoring:  # the scripted tokens that would follow, position by position
            for i in range(out.shape[1]):
                out[:, i, script[min(self.step + i, len(script) - 1)]] = 1e4
            return out
        out[..., script[min(self.step, len(script) - 1)]] = 1e4
        self.step += 1
        return out

    def close(self):
        self.cache.max_bytes = self.cache_bytes
        for h in self.handles:
            h.remove()


@pytest.fixture
def llm(chat_checkpoint):
    return lfm2.load(chat_checkpoint)


def scripted(llm, replies):
    return Script(llm, replies)


def test_chat_returns_openai_tool_calls(llm):
    reply_text = "Let me check.<|tool_call_start|>[get_weather(city='Paris', unit=\"celsius\")]<|tool_call_end|>"
    s = scripted(llm, [reply_text])
    try:
        reply = llm.chat([{"role": "user", "content": "Weather in Paris?"}], tools=[get_weather])
    finally:
        s.close()
    assert reply["role"] == "assistant" and reply["content"] == "Let me check."
    (call,) = reply["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris", "unit": "celsius"}
    prompt = llm.tokenizer.decode(s.prompts[0])
    assert "<|tool_list_start|>" in prompt and '"name": "get_weather"' in prompt


def test_tool_loop_runs_calls_and_feeds_results_back(llm):
    s = scripted(llm, [
        "<|tool_call_start|>[get_weather(city='Paris'), get_weather(city='Atlantis')]<|tool_call_end|>",
        "Paris is sunny.",
    ])
    convo = [{"role": "user", "content": "Weather in Paris and Atlantis?"}]
    try:
        reply = llm.chat(convo, tools=[get_weather], run_tools=True)
    finally:
        s.close()
    assert reply == {"role": "assistant", "content": "Paris is sunny."}
    assert [m["role"] for m in convo] == ["user", "assistant", "tool", "tool", "assistant"]
    assert convo[2]["content"] == "sunny, 22 degrees celsius in Paris"
    assert convo[3]["content"].startswith("Error: ValueError: no such city")
    assert convo[2]["tool_call_id"] == convo[1]["tool_calls"][0]["id"]
    # The second prompt holds the call in LFM2's format and both results.
    second = llm.tokenizer.decode(s.prompts[1])
    assert second.endswith(
        "<|im_start|>assistant\n<|tool_call_start|>[get_weather(city='Paris'), get_weather(city='Atlantis')]"
        "<|tool_call_end|><|im_end|>\n"
        "<|im_start|>tool\n<|tool_response_start|>sunny, 22 degrees celsius in Paris<|tool_response_end|><|im_end|>\n"
        "<|im_start|>tool\n<|tool_response_start|>Error: ValueError: no such city<|tool_response_end|><|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_tool_loop_stops_after_max_rounds(llm):
    call = "<|tool_call_start|>[get_weather(city='Oslo')]<|tool_call_end|>"
    s = scripted(llm, [call] * 3)
    convo = [{"role": "user", "content": "loop"}]
    try:
        reply = llm.chat(convo, tools=[get_weather], run_tools=True, max_rounds=2)
    finally:
        s.close()
    assert reply["tool_calls"] and s.generation == 1  # two rounds, then it gives up
    assert [m["role"] for m in convo] == ["user", "assistant", "tool", "assistant"]


def test_chat_stream_matches_chat(llm):
    text = "Sure thing.<|tool_call_start|>[get_weather(city='Rome, Italy')]<|tool_call_end|>"
    s = scripted(llm, [text, text])
    try:
        whole = llm.chat([{"role": "user", "content": "Rome?"}], tools=[get_weather])
        deltas = list(llm.chat_stream([{"role": "user", "content": "Rome?"}], tools=[get_weather]))
    finally:
        s.close()
    content = "".join(d.get("content", "") for d in deltas)
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    assert content == whole["content"] == "Sure thing."
    assert [c["function"] for c in calls] == [c["function"] for c in whole["tool_calls"]]
    assert "<|tool_call" not in content


def test_named_tool_choice_forces_the_call(llm):
    s = scripted(llm, ["city='Rome')]<|tool_call_end|>"])
    try:
        reply = llm.chat([{"role": "user", "content": "hi"}], tools=[get_weather],
                         tool_choice={"type": "function", "function": {"name": "get_weather"}})
    finally:
        s.close()
    assert reply["tool_calls"][0]["function"]["name"] == "get_weather"
    assert llm.tokenizer.decode(s.prompts[0]).endswith("<|im_start|>assistant\n<|tool_call_start|>[get_weather(")


def test_tool_choice_none_hides_tools(llm):
    s = scripted(llm, ["<|tool_call_start|>[get_weather(city='Rome')]<|tool_call_end|>"])
    try:
        reply = llm.chat([{"role": "user", "content": "hi"}], tools=[get_weather], tool_choice="none")
    finally:
        s.close()
    assert "tool_calls" not in reply
    assert "get_weather" not in llm.tokenizer.decode(s.prompts[0])


def test_bad_tool_choice(llm):
    with pytest.raises(GenerationError, match="tool_choice"):
        llm.chat([{"role": "user", "content": "hi"}], tools=[get_weather], tool_choice="sometimes")
    with pytest.raises(GenerationError, match="needs tools"):
        llm.chat([{"role": "user", "content": "hi"}], tool_choice="required")


def test_multi_turn_history_renders(llm):
    s = scripted(llm, ["Fine."])
    try:
        llm.chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "How are you?"}])
    finally:
        s.close()
    prompt = llm.tokenizer.decode(s.prompts[0])
    assert prompt == (
        "<|startoftext|><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nHow are you?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_a_reply_without_tools_cannot_open_a_tool_call():
    # The bundled model opens a call block for "Tell me a joke." when no tool is listed (greedy, unconstrained);
    # a call to nothing would reach the user as `<|tool_call_start|>[...` text, so the markers are masked.
    import lfm2
    from lfm2.constrain import NoToolCalls

    llm = lfm2.load(lfm2.default_model_path())
    tok = llm.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "Tell me a joke."}], add_generation_prompt=True)
    assert llm.generate(prompt, temperature=0, max_new_tokens=8).startswith("<|tool_call_start|>")  # the premise
    start, end = tok.token_to_id("<|tool_call_start|>"), tok.token_to_id("<|tool_call_end|>")
    for tools, choice in [(None, None), ([], "auto"), ([{"name": "f", "parameters": {}}], "none")]:
        _, _, offered, constraint = llm.chat_prompt([{"role": "user", "content": "Tell me a joke."}], tools, choice)
        assert offered is None and isinstance(constraint, NoToolCalls)
        mask = constraint.mask()
        assert not mask[start] and not mask[end] and int(mask.sum()) == llm.config.vocab_size - 2
    reply = llm.chat([{"role": "user", "content": "Tell me a joke."}], temperature=0, max_new_tokens=24)
    assert "<|tool_call" not in reply["content"] and "tool_calls" not in reply
    streamed = "".join(d.get("content", "") for d in llm.chat_stream([{"role": "user", "content": "Tell me a joke."}],
                                                                      temperature=0, max_new_tokens=24))
    assert streamed == reply["content"]
