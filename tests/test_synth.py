"""Generated chat and tool conversations: deterministic, renderable, held-out split disjoint."""

from __future__ import annotations

import json
import random

import pytest

from lfm2.tokenizer import Tokenizer
from lfm2.tools import parse_tool_calls, render_chat
from lfm2.train.synth import (
    ACTIONS_HELDOUT,
    ACTIONS_TRAIN,
    ASK,
    DESCRIBE,
    LOOKUPS_HELDOUT,
    LOOKUPS_TRAIN,
    SLOTS,
    Variety,
    conversations,
    eval_expression,
    random_tool,
)


def test_deterministic_and_mixed():
    a, b = conversations(50, seed=3), conversations(50, seed=3)
    assert a == b and a != conversations(50, seed=4)
    with_calls = [c for c in a if "expected" in c]
    assert 15 < len(with_calls) < 45
    assert any("tools" in c and "expected" not in c for c in conversations(200, seed=3))  # tools offered, not needed


def test_many_distinct_training_tools():
    rng = random.Random(0)
    tools = [random_tool(rng, "train") for _ in range(2000)]
    assert len({t.name for t in tools}) > 200  # too many to memorise: the model must read the list
    assert len({tuple(n for n, _ in t.params) for t in tools}) > 100  # parameter names vary too


def test_heldout_tools_and_phrasings_are_unseen():
    assert not {w for w, _ in LOOKUPS_TRAIN} & {w for w, _ in LOOKUPS_HELDOUT}
    assert not {o for _, o, _ in ACTIONS_TRAIN} & {o for _, o, _ in ACTIONS_HELDOUT}
    for table in (ASK, DESCRIBE):
        for kind in ("lookup", "action"):
            assert not set(table["train"][kind]) & set(table["heldout"][kind])
    for slot in SLOTS.values():
        assert not set(slot.phrases["train"]) & set(slot.phrases["heldout"])
    train = conversations(3000, seed=0, split="train", tool_fraction=1.0)
    train_names = {c["expected"]["name"] for c in train}
    train_asks = {c["messages"][0]["content"] for c in train}
    held = conversations(200, seed=1, split="heldout", tool_fraction=1.0)
    assert all(c["expected"]["name"] not in train_names for c in held)
    assert all(t["function"]["name"] not in train_names for c in held for t in c["tools"])
    assert not train_asks & {c["messages"][0]["content"] for c in held}


def test_made_up_training_tools_only_in_training():
    from lfm2.train.synth import SYLLABLES

    def made_up(name: str) -> bool:
        rest = name.split("_", 1)[-1]
        while rest and any(rest.startswith(s) for s in SYLLABLES):
            rest = rest[next(len(s) for s in SYLLABLES if rest.startswith(s)):]
        return rest == ""

    train = conversations(500, seed=0, split="train", tool_fraction=1.0)
    assert sum(made_up(c["expected"]["name"]) for c in train) > 100  # must be copied from the list
    held = conversations(200, seed=1, split="heldout", tool_fraction=1.0)
    assert not any(made_up(c["expected"]["name"]) for c in held)  # held-out tools are real words


def test_made_up_values_and_parameter_names_only_in_training():
    from lfm2.train.synth import CITIES, DAYS, NAMES, SLOTS, WORDS

    known_values = {*CITIES, *DAYS, *NAMES, *WORDS}
    known_params = {n for slot in SLOTS.values() for n in slot.names} | {"expression", "value", "from_unit", "to_unit"}

    def counts(convs: list[dict]) -> tuple[int, int]:
        values = params = 0
        for c in convs:
            args = c["expected"]["arguments"]
            values += sum(isinstance(v, str) and v.isalpha() and v not in known_values for v in args.values())
            params += sum(k not in known_params for k in args)
        return values, params

    values, params = counts(conversations(500, seed=0, split="train", tool_fraction=1.0))
    assert values > 100 and params > 100  # the model must copy these: no list predicts them
    assert counts(conversations(200, seed=1, split="heldout", tool_fraction=1.0)) == (0, 0)


