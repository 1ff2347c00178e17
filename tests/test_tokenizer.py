"""Tokenizer training, loading, encode/decode parity with transformers, and streaming detokenization.

A small byte-level BPE is trained once per session with `lfm2.train.tokenizer.train_tokenizer`, so
no checkpoint download is needed; transformers' `AutoTokenizer` on the same folder is the reference.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer

from lfm2.bpe import SPLIT_PATTERN
from lfm2.errors import TokenizerError
from lfm2.tokenizer import IncrementalDetokenizer, Tokenizer
from lfm2.train.tokenizer import SPECIAL_TOKENS, train_tokenizer

VOCAB_SIZE = 1000

SUBJECTS = ["The cat", "A small dog", "My friend", "The old teacher", "Our team", "This model"]
VERBS = ["reads", "writes", "finds", "likes", "sees", "builds"]
OBJECTS = ["a book", "the answer", "many tokens", "a long story", "the red house", "42 apples"]
MULTILINGUAL = [
    "你好，世界！今天天气很好。",
    "我们正在测试一个小的分词器。",
    "مرحبا بالعالم، كيف حالك اليوم؟",
    "هذا اختبار صغير للمحلل.",
    "Grüße aus München, schöne Straße.",
    "Привет, мир! Как дела?",
    "こんにちは、世界。テストです。",
    "Ça va très bien, merci beaucoup.",
    "Emoji time 🎉🚀 and more 😀",
    "def add(x, y):\n    return x + y\n",
]
MIXED_TEXT = "Hello 你好 مرحبا Grüße 🎉 Привет!\n  def f(x): return x*2  # ok<|im_end|>"


def corpus() -> list[str]:
    """A few hundred sentences: fixed English ones, made-up words (to fill the vocabulary), and
    multilingual lines."""
    rng = random.Random(0)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sha", "ti", "vo", "zen", "qua", "bri", "dol", "fex", "gu"]
    made_up = [
        " ".join("".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(rng.randint(4, 10))) + "."
        for _ in range(300)
    ]
    sentences = [f"{s} {v} {o}." for s in SUBJECTS for v in VERBS for o in OBJECTS]
    return sentences + made_up + MULTILINGUAL * 10


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tokenizer(corpus(), VOCAB_SIZE, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def tok(tok_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(tok_dir)


@pytest.fixture(scope="session")
def hf_tok(tok_dir: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(tok_dir)


@pytest.fixture
def tmp_copy(tok_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the trained folder, for tests that edit or break its files."""
    dest = tmp_path / "tok"
    shutil.copytree(tok_dir, dest)
    return dest


# -- training -------------------------------------------------------------------------------------


def test_trained_files_follow_lfm2_layout(tok_dir: Path) -> None:
    assert sorted(p.name for p in tok_dir.iterdir()) == [
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]  # also: no temp files left behind by the atomic writes
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in tok_dir.iterdir())  # readable, not temp-file private
    spec = json.loads((tok_dir / "tokenizer.json").read_text())
    assert spec["model"]["type"] == "BPE" and spec["model"]["ignore_merges"] is True
    split, byte_level = spec["pre_tokenizer"]["pretokenizers"]
    assert split["type"] == "Split" and split["pattern"]["Regex"] == SPLIT_PATTERN
    assert split["behavior"] == "Isolated"
    assert byte_level == {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    assert spec["decoder"]["type"] == "ByteLevel"
    assert spec["post_processor"]["type"] == "TemplateProcessing"
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == (
        "<|startoftext|>",
        "<|im_end|>",
        "<|pad|>",
    )
    assert "<|im_start|>" in config["chat_template"]


def test_special_tokens_have_lfm2_ids(tok: Tokenizer) -> None:
    expected = {
        "<|pad|>": 0,
        "<|startoftext|>": 1,
        "<|endoftext|>": 2,
        "<|fim_pre|>": 3,
        "<|fim_mid|>": 4,
        "<|fim_suf|>": 5,
        "<|im_start|>": 6,
        "<|im_end|>": 7,
        "<|tool_list_start|>": 8,
        "<|tool_list_end|>": 9,
        "<|tool_call_start|>": 10,
        "<|tool_call_end|>": 11,
        "<|tool_response_start|>": 12,
        "<|tool_response_end|>": 13,
    }
    assert {t: tok.token_to_id(t) for t in SPECIAL_TOKENS} == expected
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 7, 0)
    assert (tok.bos_token, tok.eos_token) == ("<|startoftext|>", "<|im_end|>")
    assert tok.vocab_size == VOCAB_SIZE
    assert tok.stop_ids == {7, 2}


