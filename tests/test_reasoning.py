"""Reasoning models: the `<think>` block split from the answer in every path, and the thinking budget.

Text-level tests feed scripted replies to the parsers split at every pair of points, against the
whole-text functions (written apart from the streaming ones) and against expected values. Model-level
tests use a random LFM2.5-style checkpoint whose tokenizer has `<think>` / `</think>` tokens; a forward
hook forces the tokens a test needs, chosen from the tokens the model has been fed so far (so forced
tokens from the budget or a tool choice are seen and answered, as a real model would).
"""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch

import lfm2
from lfm2.chat_template import DEFAULT_CHAT_TEMPLATE
from lfm2.errors import GenerationError
from lfm2.reasoning import (
    THINK_END,
    THINK_START,
    AfterReasoning,
    ReasoningStreamParser,
    ReplyParser,
    parse_reply,
    reasoning_tags,
    split_reasoning,
)
from tests.conftest import CORPUS, reference_file, tiny_config, write_checkpoint

START, END = "<|tool_call_start|>", "<|tool_call_end|>"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
USER = [{"role": "user", "content": "What is 2 + 2?"}]


# -- text: the split, whole and streamed ----------------------------------------------------------------

# (reply, started, tools given, expected reasoning, content, calls' names)
REPLIES = [
    ("<think>\nTwo and two.\n</think>\n\nIt is 4.", False, False, "Two and two.", "It is 4.", []),
    ("  <think>a</think> <think> b </think>\nc", False, False, "a\nb", "c", []),
    ("<think>cut off by the limit  ", False, False, "cut off by the limit", "", []),
    ("<think></think>Answer", False, False, None, "Answer", []),
    ("Plain <think>not a thought</think> text", False, False, None, "Plain <think>not a thought</think> text", []),
    ("</think>stray", False, False, None, "</think>stray", []),
    ("<thin", False, False, None, "<thin", []),
    ("\n\nHello", False, False, None, "\n\nHello", []),
    ("Thought the template opened.</think>Answer.", True, False, "Thought the template opened.", "Answer.", []),
    ("\nstill thinking </thi", True, False, "still thinking </thi", "", []),
    (f"<think>call {START}[f(x=1)]{END}? no.</think>\n{START}[get_weather(city='Oslo')]{END}Done.", False, True,
     f"call {START}[f(x=1)]{END}? no.", "Done.", ["get_weather"]),
    (f"<think>plan</think>\n\nLet me look.{START}[get_weather(city='Rome')]{END}", False, True, "plan",
     "Let me look.", ["get_weather"]),
    (f"{START}[get_weather(city='Paris')]{END} <think>late</think>", False, True, None,
     "<think>late</think>", ["get_weather"]),
    (f"<think>no tools offered: {START}[f()]{END}</think>{START}[g()]{END}", False, False,
     f"no tools offered: {START}[f()]{END}", f"{START}[g()]{END}", []),
]


def _run(parser, pieces: list[str]) -> tuple[str | None, str, list[str]]:
    events = [e for piece in pieces for e in parser.feed(piece)] + parser.finish()
    kinds = [k for k, _ in events]
    # The thought comes first, whole: no reasoning event after an answer event.
    if "reasoning" in kinds:
        assert max(i for i, k in enumerate(kinds) if k == "reasoning") < min(
            (i for i, k in enumerate(kinds) if k != "reasoning"), default=len(kinds))
    reasoning = "".join(v for k, v in events if k == "reasoning") or None
    content = "".join(v for k, v in events if k == "content")
    calls = [c["function"]["name"] for k, v in events if k == "tool_calls" for c in v]
    return reasoning, content, calls