def test_made_up_verbs_only_when_asked_and_only_in_training():
    from lfm2.train.synth import ACTIONS_HELDOUT, ACTIONS_TRAIN, VERBS_LOOKUP

    def verbs(convs: list[dict]) -> list[str]:
        return [c["expected"]["name"].split("_")[0] for c in convs]

    known = {*VERBS_LOOKUP, *(v for v, _, _ in ACTIONS_TRAIN), "calculate", "convert"}
    assert set(verbs(conversations(300, seed=0, split="train", tool_fraction=1.0))) <= known  # the tokenizer's texts
    with_made_up = verbs(conversations(300, seed=0, split="train", tool_fraction=1.0, variety=Variety(0.4)))
    assert 60 < sum(v not in known for v in with_made_up) < 180
    held = verbs(conversations(100, seed=1, split="heldout", tool_fraction=1.0, variety=Variety(0.4)))
    assert set(held) <= {*VERBS_LOOKUP, *(v for v, _, _ in ACTIONS_HELDOUT)}


def test_argument_values_appear_in_the_request():
    for conv in conversations(300, seed=2, split="heldout", tool_fraction=1.0):
        ask = conv["messages"][0]["content"]
        assert all(str(v) in ask for v in conv["expected"]["arguments"].values()), ask


def test_conversations_render_and_calls_parse_back(chat_checkpoint):
    tok = Tokenizer.from_dir(chat_checkpoint)
    for split in ("train", "heldout"):
        for conv in conversations(40, seed=5, split=split, tool_fraction=1.0):
            text = render_chat(tok, conv["messages"], conv["tools"])
            reply = text.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
            _, calls = parse_tool_calls(reply)
            assert calls[0]["function"]["name"] == conv["expected"]["name"]
            assert json.loads(calls[0]["function"]["arguments"]) == conv["expected"]["arguments"]
            assert conv["expected"]["name"] in text.split("<|im_start|>user")[0]  # listed in the system turn


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="split"):
        conversations(1, seed=0, split="test")


def test_calculator_answers_are_right():
    assert eval_expression("2 + 3 * 4") == 14


def test_longer_conversations_call_other_listed_tools():
    """`exchanges` > 1: later requests in the same conversation call other tools from its list."""
    assert all(sum(m["role"] == "user" for m in c["messages"]) == 1 for c in conversations(100, seed=6))
    convs = conversations(300, seed=6, tool_fraction=0.7, exchanges=3, variety=Variety(0.4))
    turns = [sum(m["role"] == "user" for m in c["messages"]) for c in convs]
    assert max(turns) == 3 and 0.3 < sum(t > 1 for t in turns) / len(turns) < 0.9
    later_calls = 0
    for conv in convs:
        msgs = conv["messages"]
        assert msgs[0]["role"] in ("user", "system") and all(m["role"] != "system" for m in msgs[1:])
        listed = {t["function"]["name"] for t in conv.get("tools", [])}
        called = [(i, m["tool_calls"][0]["function"]) for i, m in enumerate(msgs) if m.get("tool_calls")]
        if "expected" in conv:
            assert called[0][1]["name"] == conv["expected"]["name"]
        assert len({f["name"] for _, f in called}) == len(called)  # each listed tool called at most once
        for i, fn in called[1:]:
            later_calls += 1
            assert fn["name"] in listed and msgs[i - 1]["role"] == "user"
            assert all(str(v) in msgs[i - 1]["content"] for v in json.loads(fn["arguments"]).values())
            assert msgs[i + 1]["role"] == "tool" and msgs[i + 2]["role"] == "assistant"
    assert later_calls > 50


def test_made_up_words_from_a_vocabulary():
    """`words`: made-up subjects, verbs, parameter names and values are words of the corpus vocabulary
    (so the model learns to copy any word), never a held-out tool's word; the syllable default is unchanged."""
    from lfm2.train.synth import heldout_words, vocabulary

    docs = ["the quick brown fox jumps over the lazy humidity dog " * 10, "an ox ate a lantern " * 10]
    words = vocabulary(docs, min_count=10)
    assert "fox" in words and "lantern" in words and "ox" not in words  # 3-12 letters, seen 10 times
    assert "humidity" not in words and "humidity" in heldout_words()
    assert vocabulary(docs, min_count=11) == ("the",)  # 20 times
    pool = {"quick", "brown", "fox", "jumps", "over", "lazy", "dog", "ate", "lantern"}
    assert set(words) == pool | {"the"}
    convs = conversations(300, seed=0, split="train", tool_fraction=1.0, variety=Variety(0.4, words))
    assert convs != conversations(300, seed=0, split="train", tool_fraction=1.0, variety=Variety(0.4))
    names = [c["expected"]["name"] for c in convs]
    from_pool = [n for n in names if set(n.split("_")[1:]) <= set(words)]
    assert len(from_pool) > 60  # made-up subjects and objects: one or two vocabulary words
    assert any(len(n.split("_")) == 3 for n in from_pool)
    assert any(n.split("_")[0] in words for n in names)  # made-up verbs
    values = [v for c in convs for v in c["expected"]["arguments"].values() if isinstance(v, str)]
    assert sum(v.lower() in words for v in values) > 50
    params = {k for c in convs for k in c["expected"]["arguments"]}
    assert params & set(words)
    held = conversations(200, seed=1, split="heldout", tool_fraction=1.0, variety=Variety(0.4, words, True))
    assert held == conversations(200, seed=1, split="heldout", tool_fraction=1.0)  # held-out: no made-up words


