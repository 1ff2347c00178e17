"""The training pipeline: data files, assistant-only loss masks, determinism and resume."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import lfm2
from lfm2.tokenizer import Tokenizer
from lfm2.train.data import TokenFile, assistant_mask, copy_rows, prepare_chat, prepare_copy, prepare_text
from lfm2.train.tokenizer import train_tokenizer
from lfm2.train.trainer import TrainConfig, lr_at, train
from tests.conftest import CORPUS

MODEL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
             intermediate_size=48, layer_types=["conv", "full_attention"], max_position_embeddings=128)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    train_tokenizer(CORPUS, vocab_size=400, out_dir=d)
    docs = [f"{s} (variant {i})" for i, s in enumerate(CORPUS)]
    counts = prepare_text(docs, Tokenizer.from_dir(d), d, val_fraction=0.1)
    assert counts["train"] > 2000 and counts["val"] > 100
    return d


def _cfg(data_dir, out, **kw):
    base = dict(out_dir=str(out), data_dir=str(data_dir), model=MODEL, seq_len=32, batch_size=4, grad_accum=2,
                max_steps=12, lr=1e-2, min_lr=1e-3, warmup_steps=3, eval_every=6, eval_batches=2, save_every=4,
                seed=1, threads=1)
    return TrainConfig(**{**base, **kw})


def _losses(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_train_learns_and_resume_reproduces(data_dir, tmp_path):
    full = train(_cfg(data_dir, tmp_path / "full"))
    rows = _losses(full)
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
    assert "val_loss" in rows[5] and "val_loss" in rows[11]
    # Killed after step 6 (last checkpoint at step 4), then resumed: same losses as uninterrupted.
    cfg = _cfg(data_dir, tmp_path / "resumed")
    train(cfg, stop_after=6)
    assert len(_losses(tmp_path / "resumed")) == 6
    train(cfg)
    resumed = _losses(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == list(range(1, 13))
    for a, b in zip(rows, resumed, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    # The exported model is a normal checkpoint with the tokenizer beside it.
    llm = lfm2.load(full / "model")
    assert llm.tokenizer is not None and llm.config.hidden_size == 32
    assert (full / "loss.png").stat().st_size > 1000


def test_fine_tuning_trains_float32_weights(data_dir, tmp_path, monkeypatch):
    """On CUDA `lfm2.load` defaults to bfloat16; a run from a checkpoint must still step float32 weights
    (AdamW on bfloat16 weights rounds small updates away). The CUDA default is imitated here on the CPU."""
    from safetensors import safe_open

    import lfm2.llm

    base = train(_cfg(data_dir, tmp_path / "base", max_steps=2))
    default = lfm2.llm.parse_dtype
    monkeypatch.setattr(lfm2.llm, "parse_dtype",
                        lambda dtype, device: torch.bfloat16 if dtype is None else default(dtype, device))
    tuned = train(_cfg(data_dir, tmp_path / "tuned", max_steps=2, init_from=str(base / "model")))
    with safe_open(tuned / "model" / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}


def test_lr_schedule():
    cfg = TrainConfig(out_dir="x", data_dir="x", max_steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0) and lr_at(100, cfg) == pytest.approx(0.1)
    assert lr_at(55, cfg) == pytest.approx(0.55)


def test_chat_data_trains_on_assistant_tokens_only(data_dir, tmp_path):
    tok = Tokenizer.from_dir(data_dir)
    conv = {"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."},
    ]}
    ids, mask = assistant_mask(tok, conv["messages"])
    trained = tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert trained == ("Hello!<|im_end|>\n<|tool_call_start|>[weather(city='Paris')]<|tool_call_end|><|im_end|>\n"
                       "Sunny.<|im_end|>\n")
    prepare_chat([conv, conv], tok, tmp_path, "sft", max_len=256)
    f = TokenFile.open(tmp_path, "sft")
    x, y = f.batch([0, 1], seq_len=256, pad_id=0)
    assert torch.equal(x[0], torch.tensor(ids[:-1]))
    assert tok.decode([t for t in y[0].tolist() if t != -100]) == trained
    with pytest.raises(lfm2.LFM2Error, match="conversation 0 has .* tokens, more than max_len=10"):
        prepare_chat([conv], tok, tmp_path, "sft2", max_len=10)
    short = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    n = len(assistant_mask(tok, short["messages"])[0])
    assert prepare_chat([conv, short], tok, tmp_path, "sft3", max_len=n, drop_longer=True) == 1
    assert TokenFile.open(tmp_path, "sft3").meta["offsets"] == [0, n]  # the long one left out


def test_text_rows_in_chat_data_train_on_every_token(data_dir, tmp_path):
    tok = Tokenizer.from_dir(data_dir)
    conv = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    text = "the quick brown fox jumps over the lazy dog " * 20
    prepare_chat([conv, {"text": text}], tok, tmp_path, "mix", max_len=32)
    f = TokenFile.open(tmp_path, "mix")
    x, y = f.batch([1], seq_len=64, pad_id=0)
    ids = tok.encode(text)[:32]  # cut to max_len: a long document never makes a row too long
    assert x[0].tolist() == ids[:-1] and y[0].tolist() == ids[1:]  # every next token is a target
    _, y0 = f.batch([0], seq_len=64, pad_id=0)
    assert (y0 == -100).sum() > 0  # the conversation still trains on the reply only


def test_token_rows_in_chat_data_keep_their_mask(data_dir, tmp_path):
    """Copying rows mixed into fine-tuning data train on their own mask, packed beside conversations."""
    tok = Tokenizer.from_dir(data_dir)
    conv = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    ids, mask = copy_rows(3, 20, (100, 200), seed=1, span=(3, 8))
    rows = [conv, *({"ids": i, "mask": m} for i, m in zip(ids.tolist(), mask.tolist(), strict=True))]
    assert prepare_chat(rows, tok, tmp_path, "mix", max_len=64) == 4
    f = TokenFile.open(tmp_path, "mix")
    for r in range(3):
        x, y = f.batch([r + 1], seq_len=64, pad_id=0)
        assert x[0].tolist() == ids[r, :-1].tolist()
        assert y[0].tolist() == [int(t) if m else -100 for t, m in zip(ids[r, 1:], mask[r, 1:], strict=True)]
    x, y, seg = f.batch([0], seq_len=200, pad_id=0, pack=True)  # all four rows packed into one
    assert seg[0].unique().tolist() == [0, 1, 2, 3] and (y[0] != -100).sum() == mask[:, 1:].sum() + (
        f.mask[: f.meta["offsets"][1]][1:].sum())
    with pytest.raises(lfm2.LFM2Error, match="row 0: 3 token ids but 2 mask values"):
        prepare_chat([{"ids": [1, 2, 3], "mask": [0, 1]}], tok, tmp_path, "bad", max_len=64)


def test_copy_rows_repeat_one_span_and_train_on_the_repeat(tmp_path):
    """Each row: random tokens in range, one span repeated once, targets exactly the repeat's tokens after its first."""
    prepare_copy(tmp_path, "copy", rows=50, seq_len=40, token_ids=(100, 200), seed=3, span=(4, 12))
    f = TokenFile.open(tmp_path, "copy")
    assert f.num_examples(40) == 50
    x, y = f.batch(list(range(50)), seq_len=40, pad_id=0)
    assert x.shape == (50, 40) and x.min() >= 100 and x.max() < 200
    lengths = set()
    for r in range(50):
        row = torch.tensor(f.ids[r * 41 : (r + 1) * 41].astype("int64"))
        targets = torch.tensor(f.mask[r * 41 : (r + 1) * 41]).nonzero().flatten()  # token positions trained on
        n = len(targets) + 1  # the span's length: its first repeated token cannot be predicted, so is not a target
        repeat = int(targets[0]) - 1
        assert targets.tolist() == list(range(repeat + 1, repeat + n))  # one contiguous run
        assert row[repeat : repeat + n].tolist() == row[repeat - n : repeat].tolist()  # a copy of the n before it
        assert (y[r] != -100).nonzero().flatten().tolist() == (targets - 1).tolist()
        assert y[r, targets - 1].tolist() == row[targets].tolist() and x[r].tolist() == row[:-1].tolist()
        lengths.add(n)
    assert len(lengths) > 3  # the span length varies: no fixed offset solves the task
    assert prepare_copy(tmp_path, "again", 50, 40, (100, 200), seed=3, span=(4, 12)) == 50
    assert (TokenFile.open(tmp_path, "again").ids == f.ids).all()  # deterministic in the seed
    with pytest.raises(lfm2.LFM2Error, match="spans of 1..20 tokens"):
        prepare_copy(tmp_path, "bad", 5, 39, (100, 200), seed=0, span=(4, 30))


