"""The bundled tiny model: a real LFM2 checkpoint that chats and calls tools out of the box."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import lfm2
from lfm2.train.bundle import tool_call_scores
from lfm2.train.synth import conversations

PATH = lfm2.default_model_path()
pytestmark = pytest.mark.skipif(not (PATH / "config.json").is_file(), reason="bundled model not built")


@pytest.fixture(scope="module")
def llm():
    return lfm2.load()


def test_default_load_is_the_bundled_model(llm):
    assert llm.path == PATH and llm.tokenizer is not None
    size = sum(f.stat().st_size for f in PATH.iterdir())
    assert 5e6 < size < 30e6  # small enough to ship
    card = (PATH / "README.md").read_text()
    assert "Tool calls on" in card and "perplexity" in card


def test_transformers_loads_it_with_equal_logits(llm):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(PATH, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(PATH)
    prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                               add_generation_prompt=True)
    assert tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, tokenize=False) == prompt
    ids = torch.tensor([llm.tokenizer.encode(prompt)])
    assert tok(prompt, add_special_tokens=False)["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        assert (hf(ids).logits - llm.model(ids)).abs().max() <= 1e-4


def test_answers_in_english(llm):
    reply = llm.chat([{"role": "user", "content": "Hello!"}], temperature=0, max_new_tokens=40)["content"]
    words = reply.split()
    assert len(words) >= 2 and all(w.isascii() for w in words), reply


def test_follows_a_conversation(llm):
    """A second question in the same conversation is answered on its own terms (fine-tuned on
    conversations of several exchanges; the previous model garbled every second turn)."""
    convo = [{"role": "user", "content": "Hello!"}]
    convo.append(llm.chat(convo, temperature=0, max_new_tokens=40))
    convo.append({"role": "user", "content": "What is the capital of Japan?"})
    assert "Tokyo" in llm.chat(convo, temperature=0, max_new_tokens=40)["content"]


def test_calls_known_tools(llm):
    """The README's tools (weather, calculator, unit conversion) with fresh arguments and other tools
    listed beside them. Unseen tools are measured by the recipe's evaluation and reported in the
    model card (eval.json), not asserted: the model generalises to them only a little so far."""
    classic = {"get_weather", "calculate", "convert_units"}
    convs = [c for c in conversations(400, seed=777, split="train", tool_fraction=1.0)
             if c["expected"]["name"] in classic][:30]
    assert len(convs) == 30
    _, right_args = tool_call_scores(llm, convs, strict=False)
    assert right_args >= 0.8


def test_strict_tool_calls_on_unseen_tools(llm):
    """Held-out tools and wordings (not the recipe's evaluation prompts: another seed). Strict tool calls
    keep names and parameters to the listed schemas; measured on these 30: strict right tool 0.77 and
    arguments 0.67, unconstrained 0.43 and 0.33 (the recipe's 200: 0.735 / 0.605 and 0.41 / 0.15)."""
    held = conversations(30, seed=4242, split="heldout", tool_fraction=1.0)
    strict_tool, strict_args = tool_call_scores(llm, held, strict=True)
    free_tool, free_args = tool_call_scores(llm, held, strict=False)
    assert strict_tool >= 0.65 and strict_args >= 0.55, (strict_tool, strict_args)
    assert free_tool >= 0.3 and free_args >= 0.2, (free_tool, free_args)
    assert strict_tool > free_tool and strict_args > free_args


def test_answers_from_the_tool_result(llm):
    """The README's exchange: the call, then an answer that takes its facts from the tool's result."""
    def get_weather(city: str) -> str:
        """Get the current weather in a city.

        Args:
            city: The city name
        """
        return json.dumps({"temperature": 18, "condition": "cloudy"})

    convo = [{"role": "user", "content": "What's the weather in Lisbon?"}]
    reply = llm.chat(convo, tools=[get_weather], run_tools=True, temperature=0)
    assert json.loads(convo[1]["tool_calls"][0]["function"]["arguments"]) == {"city": "Lisbon"}
    assert convo[2]["role"] == "tool" and "cloudy" in convo[2]["content"]
    assert "cloudy" in reply["content"] and "18" in reply["content"], reply


def test_cli_chat_without_arguments():
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, ["-m", "lfm2", "chat", "--temperature", "0", "--max-new-tokens", "30"],
                          encoding="utf-8", timeout=60)
    child.expect("> ")
    child.sendline("Hi")
    child.expect("> ")
    reply = child.before.strip().splitlines()[-1]
    assert any(c.isalpha() for c in reply) and reply.isascii(), reply
    child.sendline("/exit")
    child.expect(pexpect.EOF)