@pytest.mark.parametrize("text, started, with_tools, reasoning, content, calls", REPLIES)
def test_the_split_is_the_same_at_every_pair_of_split_points(text, started, with_tools, reasoning, content, calls):
    tools = [WEATHER] if with_tools else None
    whole = parse_reply(text, tools, reasoning=True, started=started)
    assert (whole[0], whole[1], [c["function"]["name"] for c in whole[2]]) == (reasoning, content, calls)
    if not with_tools:
        assert split_reasoning(text, started) == (reasoning, content)
    expected = (reasoning, content, calls)
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            got = _run(ReplyParser(tools, reasoning=True, started=started), [text[:i], text[i:j], text[j:]])
            assert got == expected, (i, j)
            if not with_tools:
                thought = ReasoningStreamParser(started)
                evs = thought.feed(text[:i]) + thought.feed(text[i:j]) + thought.feed(text[j:]) + thought.finish()
                assert ("".join(v for k, v in evs if k == "reasoning") or None,
                        "".join(v for k, v in evs if k == "content")) == (reasoning, content), (i, j)
    assert _run(ReplyParser(tools, reasoning=True, started=started), list(text)) == expected


def test_pieces_are_released_as_soon_as_they_are_certain():
    parser = ReplyParser(reasoning=True)
    assert parser.feed("<thi") == []  # could still open a block
    assert parser.feed("nk>Hmm") == [("reasoning", "Hmm")]
    assert parser.feed(", so  ") == [("reasoning", ", so")]  # trailing space held: the block may close next
    assert parser.feed("4.</th") == [("reasoning", "  4.")]
    assert parser.feed("ink>\n\n") == []  # whitespace after the block is dropped, not shown
    assert parser.feed("Four.") == [("content", "Four.")]
    assert parser.finish() == []


def test_without_reasoning_the_text_is_content():
    text = "<think>x</think>y"
    assert parse_reply(text) == (None, text, [])
    assert _run(ReplyParser(), [text[:3], text[3:]]) == (None, text, [])


# -- which models think ---------------------------------------------------------------------------------


def _add_think_tokens(path: Path) -> None:
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.add_tokens([AddedToken(THINK_START, normalized=False), AddedToken(THINK_END, normalized=False)])
    tok.save(str(path / "tokenizer.json"))


def make_checkpoint(path: Path, template: str | None = None, think_tokens: bool = True, seed: int = 3) -> Path:
    """A random LFM2.5-style checkpoint: byte-level BPE trained here, `<think>`/`</think>` added tokens,
    untied head (so that greedy output depends on the context), and `template` as chat_template.jinja."""
    from lfm2.tokenizer import Tokenizer
    from lfm2.train.tokenizer import train_tokenizer

    train_tokenizer(CORPUS, vocab_size=600, out_dir=path)
    if think_tokens:
        _add_think_tokens(path)
    if template is not None:
        (path / "chat_template.jinja").write_text(template, encoding="utf-8")
    vocab = Tokenizer.from_dir(path).vocab_size
    return write_checkpoint(path, tiny_config(vocab_size=vocab, tie_word_embeddings=False,
                                              max_position_embeddings=512), seed=seed)


@pytest.fixture(scope="module")
def think_dir(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("think"))


@pytest.fixture(scope="module")
def llm(think_dir):
    return lfm2.load(think_dir)


# A template that opens the block in the generation prompt, as DeepSeek-R1's does.
OPENING_TEMPLATE = DEFAULT_CHAT_TEMPLATE.replace('{{- "<|im_start|>assistant\\n" -}}',
                                                 '{{- "<|im_start|>assistant\\n<think>\\n" -}}')


@pytest.fixture(scope="module")
def opening_dir(tmp_path_factory) -> Path:
    assert OPENING_TEMPLATE != DEFAULT_CHAT_TEMPLATE
    return make_checkpoint(tmp_path_factory.mktemp("opening"), OPENING_TEMPLATE)