def test_call_weight_counts_the_choice_of_tool_more(data_dir, tmp_path, monkeypatch):
    """`call_weight`: the loss on the three targets after `<|tool_call_start|>` (`[` and the tool name's
    start) counts that many times over in training, and not in validation."""
    from lfm2.config import ModelConfig
    from lfm2.models import build_model
    from lfm2.train.trainer import Objective, call_weights, loss_fn

    x = torch.tensor([[5, 9, 7, 8, 9, 3, 4, 6], [1, 2, 3, 4, 5, 6, 7, 9]])
    assert call_weights(x, 9, 4.0).tolist() == [[1, 4, 4, 4, 4, 4, 4, 1], [1] * 7 + [4]]
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=400, **MODEL), device="cpu").eval()
    y = torch.randint(0, 400, x.shape)
    y[0, 0] = y[1, 3] = -100
    w = call_weights(x, 9, 4.0)
    with torch.no_grad():
        plain, n = loss_fn(model, x, y)
        weighted, m = loss_fn(model, x, y, weights=w)
        per_token = torch.nn.functional.cross_entropy(model(x).float().transpose(1, 2), y, reduction="none")
    keep = y != -100
    assert n == m == 14 and plain.item() == pytest.approx(per_token[keep].sum().item(), rel=1e-5)
    assert weighted.item() == pytest.approx((per_token * w)[keep].sum().item(), rel=1e-5)
    objective = Objective(_cfg(data_dir, "x", call_weight=4.0), model, torch.device("cpu"), call_start=9)
    with torch.no_grad():
        assert objective(model, (x, y), [0, 1], "train")[0].item() == pytest.approx(weighted.item(), rel=1e-5)
        assert objective(model, (x, y), [0, 1], "val")[0].item() == pytest.approx(plain.item(), rel=1e-5)
    with pytest.raises(lfm2.LFM2Error, match="call_weight must be positive"):
        TrainConfig(out_dir="x", data_dir="y", call_weight=0)
    # A tokenizer without the call marker (ours all have it) cannot weight calls: said, not ignored.
    monkeypatch.setattr(Tokenizer, "token_to_id", lambda self, token: None)
    with pytest.raises(lfm2.LFM2Error, match="has no <.tool_call_start.> token"):
        train(_cfg(data_dir, tmp_path / "w", call_weight=4.0))