def test_rich_wording_is_varied_and_never_held_out():
    """`rich_wording`: hundreds of request forms and a dozen phrases per argument kind in training, none
    of them a held-out phrasing (nor a held-out phrase's distinctive words); held-out and the
    tokenizer's plain conversations are unchanged by it."""
    for kind in ("lookup", "action"):
        rich, held = set(ASK["rich"][kind]), set(ASK["heldout"][kind])
        assert len(rich) > 300 and not rich & held
        assert not any(core in r for r in rich for core in ("find out", "curious", "give me", "Would you",
                                                              "Go ahead", "I'd like you"))
        assert not set(DESCRIBE["rich"][kind]) & set(DESCRIBE["heldout"][kind])
    for slot in SLOTS.values():
        added = set(slot.phrases["rich"]) - set(slot.phrases["train"])
        held_words = {p.split()[0] for p in slot.phrases["heldout"]}
        assert len(slot.phrases["rich"]) >= 8 and not added & set(slot.phrases["heldout"])
        assert not any(p.split()[0] in held_words for p in added), slot.kind
        assert all(p.count("{v}") == 1 for p in slot.phrases["rich"])
    rich = conversations(2000, seed=0, split="train", tool_fraction=1.0, variety=Variety(rich_wording=True))
    plain = conversations(2000, seed=0, split="train", tool_fraction=1.0)
    asks = {c["messages"][0]["content"] for c in rich}
    assert len(asks) > 1500 and asks != {c["messages"][0]["content"] for c in plain}
    for conv in rich[:300]:  # every argument value is still in the request, so it can be copied
        if "expected" in conv:
            assert all(str(v) in conv["messages"][0]["content"] for v in conv["expected"]["arguments"].values())
    held = conversations(100, seed=1, split="heldout", tool_fraction=1.0)
    assert conversations(100, seed=1, split="heldout", tool_fraction=1.0, variety=Variety(rich_wording=True)) == held


def test_noisy_requests_keep_their_content_and_nothing_else():
    """`noise`: that fraction of training requests is random words around the tool's subject (or verb
    and object) and the argument values, which are all still there to copy; the plain and rich
    conversations without noise, and the held-out split, are unchanged by the field."""
    words = ("lantern", "quietly", "mill", "ahead", "velvet", "ochre")
    demo = ("get_weather", "calculate", "convert_units")  # the README's tools keep their own wordings

    def framed(noise: float) -> tuple[float, list[dict]]:
        """The fraction of requests that open with a random word, and the conversations."""
        convs = conversations(400, seed=2, split="train", tool_fraction=1.0, variety=Variety(0.4, words, True, noise))
        convs = [c for c in convs if c["expected"]["name"] not in demo]
        return sum(c["messages"][0]["content"].split()[0].lower() in words for c in convs) / len(convs), convs

    assert framed(0.0)[0] < 0.05 and 0.4 < framed(0.5)[0] < 0.6 and framed(1.0)[0] == 1.0
    rich = conversations(400, seed=2, split="train", tool_fraction=1.0, variety=Variety(0.4, words, True))
    assert rich == conversations(400, seed=2, split="train", tool_fraction=1.0, variety=Variety(0.4, words, True, 0.0))
    for conv in framed(1.0)[1]:  # the subject and every value are still in the request
        ask, call = conv["messages"][0]["content"], conv["expected"]
        assert all(str(v) in ask for v in call["arguments"].values())
        assert call["name"].split("_", 1)[1].replace("_", " ") in ask
    noisiest = Variety(0.4, words, True, 1.0)
    held = conversations(100, seed=1, split="heldout", tool_fraction=1.0)
    assert conversations(100, seed=1, split="heldout", tool_fraction=1.0, variety=noisiest) == held