def test_words_alike_encodes_a_word_the_same_after_any_character(tmp_path: Path) -> None:
    """With `words_alike`, ` Vienna`, `"Vienna` and `_Vienna` share the word's tokens (a tiny model can
    copy a word from a request into a tool call), and the saved pipeline is still LFM2's alone."""
    rng = random.Random(0)
    words = ["Vienna", "weather", "rent", "price", "the", "city"]
    texts = [" ".join(rng.choice(words) for _ in range(12)) + ' get_rent_price(city="Vienna")' for _ in range(500)]

    def pieces(folder: Path, text: str) -> list[str]:
        return HFTokenizer.from_file(str(folder / "tokenizer.json")).encode(text, add_special_tokens=False).tokens

    plain = train_tokenizer(texts, 400, tmp_path / "plain")
    alike = train_tokenizer(texts, 400, tmp_path / "alike", words_alike=True)
    assert pieces(plain, " Vienna") == ["ĠVienna"]  # ordinary merges: another token than `Vienna`
    for prefix, byte in ((" ", "Ġ"), ('"', '"'), ("_", "_")):
        assert pieces(alike, prefix + "Vienna") == [byte, *pieces(alike, "Vienna")]
    saved = json.loads((alike / "tokenizer.json").read_text())["pre_tokenizer"]["pretokenizers"]
    assert [p["type"] for p in saved] == ["Split", "ByteLevel"] and saved[0]["pattern"]["Regex"] == SPLIT_PATTERN


def test_vocab_too_small_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="vocab_size must be at least 270"):
        train_tokenizer(["abc"], 100, tmp_path)


def test_ignore_merges_takes_a_known_pretoken_whole(tmp_copy: Path) -> None:
    # Add a vocabulary entry no merge can build: with ignore_merges it is still used for the
    # pre-token " zqxj"; without it, BPE would spell the word out from smaller pieces.
    spec = json.loads((tmp_copy / "tokenizer.json").read_text())
    spec["model"]["vocab"]["Ġzqxj"] = VOCAB_SIZE  # Ġ is byte-level BPE's space
    (tmp_copy / "tokenizer.json").write_text(json.dumps(spec))
    assert Tokenizer.from_dir(tmp_copy).encode(" zqxj") == [VOCAB_SIZE]
    spec["model"]["ignore_merges"] = False
    (tmp_copy / "tokenizer.json").write_text(json.dumps(spec))
    assert len(Tokenizer.from_dir(tmp_copy).encode(" zqxj")) > 1


# -- parity with transformers ---------------------------------------------------------------------


@pytest.mark.parametrize("text", [MIXED_TEXT, *MULTILINGUAL, "", " ", "   leading and trailing   ", "a\r\nb\n\n\nc"])
def test_encode_decode_match_transformers(tok: Tokenizer, hf_tok, text: str) -> None:
    ids = tok.encode(text)
    assert ids == hf_tok.encode(text, add_special_tokens=False)
    assert tok.encode(text, add_special_tokens=True) == hf_tok.encode(text, add_special_tokens=True)
    assert tok.decode(ids) == hf_tok.decode(ids) == text
    with_bos = tok.encode(text, add_special_tokens=True)
    assert tok.decode(with_bos, skip_special_tokens=True) == hf_tok.decode(with_bos, skip_special_tokens=True)