def test_which_models_have_their_replies_split(llm, chat_checkpoint, tmp_path):
    tok = llm.tokenizer
    tags = reasoning_tags(tok)
    assert tags is not None
    assert (tags.start_id, tags.end_id) == (tok.token_to_id(THINK_START), tok.token_to_id(THINK_END))
    assert tok.encode("\n") == [next(iter(tok.encode("\n")))] and tok.encode("\n")[0] in tags.whitespace
    assert tags.start_id not in tags.whitespace and tok.encode("a")[0] not in tags.whitespace
    assert reasoning_tags(tok, False) is None
    plain = lfm2.load(chat_checkpoint)  # the same template, no think tokens: an LFM2 model
    assert reasoning_tags(plain.tokenizer) is None
    with pytest.raises(GenerationError, match="has no <think> and </think> tokens"):
        reasoning_tags(plain.tokenizer, True)
    with pytest.raises(GenerationError, match="reasoning='yes'"):
        reasoning_tags(tok, "yes")
    # Think tokens, but a template that never mentions them (LFM2's): not split unless asked.
    unaware = shutil.copytree(llm.path, tmp_path / "unaware")
    (unaware / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", encoding="utf-8")
    unaware_tok = lfm2.load(unaware).tokenizer
    assert reasoning_tags(unaware_tok) is None and reasoning_tags(unaware_tok, True) is not None


# -- a model whose replies are scripted -----------------------------------------------------------------


class Scripted:
    """Force the model's next token to `policy(tok, generated)`, where `generated` holds the tokens the
    row has been fed since its prompt: forced tokens (budget, tool choice) count as the model's own.

    Rows are followed by position (a test's rows finish together), one list per prefill.
    """

    def __init__(self, llm, policy) -> None:
        self.tok, self.policy = llm.tokenizer, policy
        self.rows: list[list[int]] = []
        self.prompts: list[str] = []
        self.cache, self.cache_bytes = llm.prefix_cache, llm.prefix_cache.max_bytes
        llm.prefix_cache.max_bytes = 0  # every generation starts with a prefill the hooks see
        self.handles = [llm.model.register_forward_pre_hook(self.pre),
                        llm.model.lm_head.register_forward_hook(self.post)]

    def pre(self, module, args):
        ids, cache = args[0], args[1]
        self.scoring = ids.shape[1] > 1 and cache.length > 0  # strict tool calls scoring names
        if self.scoring:
            return
        if ids.shape[1] > 1 or cache.length == 0:  # a prefill: a new row
            self.prompts.append(self.tok.decode(ids[0].tolist()))
            self.rows.append([])
            self.active = [len(self.rows) - 1]
        else:
            self.active = list(range(len(self.rows) - ids.shape[0], len(self.rows)))
            for r, token in zip(self.active, ids[:, -1].tolist(), strict=True):
                self.rows[r].append(token)

    def post(self, module, args, out):
        if self.scoring:
            return out
        out = out.clone()
        for b, r in enumerate(self.active):
            out[b, ..., self.policy(self.tok, self.rows[r])] = 1e4
        return out

    def close(self) -> None:
        self.cache.max_bytes = self.cache_bytes
        for h in self.handles:
            h.remove()

    def __enter__(self) -> Scripted:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def reply(text: str):
    """A policy: `text`, then the end of the turn."""

    def policy(tok, generated):
        ids = tok.encode(text) + [tok.token_to_id("<|im_end|>")]
        return ids[min(len(generated), len(ids) - 1)]

    return policy


def thinker(thought: str = " more", answer: str = "The answer is 4.", opens: bool = True):
    """A policy that thinks forever (`thought` over and over) until it has been fed `</think>`, then
    writes `answer`: only a budget ends its thought."""

    def policy(tok, generated):
        end = tok.token_to_id(THINK_END)
        if end in generated:
            ids = tok.encode(answer) + [tok.token_to_id("<|im_end|>")]
            return ids[min(len(generated) - generated.index(end) - 1, len(ids) - 1)]
        if opens and not generated:
            return tok.token_to_id(THINK_START)
        ids = tok.encode(thought)
        return ids[(len(generated) - opens) % len(ids)]

    return policy


# -- LLM.chat and chat_stream ---------------------------------------------------------------------------


def test_chat_splits_the_thought_from_the_answer(llm):
    text = "<think>\nTwo and two make four.\n</think>\n\nIt is 4."
    with Scripted(llm, reply(text)):
        whole = llm.chat(USER, temperature=0)
        deltas = list(llm.chat_stream(USER, temperature=0))
        raw = llm.chat(USER, temperature=0, reasoning=False)
    assert whole == {"role": "assistant", "content": "It is 4.", "reasoning_content": "Two and two make four."}
    keys = [next(iter(d)) for d in deltas]
    assert keys == sorted(keys, key=lambda k: k != "reasoning_content")  # the thought first
    assert "".join(d.get("reasoning_content", "") for d in deltas) == whole["reasoning_content"]
    assert "".join(d.get("content", "") for d in deltas) == whole["content"]
    assert raw == {"role": "assistant", "content": text}


def test_a_model_that_does_not_think_keeps_its_think_text(chat_checkpoint):
    plain = lfm2.load(chat_checkpoint)
    text = "<think>looks like a thought</think>but it is the answer"
    with Scripted(plain, reply(text)):
        assert plain.chat(USER) == {"role": "assistant", "content": text}
        assert "".join(d["content"] for d in plain.chat_stream(USER)) == text


def test_the_thought_is_free_and_the_answer_is_constrained(llm):
    """No tools offered: call markers are masked in the answer (NoToolCalls), not in the thought, where
    they are text; a call written in the thought is never parsed as one."""
    text = f"<think>maybe {START}[get_weather(city='Oslo')]{END}</think>{START}[get_weather(city='Oslo')]{END}"
    with Scripted(llm, reply(text)):
        out = llm.chat(USER, temperature=0, max_new_tokens=40)
    assert out["reasoning_content"] == f"maybe {START}[get_weather(city='Oslo')]{END}"
    assert START not in out["content"] and END not in out["content"] and "tool_calls" not in out
    with Scripted(llm, reply(text)):
        out = llm.chat(USER, tools=[WEATHER], temperature=0)
    assert out["reasoning_content"].startswith("maybe") and out["content"] == ""
    assert [json.loads(c["function"]["arguments"]) for c in out["tool_calls"]] == [{"city": "Oslo"}]


def _fed(s: Scripted, tok, row: int = 0) -> tuple[list[int], list[int], list[int]]:
    """A row's generated tokens as (opening, thought, after `</think>`)."""
    got = s.rows[row]
    end = got.index(tok.token_to_id(THINK_END))
    opens = 1 if got[0] == tok.token_to_id(THINK_START) else 0
    return got[:opens], got[opens:end], got[end + 1:]


@pytest.mark.parametrize("budget", [1, 5])
def test_the_budget_closes_the_thought_and_the_model_answers(llm, budget):
    tok = llm.tokenizer
    with Scripted(llm, thinker()) as s:
        out = llm.chat(USER, temperature=0, max_new_tokens=40, max_reasoning_tokens=budget)
    opening, thought, after = _fed(s, tok)
    assert opening == [tok.token_to_id(THINK_START)] and len(thought) == budget
    assert out["content"] == "The answer is 4." and out["reasoning_content"] == tok.decode(thought).strip()
    assert llm.last_stats[0].finish_reason == "stop"
    # Without the budget the same model never answers.
    with Scripted(llm, thinker()):
        endless = llm.chat(USER, temperature=0, max_new_tokens=40)
    assert endless["content"] == "" and llm.last_stats[0].finish_reason == "length"


def test_the_budget_holds_for_each_choice_and_when_streamed(llm):
    tok = llm.tokenizer
    with Scripted(llm, thinker()) as s:
        outs = llm.chat(USER, n=2, temperature=0, max_new_tokens=30, max_reasoning_tokens=3)
    assert [o["content"] for o in outs] == ["The answer is 4."] * 2
    assert [len(_fed(s, tok, r)[1]) for r in range(2)] == [3, 3]
    with Scripted(llm, thinker()) as s:
        deltas = list(llm.chat_stream(USER, temperature=0, max_new_tokens=30, max_reasoning_tokens=4))
    assert len(_fed(s, tok)[1]) == 4
    assert "".join(d.get("content", "") for d in deltas) == "The answer is 4."


def test_the_budget_counts_from_a_block_the_template_opened(opening_dir):
    llm = lfm2.load(opening_dir)
    tok = llm.tokenizer
    with Scripted(llm, thinker(opens=False)) as s:
        out = llm.chat(USER, temperature=0, max_new_tokens=30, max_reasoning_tokens=6)
    assert s.prompts[0].endswith("<|im_start|>assistant\n<think>\n")
    opening, thought, _ = _fed(s, tok)
    assert opening == [] and len(thought) == 6
    assert out["content"] == "The answer is 4." and out["reasoning_content"] == tok.decode(thought).strip()


def test_bad_budgets_are_refused(llm, chat_checkpoint):
    for bad in (0, -3, 2.5, "10", True):
        with pytest.raises(GenerationError, match="must be a positive integer"):
            llm.chat(USER, max_reasoning_tokens=bad)
    with pytest.raises(GenerationError, match="no thinking block to limit"):
        lfm2.load(chat_checkpoint).chat(USER, max_reasoning_tokens=8)
    with pytest.raises(GenerationError, match="no thinking block to limit"):
        llm.chat(USER, max_reasoning_tokens=8, reasoning=False)


def test_a_forced_call_comes_after_the_thought(llm):
    """tool_choice names a function: a thinking model still thinks, then the call is forced; a model
    that does not open a block is forced into the call at once."""
    tok = llm.tokenizer
    choice = {"type": "function", "function": {"name": "get_weather"}}

    def answer_after_the_name(first: str):
        def policy(tok, generated):
            text = tok.decode(generated)
            if "get_weather(" in text:
                rest = tok.encode("city='Lima')]") + [tok.token_to_id(END), tok.token_to_id("<|im_end|>")]
                done = len(tok.encode(text[text.index("get_weather(") + len("get_weather("):])) if \
                    not text.endswith("get_weather(") else 0
                return rest[min(done, len(rest) - 1)]
            return reply(first)(tok, generated)
        return policy

    with Scripted(llm, answer_after_the_name("<think>The user wants weather.</think>I will just answer.")) as s:
        out = llm.chat(USER, tools=[WEATHER], tool_choice=choice, temperature=0, max_new_tokens=40)
    assert not s.prompts[0].endswith("get_weather(")  # not in the prompt: after the thought
    assert out["reasoning_content"] == "The user wants weather."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in out["tool_calls"]] == [
        ("get_weather", {"city": "Lima"})]
    assert out["content"] == ""
    with Scripted(llm, answer_after_the_name("I will just answer.")) as s:
        out = llm.chat(USER, tools=[WEATHER], tool_choice=choice, temperature=0, max_new_tokens=40)
    assert tok.decode(s.rows[0]).startswith(f"{START}[get_weather(")
    assert "reasoning_content" not in out and out["tool_calls"][0]["function"]["name"] == "get_weather"


