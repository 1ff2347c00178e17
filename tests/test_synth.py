"""Generated chat and tool conversations: deterministic, renderable, held-out split disjoint."""

from __future__ import annotations

import json

from lfm2.tokenizer import Tokenizer
from lfm2.tools import parse_tool_calls
from lfm2.train.synth import TOOLS_HELDOUT, TOOLS_TRAIN, conversations, eval_expression


def test_deterministic_and_mixed():
    a, b = conversations(50, seed=3), conversations(50, seed=3)
    assert a == b and a != conversations(50, seed=4)
    with_tools = [c for c in a if "tools" in c]
    assert 15 < len(with_tools) < 45


def test_heldout_tools_and_phrasings_are_unseen():
    train_names = {k.name for k in TOOLS_TRAIN}
    held = conversations(200, seed=1, split="heldout", tool_fraction=1.0)
    assert all(c["expected"]["name"] not in train_names for c in held)
    assert all(t["function"]["name"] not in train_names for c in held for t in c["tools"])
    train_asks = {a for k in TOOLS_TRAIN for a in k.asks}
    assert not train_asks & {a for k in TOOLS_HELDOUT for a in k.asks}


def test_conversations_render_and_calls_parse_back(chat_checkpoint):
    tok = Tokenizer.from_dir(chat_checkpoint)
    for conv in conversations(40, seed=5, tool_fraction=1.0):
        text = tok.apply_chat_template(conv["messages"], tools=conv["tools"])
        reply = text.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
        _, calls = parse_tool_calls(reply)
        assert calls[0]["function"]["name"] == conv["expected"]["name"]
        assert json.loads(calls[0]["function"]["arguments"]) == conv["expected"]["arguments"]
        assert conv["expected"]["name"] in text.split("<|im_start|>user")[0]  # listed in the system turn


def test_calculator_answers_are_right():
    assert eval_expression("2 + 3 * 4") == 14