def test_special_tokens_match_transformers(tok: Tokenizer, hf_tok) -> None:
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id)
    assert len(hf_tok) == tok.vocab_size
    assert tok.encode("<|im_start|>user\nhi<|im_end|>")[:1] == [6]


def test_encode_adds_no_bos_by_default(tok: Tokenizer) -> None:
    assert tok.encode("hello")[0] != tok.bos_id
    assert tok.encode("hello", add_special_tokens=True)[0] == tok.bos_id


def test_chat_prompt_encodes_with_one_bos_like_transformers(tok: Tokenizer, hf_tok) -> None:
    messages = [{"role": "user", "content": "你好! What is 2+2?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    ids = tok.encode(prompt)
    assert ids == hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1


# -- loading and its errors -----------------------------------------------------------------------


def test_missing_folder_and_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="no folder"):
        Tokenizer.from_dir(tmp_path / "nope")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: file not found"):
        Tokenizer.from_dir(tmp_path)


def test_corrupt_tokenizer_json_is_reported(tmp_copy: Path) -> None:
    (tmp_copy / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: not a valid tokenizers file"):
        Tokenizer.from_dir(tmp_copy)


def test_corrupt_config_is_reported(tmp_copy: Path) -> None:
    (tmp_copy / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: expected a JSON object"):
        Tokenizer.from_dir(tmp_copy)


def test_unknown_special_token_is_reported(tmp_copy: Path) -> None:
    config = json.loads((tmp_copy / "tokenizer_config.json").read_text())
    config["eos_token"] = "<|no_such_token|>"
    (tmp_copy / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match=r"eos_token '<\|no_such_token\|>' is not in the vocabulary"):
        Tokenizer.from_dir(tmp_copy)


def test_bad_eos_token_id_is_reported(tmp_copy: Path) -> None:
    (tmp_copy / "generation_config.json").write_text(json.dumps({"eos_token_id": "seven"}))
    with pytest.raises(TokenizerError, match=r"generation_config\.json: field 'eos_token_id'.*'seven'"):
        Tokenizer.from_dir(tmp_copy)


def test_the_tokenizer_renders_tools_as_given_and_knows_no_callables(tok: Tokenizer) -> None:
    """Readying OpenAI-style tools and messages is the chat layer's (`lfm2.tools.render_chat`): the
    tokenizer takes JSON dicts, renders them as they are, and names the helper when given a callable."""
    from lfm2.tools import render_chat

    def get_time(city: str) -> str:
        """The time in a city.

        Args:
            city: Its name.
        """
        return "noon"

    messages = [{"role": "user", "content": "Time in Oslo?"}]
    tool = {"type": "function", "function": {"name": "f", "parameters": {}, "x-note": "kept"}}
    prompt = tok.apply_chat_template(messages, tools=[tool], add_generation_prompt=True)
    assert '"x-note": "kept"' in prompt and prompt == render_chat(tok, messages, [tool], add_generation_prompt=True)
    with pytest.raises(TokenizerError, match="render_chat"):
        tok.apply_chat_template(messages, tools=[get_time])
    assert '"name": "get_time"' in render_chat(tok, messages, [get_time])


def test_special_tokens_map_and_addedtoken_dicts(tmp_copy: Path) -> None:
    # Only special_tokens_map.json names the tokens, one as an AddedToken dict.
    (tmp_copy / "tokenizer_config.json").unlink()
    special = {"bos_token": {"content": "<|startoftext|>", "lstrip": False}, "eos_token": "<|endoftext|>"}
    (tmp_copy / "special_tokens_map.json").write_text(json.dumps(special))
    tok = Tokenizer.from_dir(tmp_copy)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, None)
    assert tok.chat_template is None  # falls back to lfm2's default template
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]).startswith("<|startoftext|><|im_start|>user")


def test_stop_ids_include_generation_config_eos(tmp_copy: Path) -> None:
    (tmp_copy / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 5]}))
    (tmp_copy / "config.json").write_text(json.dumps({"eos_token_id": 3}))
    assert Tokenizer.from_dir(tmp_copy).stop_ids == {2, 3, 5, 7}