def test_after_reasoning_delegates_to_the_inner_processor():
    class Inner:
        def __init__(self):
            self.seen, self.room = [], 0

        def fresh(self):
            return Inner()

        def mask(self):
            m = torch.zeros(10, dtype=torch.bool)
            m[7] = True
            return m

        def advance(self, token):
            self.seen.append(token)

        def look_ahead_room(self):
            return self.room

    from lfm2.reasoning import ThinkTags

    tags = ThinkTags(start_id=1, end_id=2, whitespace=frozenset({3}))
    p = AfterReasoning(Inner(), tags, 10, budget=2)
    assert p.mask().nonzero().flatten().tolist() == [1, 7]  # open a block, or what the inner allows
    for token in (3, 1):  # whitespace, then <think>
        p.advance(token)
    p.inner.room = 4
    assert p.mask() is None and p.look_ahead_room() == 0  # thinking: free, no look-ahead
    p.advance(5)
    p.advance(6)
    assert p.mask().nonzero().flatten().tolist() == [2]  # the budget is spent: </think>
    p.advance(2)
    assert p.answering and p.mask().nonzero().flatten().tolist() == [7] and p.look_ahead_room() == 4
    p.advance(7)
    assert p.inner.seen == [3, 7]  # the whitespace and the answer; never the thought
    q = p.fresh()
    assert q.phase == "start" and q.inner.seen == [] and q.budget == 2