def test_confusable_distractors_differ_from_the_right_tool_only_in_subject():
    """`confusable`: distractors with the right tool's verb and kinds of arguments, so the subject or
    object is the only way to choose (random distractors also differ in verb and arguments)."""
    def shape(tool: dict) -> tuple[str, list[str]]:
        """The verb, and the kinds of arguments (each kind's parameters share a description)."""
        fn = tool["function"]
        return fn["name"].split("_")[0], sorted(p["description"] for p in fn["parameters"]["properties"].values())

    def alike(confusable: float) -> float:
        """The fraction of distractors shaped like the right tool (the demo calculator and converter aside)."""
        variety = Variety(0.4, None, True, 0.0, confusable)
        convs = conversations(300, seed=4, split="train", tool_fraction=1.0, variety=variety)
        pairs = [(t, next(r for r in c["tools"] if r["function"]["name"] == c["expected"]["name"]))
                 for c in convs if c["expected"]["name"] not in ("calculate", "convert_units")
                 for t in c["tools"] if t["function"]["name"] != c["expected"]["name"]]
        return sum(shape(t) == shape(right) for t, right in pairs) / len(pairs)

    assert alike(0.0) < 0.2 and alike(1.0) == 1.0


def test_prefixed_requests_keep_the_request_behind_random_words():
    """`prefix`: that fraction of training tool requests is the request as it was, behind one to three
    random words and a joiner, so that the first word is not the tool's verb; the held-out split, and
    conversations without the field, are unchanged."""
    words = ("lantern", "quietly", "mill", "ahead", "velvet", "ochre")
    demo = ("get_weather", "calculate", "convert_units")
    base = Variety(0.4, words, True)
    plain = [c for c in conversations(400, seed=3, split="train", tool_fraction=1.0, variety=base)
             if c["expected"]["name"] not in demo]
    assert sum(c["messages"][0]["content"].split()[0].lower() in words for c in plain) / len(plain) < 0.05
    every = Variety(0.4, words, True, prefix=1.0)
    convs = [c for c in conversations(400, seed=3, split="train", tool_fraction=1.0, variety=every)
             if c["expected"]["name"] not in demo]
    for conv in convs:
        ask, call = conv["messages"][0]["content"], conv["expected"]
        head = ask.split()[0].strip(",:!").lower()
        assert head in words and ask[0].isupper(), ask
        assert all(str(v) in ask for v in call["arguments"].values())
    assert len({c["messages"][0]["content"].split()[0] for c in convs}) > 6  # one to three words, several joiners
    held = conversations(100, seed=1, split="heldout", tool_fraction=1.0)
    assert conversations(100, seed=1, split="heldout", tool_fraction=1.0, variety=every) == held
    assert conversations(50, seed=3, split="train", variety=base) == conversations(
        50, seed=3, split="train", variety=Variety(0.4, words, True, prefix=0.0))


def test_tools_sets_how_many_tools_a_training_conversation_lists():
    """`tools=(fewest, most)`: every training tool conversation lists that many tools, the most of them
    at times; the default is the lists of before, the held-out split ignores it, and a range that
    cannot be met is refused."""
    words = ("lantern", "quietly", "mill", "ahead", "velvet", "ochre", "granite", "meadow", "copper")
    counts = [len(c["tools"]) for c in conversations(300, seed=4, split="train", tool_fraction=1.0,
                                                      variety=Variety(0.4, words, True, tools=(2, 5)))]
    assert min(counts) == 2 and max(counts) == 5
    default = [len(c["tools"]) for c in conversations(300, seed=4, split="train", tool_fraction=1.0,
                                                       variety=Variety(0.4, words, True))]
    assert min(default) == 1 and max(default) == 4
    assert conversations(50, seed=4, split="train", variety=Variety(0.4, words, True)) == conversations(
        50, seed=4, split="train", variety=Variety(0.4, words, True, tools=(1, 4)))
    held = conversations(100, seed=1, split="heldout", tool_fraction=1.0)
    assert conversations(100, seed=1, split="heldout", tool_fraction=1.0, variety=Variety(tools=(3, 5))) == held
    for bad in ((0, 3), (3, 2)):
        with pytest.raises(ValueError, match="fewest"):
            Variety(tools=bad)