def test_chat_template_jinja_file_wins(tmp_copy: Path) -> None:
    (tmp_copy / "chat_template.jinja").write_text("{{ bos_token }}{% for m in messages %}[{{ m.content }}]{% endfor %}")
    tok = Tokenizer.from_dir(tmp_copy)
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert tok.apply_chat_template(messages) == "<|startoftext|>[a][b]"
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(tmp_copy)
    assert reference.apply_chat_template(messages, tokenize=False) == "<|startoftext|>[a][b]"


def test_named_templates_pick_tool_use(tmp_copy: Path) -> None:
    config = json.loads((tmp_copy / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "default", "template": "plain"}, {"name": "tool_use", "template": "tools"}]
    (tmp_copy / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_dir(tmp_copy)
    messages = [{"role": "user", "content": "x"}]
    assert tok.apply_chat_template(messages) == "plain"
    assert tok.apply_chat_template(messages, tools=[{"name": "f", "parameters": {}}]) == "tools"


# -- streaming detokenization ---------------------------------------------------------------------


def stream(tok: Tokenizer, ids: list[int], skip_special_tokens: bool = False) -> list[str]:
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip_special_tokens)
    return [detok.add(i) for i in ids] + [detok.flush()]


@pytest.mark.parametrize(
    "text",
    [
        "这是一个没有见过的中文句子，包含生僻字：龘靐齉爩。",
        "النص العربي مع تشكيل: مَرْحَبًا",
        "Emoji: 🦜🦩🧬👩‍👩‍👧‍👦🇯🇵 and 🎉",
        MIXED_TEXT,
    ],
)
def test_streaming_equals_decode_and_never_splits_a_character(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    pieces = stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    # Rare characters are split into byte tokens: some tokens must yield nothing on their own.
    if any(ord(c) > 0x3000 for c in text):
        assert "" in pieces[:-1]


def test_streaming_holds_back_a_split_emoji(tok: Tokenizer) -> None:
    ids = tok.encode("🦜")  # not in the corpus: one token per byte
    assert len(ids) > 1
    detok = IncrementalDetokenizer(tok)
    assert [detok.add(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.add(ids[-1]) == "🦜"
    assert detok.flush() == ""


def test_streaming_flushes_an_incomplete_character(tok: Tokenizer) -> None:
    ids = tok.encode("ab🦜")[:-1]  # the emoji's last byte never arrives
    pieces = stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == "ab\ufffd"
    assert pieces[-1] == "\ufffd"


def test_streaming_window_stays_small(tok: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each step decodes the tokens since the last character boundary, not the whole sequence."""
    lengths: list[int] = []
    decode = Tokenizer.decode

    def counting_decode(self: Tokenizer, ids, skip_special_tokens: bool = False) -> str:
        lengths.append(len(ids))
        return decode(self, ids, skip_special_tokens)

    ids = tok.encode(" ".join(MULTILINGUAL) * 4)
    monkeypatch.setattr(Tokenizer, "decode", counting_decode)
    text = "".join(stream(tok, ids))
    monkeypatch.undo()
    assert text == tok.decode(ids)
    assert len(ids) > 250 and max(lengths) <= 4


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_streaming_random_ids_equals_decode(tok: Tokenizer, data: st.DataObject) -> None:
    # Random ids make invalid UTF-8 and special tokens anywhere: the pieces must still add up.
    ids = data.draw(st.lists(st.integers(0, VOCAB_SIZE - 1), max_size=40))
    skip = data.draw(st.booleans())
    pieces = stream(tok, ids, skip_special_tokens=skip)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)


@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30))
def test_streaming_random_text_never_emits_replacement(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    pieces = stream(tok, ids)
    assert "".join(pieces) == text
    if "\ufffd" not in text:
        assert not any("\ufffd" in p for p in pieces)