def test_an_answer_constraint_applies_after_the_thought(llm, chat_checkpoint):
    """What structured output plugs in: a processor for the answer, wrapped for a thinking model only."""

    class Grammar:
        def fresh(self):
            return Grammar()

    plan = llm.chat_plan(USER, answer_constraint=Grammar())
    assert isinstance(plan.constraint, AfterReasoning) and isinstance(plan.constraint.inner, Grammar)
    assert plan.reasoning and not plan.started
    plain = lfm2.load(chat_checkpoint).chat_plan(USER, answer_constraint=Grammar())
    assert isinstance(plain.constraint, Grammar) and not plain.reasoning


# -- LFM2.5 checkpoints: configs, real templates --------------------------------------------------------


def test_an_lfm25_config_loads_and_matches_transformers(think_dir, tmp_path):
    """LFM2.5-1.2B's config.json layout (transformers 5: rope_parameters, layer_types, dtype, the block_*
    fields beside hidden_size) at tiny sizes: lfm2 reads the shapes transformers builds, same logits."""
    transformers = pytest.importorskip("transformers")
    path = shutil.copytree(think_dir, tmp_path / "lfm25")
    ours = json.loads((path / "config.json").read_text())
    layer_types = ours["layer_types"]
    config = {
        "architectures": ["Lfm2ForCausalLM"], "block_auto_adjust_ff_dim": False, "block_dim": 64,
        "block_ff_dim": ours["intermediate_size"], "block_ffn_dim_multiplier": 1.0, "block_multiple_of": 256,
        "block_norm_eps": 1e-05, "bos_token_id": 1, "conv_L_cache": 3, "conv_bias": False, "dtype": "float32",
        "eos_token_id": 7, "hidden_size": 64, "initializer_range": 0.02,
        "intermediate_size": ours["intermediate_size"], "layer_types": layer_types, "max_position_embeddings": 512,
        "model_type": "lfm2", "norm_eps": 1e-05, "num_attention_heads": 4, "num_heads": 4,
        "num_hidden_layers": len(layer_types), "num_key_value_heads": 2, "pad_token_id": 0,
        "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"}, "tie_embedding": False,
        "tie_word_embeddings": False, "use_cache": True, "use_pos_enc": True, "vocab_size": ours["vocab_size"],
    }
    (path / "config.json").write_text(json.dumps(config))
    llm = lfm2.load(path)
    ids = llm.chat_prompt(USER, None, None)[0]
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits
        got = llm.model(torch.tensor([ids]), llm.model.make_cache(1, len(ids)))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def real_templates(think_dir, tmp_path_factory):
    """The think checkpoint with each real LFM2.5 template (skips where ../shared/reference is absent)."""
    out = {}
    for name in ("LFM2.5-8B-A1B.jinja", "LFM2.5-Instruct.jinja"):
        source = reference_file("chat_templates", name).read_text(encoding="utf-8")
        path = shutil.copytree(think_dir, tmp_path_factory.mktemp(name.split(".jinja")[0]), dirs_exist_ok=True)
        (path / "chat_template.jinja").write_text(source, encoding="utf-8")
        out[name] = lfm2.load(path)
    return out