def test_bad_config_is_named(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"out_dir": "x", "data_dir": "y", "learning_rate": 1}))
    with pytest.raises(lfm2.LFM2Error, match="unknown training option.*learning_rate"):
        TrainConfig.from_json(p)


def test_autocast_option():
    from lfm2.train.trainer import uses_bf16

    with pytest.raises(lfm2.LFM2Error, match="autocast must be"):
        TrainConfig(out_dir="x", data_dir="y", autocast="fp16")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert uses_bf16("bf16", cpu) and not uses_bf16("off", cpu) and not uses_bf16("off", cuda)
    assert uses_bf16("auto", cuda)  # CPUs: only with native bf16 (see cpu_has_native_bf16)


@pytest.mark.slow  # every step of the recipe, at toy scale
def test_bundle_recipe_end_to_end(tmp_path, monkeypatch):
    """Every step of the bundled-model recipe at toy scale, on a small injected corpus."""
    import lfm2.train.corpus
    from lfm2.train.bundle import BundleConfig, build

    cfg = BundleConfig.quick(str(tmp_path / "bundle"))
    cfg.pretrain_steps = cfg.sft_steps = cfg.copy_steps = 6
    cfg.eval_prompts = 3
    # The independent tool-call set, cut to its first 3 requests (all 164 would take minutes on this toy model).
    from lfm2.train import tool_eval

    full = json.loads(tool_eval.DEFAULT_PATH.read_text())
    small = tmp_path / "tool_eval.json"
    small.write_text(json.dumps({**full, "items": full["items"][:3]}))
    monkeypatch.setattr(tool_eval, "DEFAULT_PATH", small)
    # The data step alone (`--data-only`), then training from its files without the corpus, as on a
    # GPU machine that cannot fetch the Debian packages.
    data = build(cfg, docs=[f"{s} ({i})" for i, s in enumerate(CORPUS)], data_only=True)
    assert (data / "copy_val.json").is_file() and not (tmp_path / "bundle" / "pretrain").exists()
    monkeypatch.setattr(lfm2.train.corpus, "documents", lambda: pytest.fail("the corpus was read again"))
    # The copying rows (random tokens) need not travel with the data: they are made again, the same.
    copy_files = {p.name: p.read_bytes() for p in data.glob("copy*")}
    assert len(copy_files) == 6
    for name in copy_files:
        (data / name).unlink()
    build(cfg, data_only=True)
    assert {p.name: p.read_bytes() for p in data.glob("copy*")} == copy_files
    model_dir = build(cfg)
    card = (model_dir / "README.md").read_text()
    assert "Jargon File" in card and "WordNet" in card and "held-out prompts" in card
    results = json.loads((tmp_path / "bundle" / "eval.json").read_text())
    assert json.loads((model_dir / "eval.json").read_text()) == results  # shipped with the model
    assert json.loads((model_dir / "bundle_config.json").read_text())["sft_steps"] == cfg.sft_steps
    assert results["tool_prompts"] == 3 and results["independent_tool_prompts"] == 3
    assert "hand-written requests" in card and "held-out prompts of the training generator" in card
    # Both the pretraining checkpoint's and the shipped model's held-out perplexity are reported.
    assert results["heldout_corpus_perplexity"] > 1 and results["pretrain_heldout_corpus_perplexity"] > 1
    assert "before fine-tuning" in card
    # Copying is measured before the copying step and on the shipped model, against chance.
    assert results["copy_chance_loss"] == pytest.approx(math.log(cfg.vocab_size - 14 - 256))  # uniform, ordinary ids
    assert results["copy_loss"] > 0 and results["pretrain_copy_loss"] > 0
    assert "Copying from the context" in card and (tmp_path / "bundle" / "copy" / "model").is_dir()
    # The third fine-tuning stage: the rich stage's batches again, restarted from its model; the fourth on
    # new noisy conversations with the choice of tool weighted up; the fifth on
    # longer lists of tools that differ in their subject only; the shipped model is the sixth's (synth_wide).
    repeat = json.loads((tmp_path / "bundle" / "sft_repeat" / "train_config.json").read_text())
    assert repeat["init_from"] == str(tmp_path / "bundle" / "sft_rich" / "model") and repeat["lr"] == cfg.sft_repeat_lr
    robust = json.loads((tmp_path / "bundle" / "sft_robust" / "train_config.json").read_text())
    assert robust["init_from"] == str(tmp_path / "bundle" / "sft_repeat" / "model")
    assert robust["call_weight"] == cfg.robust_call_weight and robust["train_split"] == "sft_robust"
    assert model_dir == tmp_path / "bundle" / "sft_wide" / "model"
    wide = json.loads((tmp_path / "bundle" / "sft_wide" / "train_config.json").read_text())
    assert wide["init_from"] == str(tmp_path / "bundle" / "sft_choice" / "model")
    assert wide["train_split"] == "sft_wide" and wide["max_steps"] == cfg.wide_steps and "synth_wide" in card
    choice = json.loads((tmp_path / "bundle" / "sft_choice" / "train_config.json").read_text())
    assert choice["init_from"] == str(tmp_path / "bundle" / "sft_robust" / "model")
    assert choice["train_split"] == "sft_choice" and choice["max_steps"] == cfg.choice_steps
    assert "batches again" in card and "random words" in card and "only the subject or object" in card
    # Strict calls are scored with whole names (the default) and token by token.
    assert "token by token" in card
    # Fine-tuning rows: conversations, documents cut short, and copying rows (with their own masks).
    sft = TokenFile.open(tmp_path / "bundle" / "data", "sft")
    lengths = np.diff(sft.meta["offsets"])
    assert (lengths == cfg.copy_seq_len + 1).sum() >= round(len(lengths) / (1 + cfg.sft_copy_fraction)
                                                            * cfg.sft_copy_fraction)
    assert lengths.max() <= cfg.sft_seq_len
    llm = lfm2.load(model_dir)
    assert llm.sampling_params().temperature == 0.3
    # The reported figures are what scoring the shipped model gives now (greedy, so reproducible).
    from lfm2.train.bundle import HELDOUT_SEED, heldout_prompts, tool_call_scores

    held = heldout_prompts(3, cfg.seed + HELDOUT_SEED)
    assert (results["right_tool"], results["right_tool_and_arguments"]) == tool_call_scores(llm, held, False)
    assert (results["strict_token_right_tool"], results["strict_token_right_tool_and_arguments"]) == \
        tool_call_scores(llm, held, True, whole_names=False)
    assert results["independent_strict_right_tool"] == sum(
        t for t, _ in tool_eval.run(llm, tool_eval.load_items(), True, progress=False)) / 3
    reply = llm.chat([{"role": "user", "content": "Hi"}], max_new_tokens=4, temperature=0)
    stats = llm.last_stats[0]
    prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert stats.prompt_tokens == len(llm.tokenizer.encode(prompt, add_special_tokens=False))
    assert 1 <= stats.completion_tokens <= 4 and reply["role"] == "assistant"