@pytest.mark.reference
@pytest.mark.parametrize("name", ["LFM2.5-8B-A1B.jinja", "LFM2.5-Instruct.jinja"])
def test_real_templates_decide_which_thoughts_are_kept(real_templates, name):
    """A reply's thought goes back to the template as `reasoning_content`; each real template decides:
    LFM2.5-8B-A1B renders the thought of the turns after the last user message (a tool round) and
    drops older ones; LFM2.5-Instruct reads thoughts from `content` only, so a split one is dropped."""
    llm = real_templates[name]
    assert llm.tokenizer.chat_template is not None and reasoning_tags(llm.tokenizer) is not None
    call = f"{START}[get_weather(city='Oslo')]{END}"
    script = [f"<think>first secret</think>{call}", "<think>second secret</think>It is sunny.",
              "<think>third</think>Bye."]
    turn = iter(script)
    convo = [{"role": "user", "content": "Weather in Oslo?"}]
    prompts = []
    for _ in range(3):
        text = next(turn)
        with Scripted(llm, reply(text)) as s:
            out = llm.chat(convo, tools=[WEATHER], temperature=0, max_new_tokens=40)
        prompts.append(s.prompts[0])
        convo.append(out)
        if out.get("tool_calls"):
            convo.append({"role": "tool", "tool_call_id": out["tool_calls"][0]["id"], "content": "sunny"})
        else:
            convo.append({"role": "user", "content": "Thanks"})
    assert convo[1]["reasoning_content"] == "first secret" and convo[1]["tool_calls"]
    assert convo[3] == {"role": "assistant", "content": "It is sunny.", "reasoning_content": "second secret"}
    tool_round, next_question = prompts[1], prompts[2]
    if name == "LFM2.5-8B-A1B.jinja":
        assert "<think>first secret</think>" in tool_round  # the current exchange keeps its thought
    else:
        assert "first secret" not in tool_round
    assert "first secret" not in next_question and "second secret" not in next_question
    assert "It is sunny." in next_question


# -- the server -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live(llm):
    from tests.test_server import Live

    server = Live(llm, max_batch=4, max_queue=4)
    yield server
    server.close()


def test_server_returns_reasoning_content(live, llm):
    from tests.test_server import MODEL

    text = f"<think>\nThe user wants Oslo.\n</think>\n\nChecking.{START}[get_weather(city='Oslo')]{END}"
    with Scripted(llm, reply(text)):
        whole = live.client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER], temperature=0)
        stream = live.client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER], temperature=0,
                                                     stream=True, logprobs=True)
        chunks = list(stream)
    choice = whole.choices[0]
    assert choice.message.reasoning_content == "The user wants Oslo." and choice.message.content == "Checking."
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls[0].function.name == "get_weather"
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    thought = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    assert thought == "The user wants Oslo."
    assert "".join(d.content or "" for d in deltas) == "Checking."
    assert [t.function.name for d in deltas for t in d.tool_calls or []] == ["get_weather"]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    first_answer = next(i for i, d in enumerate(deltas) if d.content or d.tool_calls)
    assert all(not getattr(d, "reasoning_content", None) for d in deltas[first_answer:])
    # Every generated token's logprob, the thought's included, rides on some delta.
    entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert len(entries) == whole.usage.completion_tokens - 1  # all but the stop token, as without reasoning
    assert "".join(e.token for e in entries).startswith(THINK_START)


def test_server_budget_and_reasoning_format(live, llm):
    import openai

    from tests.test_server import MODEL

    tok = llm.tokenizer
    with Scripted(llm, thinker()) as s:
        out = live.client.chat.completions.create(model=MODEL, messages=USER, temperature=0, max_tokens=40,
                                                  extra_body={"max_reasoning_tokens": 7})
    assert len(_fed(s, tok)[1]) == 7 and out.choices[0].message.content == "The answer is 4."
    assert out.choices[0].message.reasoning_content == tok.decode(_fed(s, tok)[1]).strip()
    with Scripted(llm, thinker()) as s:
        chunks = list(live.client.chat.completions.create(model=MODEL, messages=USER, temperature=0, max_tokens=40,
                                                          stream=True, extra_body={"max_reasoning_tokens": 2}))
    assert len(_fed(s, tok)[1]) == 2
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "The answer is 4."
    text = "<think>hidden?</think>No."
    with Scripted(llm, reply(text)):
        raw = live.client.chat.completions.create(model=MODEL, messages=USER, extra_body={"reasoning_format": "none"})
    assert raw.choices[0].message.content == text and getattr(raw.choices[0].message, "reasoning_content", None) is None
    for body, words in [({"max_reasoning_tokens": 0}, "greater than or equal to 1"),
                        ({"max_reasoning_tokens": "9"}, "max_reasoning_tokens"),
                        ({"max_reasoning_tokens": 9, "reasoning_format": "none"}, "no thinking block to limit"),
                        ({"reasoning_format": "sometimes"}, "reasoning_format")]:
        with pytest.raises(openai.BadRequestError) as err:
            live.client.chat.completions.create(model=MODEL, messages=USER, extra_body=body)
        assert words in str(err.value) and err.value.body["param"] == next(iter(body)), err.value.body


def test_server_passes_reasoning_back_to_the_template(live, llm):
    from tests.test_server import MODEL

    messages = [*USER, {"role": "assistant", "content": None, "reasoning_content": "I need the weather.",
                        "tool_calls": [{"id": "c1", "type": "function",
                                        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    with Scripted(llm, reply("Sunny.")) as s:
        out = live.client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER])
    assert out.choices[0].message.content == "Sunny."
    # lfm2's template (like LFM2.5's) renders the thought of the turns after the last user message.
    assert "<think>I need the weather.</think>" in s.prompts[0]


# -- the CLI --------------------------------------------------------------------------------------------


def _chat_cli(monkeypatch, capsys, llm, policy, *flags: str, lines: tuple[str, ...] = ()) -> str:
    from lfm2 import cli

    lines = iter(["What is 2 + 2?", *lines, "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    monkeypatch.setattr(lfm2, "load", lambda *a, **kw: llm)
    with Scripted(llm, policy):
        cli.main(["chat", "--temperature", "0", "--max-new-tokens", "40", *flags])
    return capsys.readouterr().out


def test_cli_chat_labels_or_hides_the_thought(monkeypatch, capsys, llm):
    text = "<think>Two and two.</think>\n\nIt is 4."
    shown = _chat_cli(monkeypatch, capsys, llm, reply(text))
    assert "Thinking: Two and two.\nIt is 4.\n" in shown and "\x1b[" not in shown  # not a terminal: no escapes
    hidden = _chat_cli(monkeypatch, capsys, llm, reply(text), "--hide-reasoning")
    assert "It is 4.\n" in hidden and "Two and two" not in hidden and "Thinking" not in hidden
    expanded = _chat_cli(monkeypatch, capsys, llm, reply(text), "--hide-reasoning", lines=("/thought", "/hide"))
    assert expanded.count("Thinking: Two and two.\n") == 1 and "[thoughts shown]" in expanded
    budget = 3 * len(llm.tokenizer.encode(" hmm"))  # three of them
    capped = _chat_cli(monkeypatch, capsys, llm, thinker(thought=" hmm"), "--max-reasoning-tokens", str(budget))
    assert "Thinking: hmm hmm hmm\nThe answer is 4.\n" in capped
    from lfm2 import cli

    for flags, want in [((), "Thinking: Two and two.\nIt is 4.\n"), (("--hide-reasoning",), "It is 4.\n")]:
        with Scripted(llm, reply(text)):
            cli.main(["generate", "--chat", "--temperature", "0", *flags, "What is 2 + 2?"])
        assert capsys.readouterr().out == want


def test_cli_rejects_a_bad_budget(chat_checkpoint):
    import subprocess

    out = subprocess.run([sys.executable, "-m", "lfm2", "generate", "--chat", "--model", str(chat_checkpoint),
                          "--max-reasoning-tokens", "4", "hi"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.startswith("lfm2: error: max_reasoning_tokens=4")
    assert len(out.stderr.strip().splitlines()) == 1
    out = subprocess.run([sys.executable, "-m", "lfm2", "generate", "--model", str(chat_checkpoint),
                          "--max-reasoning-tokens", "4", "hi"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--max-reasoning-tokens needs --chat" in out.stderr


def test_cli_in_a_terminal_dims_the_thought(opening_dir):
    """A real `lfm2 chat` in a pseudo-terminal, on a random model whose template opens the block: with
    a budget of 3 the thought is the model's first 3 tokens, shown dimmed, then its answer; the same
    greedy reply as `LLM.chat` gives. --hide-reasoning leaves the thought out."""
    pexpect = pytest.importorskip("pexpect")
    llm = lfm2.load(opening_dir)
    want = llm.chat(USER, temperature=0, max_new_tokens=12, max_reasoning_tokens=3)
    assert want["reasoning_content"] and want["content"].strip(), want  # the fixture must think and answer
    outputs = {}
    for hide in (False, True):
        args = ["-m", "lfm2", "chat", "--model", str(opening_dir), "--temperature", "0", "--max-new-tokens", "12",
                "--max-reasoning-tokens", "3", "--verbose"] + (["--hide-reasoning"] if hide else [])
        child = pexpect.spawn(sys.executable, args, encoding="utf-8", timeout=60)
        child.expect("> ")
        child.sendline(USER[0]["content"])
        child.expect(r"\[\d+ prompt tokens")
        outputs[hide] = child.before
        child.sendline("/exit")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
    shown, hidden = outputs[False], outputs[True]
    assert "\x1b[2m" + want["reasoning_content"] in shown.replace("\r\n", "\n")
    assert want["content"].strip() in shown and want["content"].strip() in hidden
    assert want["reasoning_content"] not in hidden.replace("\x1b[K", "").split("[thinking...]")[-1]


def test_warnings_are_not_raised_by_clean_replies():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert parse_reply(f"<think>{START}unclosed in the thought</think>ok", [WEATHER], reasoning=True)[1] == "ok"
