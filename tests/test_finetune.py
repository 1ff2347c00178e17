"""Fine-tuning: LoRA (PEFT format), packing, DPO and distillation losses, merging, multi-process, resume."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lfm2
from lfm2.errors import CheckpointError, ConfigError, LFM2Error
from lfm2.lora import LoraConfig, adapters_disabled, apply_lora, merge_lora, save_adapter
from lfm2.merge import merge_adapter, merge_models, slerp
from lfm2.train.datasets import DataError, tokenize_conversations
from lfm2.train.finetune import FinetuneArgs, finetune
from lfm2.train.losses import dpo_loss, sequence_logps, topk_distill_loss
from lfm2.train.trainer import loss_fn
from tests.conftest import CORPUS, random_model, tiny_config, write_checkpoint

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _conversations(n: int, offset: int = 0) -> list[dict]:
    rows = []
    for i in range(offset, offset + n):
        rows.append({"messages": [{"role": "user", "content": f"What is {i} plus one?"},
                                  {"role": "assistant", "content": f"It is {i + 1}."}]})
    return rows


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _random_adapter(model: torch.nn.Module, seed: int = 0) -> None:
    """A trained-looking adapter: B is zero at initialisation, so randomise it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.fixture
def adapter_dir(chat_checkpoint, tmp_path) -> Path:
    model = lfm2.load(chat_checkpoint).model
    apply_lora(model, LoraConfig(rank=4, alpha=8.0))
    _random_adapter(model)
    return save_adapter(model, tmp_path / "adapter", base_model=str(chat_checkpoint))


# -- LoRA ---------------------------------------------------------------------------------------


def test_lora_starts_as_the_base_model_and_trains_only_adapters(chat_checkpoint):
    llm = lfm2.load(chat_checkpoint)
    ids = torch.randint(0, llm.config.vocab_size, (2, 12))
    with torch.no_grad():
        before = llm.model(ids)
    wrapped = apply_lora(llm.model, LoraConfig(rank=4))
    assert len(wrapped) == 4 * 3 + 2 * 4 + 2 * 2  # w1-w3 in 4 blocks, q/k/v/out in 2, in/out in 2
    with torch.no_grad():
        assert torch.equal(llm.model(ids), before)
    trainable = {n for n, p in llm.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_unknown_lora_target_is_an_error(chat_checkpoint):
    model = lfm2.load(chat_checkpoint).model
    with pytest.raises(ConfigError, match=r"\['o_proj'\] match no linear layer.*out_proj"):
        apply_lora(model, LoraConfig(targets=["q_proj", "o_proj"]))


def test_peft_loads_our_adapter_with_equal_logits(chat_checkpoint, adapter_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    ours = lfm2.load(chat_checkpoint, adapter=adapter_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(chat_checkpoint, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(hf, adapter_dir).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 24))
    with torch.no_grad():
        theirs, mine = model(ids).logits, ours.model(ids)
        with model.disable_adapter():
            base = model(ids).logits
    assert (theirs - mine).abs().max() <= 1e-4
    assert (theirs - base).abs().max() > 1e-2  # the adapter changes the logits: the comparison means something
    merged = merge_adapter(chat_checkpoint, adapter_dir, tmp_path / "merged")
    hf_merged = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    with torch.no_grad():
        assert (hf_merged(ids).logits - mine).abs().max() <= 1e-4
        assert (lfm2.load(merged).model(ids) - mine).abs().max() <= 1e-4


def test_adapter_for_another_base_model_names_the_tensor(adapter_dir, tmp_path):
    other = write_checkpoint(tmp_path / "wide", tiny_config(hidden_size=96, vocab_size=600))
    with pytest.raises(CheckpointError, match=r"layers\.\d+\..*lora_[AB]\.weight has shape .* different base model"):
        lfm2.load(other, adapter=adapter_dir)


def test_adapter_switch_off_gives_the_base_model(chat_checkpoint, adapter_dir):
    base = lfm2.load(chat_checkpoint).model
    tuned = lfm2.load(chat_checkpoint, adapter=adapter_dir).model
    ids = torch.randint(0, lfm2.load(chat_checkpoint).config.vocab_size, (1, 16))
    with torch.no_grad(), adapters_disabled(tuned):
        assert torch.equal(tuned(ids), base(ids))
    with torch.no_grad():
        merged = merge_lora(lfm2.load(chat_checkpoint, adapter=adapter_dir).model)
        assert (merged(ids) - tuned(ids)).abs().max() <= 1e-4
    assert not any("lora" in n for n, _ in merged.named_parameters())


# -- data and packing ---------------------------------------------------------------------------


def test_malformed_jsonl_line_is_named(chat_checkpoint, tmp_path):
    from lfm2.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(chat_checkpoint)
    path = _write_jsonl(tmp_path / "d.jsonl", [*_conversations(2), '{"messages": [', *_conversations(1)])
    with pytest.raises(DataError, match=r"d\.jsonl:3: not valid JSON"):
        tokenize_conversations(path, tok, 512)
    bad = _write_jsonl(tmp_path / "b.jsonl", [*_conversations(2), {"messages": [{"role": "wizard"}]},
                                              {"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match=r"b\.jsonl:3: message 0 needs a role"):
        tokenize_conversations(bad, tok, 512)


def test_bad_rows_can_be_skipped_and_are_reported(chat_checkpoint, tmp_path, capsys):
    from lfm2.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(chat_checkpoint)
    bad = _write_jsonl(tmp_path / "b.jsonl", [*_conversations(2), {"messages": [{"role": "user", "content": "hi"}]}])
    rows = tokenize_conversations(bad, tok, 512, on_error="skip")
    err = capsys.readouterr().err
    assert len(rows) == 2 and "b.jsonl:3: no assistant message" in err and "skipped 1 bad row" in err


def test_template_that_cannot_render_a_row_is_named(chat_checkpoint, tmp_path):
    from lfm2.tokenizer import Tokenizer

    ckpt = tmp_path / "strict"
    shutil.copytree(chat_checkpoint, ckpt)
    cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tool turns') }}"
                            "{% endif %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (ckpt / "tokenizer_config.json").write_text(json.dumps(cfg))
    rows = [*_conversations(1), {"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "1"},
                                              {"role": "assistant", "content": "ok"}]}]
    with pytest.raises(DataError, match=r"t\.jsonl:2: the chat template cannot render this row.*no tool turns"):
        tokenize_conversations(_write_jsonl(tmp_path / "t.jsonl", rows), Tokenizer.from_dir(ckpt), 512)


def test_packed_rows_equal_examples_run_alone(chat_checkpoint, tmp_path):
    """Packing: the targets are those of the examples, and no attention or conv state leaks."""
    from lfm2.tokenizer import Tokenizer
    from lfm2.train.data import TokenFile
    from lfm2.train.datasets import write_chat

    tok = Tokenizer.from_dir(chat_checkpoint)
    rows = tokenize_conversations(_write_jsonl(tmp_path / "d.jsonl", _conversations(9)), tok, 512)
    write_chat(rows, tmp_path, "train")
    data = TokenFile.open(tmp_path, "train")
    seq_len = 3 * max(len(ids) for ids, _ in rows)
    packs = data.packs(seq_len)
    assert len(packs) < len(rows) and packs[0][0] == 0 and packs[-1][1] == len(rows)
    x, y, seg = data.batch([0, 1], seq_len, pad_id=0, pack=True)
    model = random_model(lfm2.load(chat_checkpoint).config, seed=1)
    with torch.no_grad():
        packed = model(x, segment_ids=seg)
        for r, p in enumerate([0, 1]):
            first, last = packs[p]
            xs, ys = data.batch(list(range(first, last)), 10_000, pad_id=0)
            for k in range(last - first):
                n = len(rows[first + k][0]) - 1
                alone = model(xs[k : k + 1, :n])[0]
                where = (seg[r] == k).nonzero().flatten()
                assert torch.equal(y[r, where], ys[k, :n])
                assert (packed[r, where] - alone).abs().max() <= 1e-4
        # Training computes the logits of the target positions only: the same logits, the same loss.
        keep = y != -100
        assert 0 < int(keep.sum()) < keep.numel()
        assert (model(x, segment_ids=seg, logits_at=keep) - packed[keep]).abs().max() <= 1e-5
        loss, count = loss_fn(model, x, y, seg)
        full = F.cross_entropy(packed.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")
        assert count == int(keep.sum()) and abs(float(loss) - float(full)) <= 1e-3 * float(full)


# -- losses -------------------------------------------------------------------------------------


def test_dpo_loss_matches_a_direct_computation():
    torch.manual_seed(0)
    logits = torch.randn(4, 6, 11)
    targets = torch.randint(0, 11, (4, 6))
    targets[:, :2] = -100  # prompt tokens
    targets[1, 5] = -100  # a shorter rejected response
    logps, lengths = sequence_logps(logits[targets != -100], targets)
    direct = [sum(torch.log_softmax(logits[b, t], -1)[targets[b, t]] for t in range(6) if targets[b, t] != -100)
              for b in range(4)]
    assert torch.allclose(logps, torch.stack(direct), atol=1e-5)
    assert lengths.tolist() == [4, 3, 4, 4]
    ref = torch.tensor([-9.0, -7.0, -8.5, -6.0])
    beta = 0.3
    loss, r_c, r_r = dpo_loss(logps[0::2], logps[1::2], ref[0::2], ref[1::2], lengths[0::2], lengths[1::2], beta)
    for i in range(2):
        rc = beta * (logps[2 * i] - ref[2 * i]) / lengths[2 * i]
        rr = beta * (logps[2 * i + 1] - ref[2 * i + 1]) / lengths[2 * i + 1]
        assert math.isclose(float(loss[i]), -math.log(1 / (1 + math.exp(-(rc - rr)))), rel_tol=1e-5)
        assert math.isclose(float(r_c[i]), float(rc), rel_tol=1e-6)
    # Length normalization: repeating a response's tokens does not change its reward.
    twice, _, _ = dpo_loss(2 * logps[0:1], logps[1:2], 2 * ref[0:1], ref[1:2], 2 * lengths[0:1], lengths[1:2], beta)
    assert torch.allclose(twice, loss[:1])


def _direct_distill(student: torch.Tensor, teacher_full: torch.Tensor, k: int, tau: float) -> float:
    """The decoupled loss written out from its definition, one position, in float64."""
    p = torch.softmax(teacher_full.double(), -1)
    q = torch.softmax(student.double(), -1)
    top = torch.topk(p, k).indices
    ps, qs = float(p[top].sum()), float(q[top].sum())
    binary = ps * math.log(ps / qs) + (1 - ps) * math.log((1 - ps) / (1 - qs))
    pt = torch.softmax(teacher_full.double()[top] / tau, -1)
    qt = torch.softmax(student.double()[top] / tau, -1)
    return binary + tau**2 * float((pt * (pt / qt).log()).sum())


def test_topk_distill_loss_matches_a_direct_computation():
    torch.manual_seed(0)
    V, K = 50, 5
    teacher, student = torch.randn(3, V) * 3, torch.randn(3, V) * 3
    student[1, 0] = 30.0  # the student's argmax ...
    teacher[1, 0] = -30.0  # ... lies outside the teacher's top-K set
    t_logp, t_ids = torch.log_softmax(teacher, -1).topk(K, -1)
    assert 0 not in t_ids[1].tolist()
    for tau in (1.0, 2.0, 0.5):
        got = topk_distill_loss(student, t_logp, t_ids, tau)
        want = [_direct_distill(student[i], teacher[i], K, tau) for i in range(3)]
        assert torch.allclose(got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-4, atol=1e-4)
    # The temperature touches the within-top-K term only: the binary part is the same for any tau.
    same_inside = student.clone()
    same_inside[0, t_ids[0]] = teacher[0, t_ids[0]] + 1.0  # equal top-K shape: inside term 0
    a, b = (topk_distill_loss(same_inside[:1], t_logp[:1], t_ids[:1], tau) for tau in (1.0, 4.0))
    assert torch.allclose(a, b, atol=1e-5) and a > 0
    assert float(got[1]) > 10  # the binary term punishes the mass on a token outside the set
    assert topk_distill_loss(teacher, t_logp, t_ids, 2.0).abs().max() < 1e-5  # student == teacher


# -- runs ---------------------------------------------------------------------------------------


def _args(kind: str, model: Path, data: Path, out: Path, **kw) -> FinetuneArgs:
    base = dict(kind=kind, model=str(model), data=str(data), out=str(out), batch_size=4, seq_len=128,
                eval_every=5, save_every=2, lora_rank=4)
    return FinetuneArgs(**{**base, **kw})


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_sft_kill_and_resume_reproduces_the_run(chat_checkpoint, tmp_path):
    data = _write_jsonl(tmp_path / "d.jsonl", _conversations(40))
    whole = finetune(_args("sft", chat_checkpoint, data, tmp_path / "a", max_steps=6, lr=1e-2, pack=True))
    finetune(_args("sft", chat_checkpoint, data, tmp_path / "b", max_steps=6, lr=1e-2, pack=True), stop_after=3)
    assert not (tmp_path / "b" / "adapter").exists()
    resumed = finetune(_args("sft", chat_checkpoint, data, tmp_path / "b", max_steps=6, lr=1e-2, pack=True))
    a, b = _losses(whole), _losses(resumed)
    assert len(a) == len(b) == 6 and a[0] > a[-1]
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5
    assert (whole / "loss.png").is_file() and (whole / "adapter" / "adapter_model.safetensors").is_file()
    state = torch.load(whole / "state.pt", weights_only=True)["model"]
    assert all("lora_" in k for k in state)  # the checkpoint holds the adapter, not a copy of the model


@pytest.mark.slow  # two torchrun worker processes
def test_torchrun_two_processes_equal_one(chat_checkpoint, tmp_path):
    data = _write_jsonl(tmp_path / "d.jsonl", _conversations(40))
    # float32: under bfloat16 autocast a batch split over two processes rounds differently
    single = finetune(_args("sft", chat_checkpoint, data, tmp_path / "one", max_steps=4, lr=1e-2, full=True,
                            autocast="off"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "lfm2",
           "finetune", "sft", "--model", str(chat_checkpoint), "--data", str(data), "--out", str(tmp_path / "two"),
           "--max-steps", "4", "--lr", "1e-2", "--full", "--batch-size", "4", "--seq-len", "128",
           "--eval-every", "5", "--save-every", "2", "--autocast", "off"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = _losses(single), _losses(tmp_path / "two")
    assert len(a) == len(b) == 4
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-4
    ids = torch.randint(0, lfm2.load(chat_checkpoint).config.vocab_size, (1, 16))
    with torch.no_grad():
        diff = lfm2.load(single / "model").model(ids) - lfm2.load(tmp_path / "two" / "model").model(ids)
    assert diff.abs().max() < 1e-3


def _preference(model, tok, prompts: list[str], chosen: str, rejected: str) -> float:
    """Held-out accuracy: how often the length-normalized log-prob of `chosen` beats `rejected`."""
    from lfm2.train.data import assistant_mask

    wins = 0
    for p in prompts:
        scores = []
        for reply in (chosen.format(p=p), rejected.format(p=p)):
            ids, mask = assistant_mask(tok, [{"role": "user", "content": p},
                                             {"role": "assistant", "content": reply}], last_only=True)
            x = torch.tensor([ids[:-1]])
            y = torch.tensor([[t if m else -100 for t, m in zip(ids[1:], mask[1:], strict=True)]])
            with torch.no_grad():
                lp, n = sequence_logps(model(x, logits_at=y != -100), y)
            scores.append(float(lp / n))
        wins += scores[0] > scores[1]
    return wins / len(prompts)


def test_dpo_raises_heldout_preference_accuracy(chat_checkpoint, tmp_path):
    from lfm2.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(chat_checkpoint)
    words = [w for w in " ".join(CORPUS[:10]).replace(",", " ").replace(".", " ").split() if w.isascii()]
    train_p, held_p = words[: len(words) // 2], words[len(words) // 2 :]
    styles = ("Yes, {p}!", "no {p}")
    base = lfm2.load(chat_checkpoint).model
    # The preferred style is the one the base model likes less, so there is something to learn.
    if _preference(base, tok, held_p, *styles) > 0.5:
        styles = styles[::-1]
    before = _preference(base, tok, held_p, *styles)
    pairs = [{"prompt": p, "chosen": styles[0].format(p=p), "rejected": styles[1].format(p=p)} for p in train_p]
    out = finetune(_args("dpo", chat_checkpoint, _write_jsonl(tmp_path / "p.jsonl", pairs), tmp_path / "dpo",
                         max_steps=12, lr=5e-3, beta=0.5, batch_size=8))
    after = _preference(lfm2.load(chat_checkpoint, adapter=out / "adapter").model, tok, held_p, *styles)
    assert before <= 0.5 and after >= 0.9 and after > before
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "reward_acc" in rows[0] and "val_reward_margin" in rows[-1]
    assert (out / "ref_logps_train.npy").is_file()


def _heldout_kl(student, teacher, ids: torch.Tensor) -> float:
    with torch.no_grad():
        p = torch.log_softmax(teacher(ids).float(), -1)
        q = torch.log_softmax(student(ids).float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def _sentences(n: int, seed: int) -> list[str]:
    import random

    from lfm2.train.synth import CITIES, DAYS, NAMES, WORDS

    rng = random.Random(seed)
    return [f"{rng.choice(NAMES)} went to {rng.choice(CITIES)} on {rng.choice(DAYS)} for the {rng.choice(WORDS)}, "
            f"and {rng.choice(NAMES)} stayed home with some {rng.choice(WORDS)}." for _ in range(n)]


def test_distillation_beats_sft_on_kl_to_the_teacher(tmp_path):
    """A small student learns the bundled model's distribution better from its top-K than from the text."""
    from lfm2.bundled import default_model_path
    from lfm2.tokenizer import Tokenizer
    from lfm2.train.trainer import TrainConfig, init_weights, train
    from lfm2.weights import save_checkpoint

    teacher_dir = default_model_path()
    if not (teacher_dir / "config.json").is_file():
        pytest.skip("bundled model not built")
    teacher = lfm2.load(teacher_dir).model
    student_dir = tmp_path / "student"
    small = tiny_config(vocab_size=teacher.config.vocab_size, hidden_size=32, num_hidden_layers=2,
                        layer_types=["conv", "full_attention"], intermediate_size=64, max_position_embeddings=512)
    torch.manual_seed(0)
    student = lfm2.models.build_model(small, device="cpu")
    init_weights(student)
    save_checkpoint(student, student_dir)
    for name in TOKENIZER_FILES:
        shutil.copy(teacher_dir / name, student_dir / name)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(_sentences(200, seed=0)), encoding="utf-8")
    common = dict(max_steps=20, lr=1e-2, full=True, seq_len=32, batch_size=8)
    distilled = finetune(_args("distill", student_dir, corpus, tmp_path / "kd", teacher=str(teacher_dir),
                               top_k=64, temperature=1.0, **common))
    # SFT on the same text: next-token cross-entropy through the same loop, the same data and steps.
    tuned = train(TrainConfig(out_dir=str(tmp_path / "sft"), data_dir=str(distilled / "data"),
                              init_from=str(student_dir), seq_len=32, batch_size=8, max_steps=20, lr=1e-2,
                              min_lr=1e-3, warmup_steps=1, weight_decay=0.0, eval_every=100, save_every=100))
    tok = Tokenizer.from_dir(teacher_dir)
    held = torch.tensor([tok.encode(" ".join(_sentences(4, seed=1)))[:64]])  # sentences not trained on
    kl = {name: _heldout_kl(lfm2.load(d).model, teacher, held)
          for name, d in (("start", student_dir), ("distill", distilled / "model"), ("sft", tuned / "model"))}
    assert kl["distill"] < kl["sft"] and kl["distill"] < 0.5 * kl["start"], kl


def test_distillation_refuses_a_teacher_with_another_tokenizer(chat_checkpoint, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(chat_checkpoint, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world\n\nmore text", encoding="utf-8")
    with pytest.raises(LFM2Error, match="different tokenizers"):
        finetune(_args("distill", chat_checkpoint, corpus, tmp_path / "kd", teacher=str(other), max_steps=1))


# -- merging ------------------------------------------------------------------------------------


def test_linear_and_slerp_merges(tmp_path):
    cfg = tiny_config()
    a, b = write_checkpoint(tmp_path / "a", cfg, seed=1), write_checkpoint(tmp_path / "b", cfg, seed=2)
    lin = merge_models([a, b], tmp_path / "lin", weights=[0.25, 0.75])
    wa, wb, wl = (lfm2.load(p).model.model.layers[0].feed_forward.w1.weight for p in (a, b, lin))
    assert torch.allclose(wl, 0.25 * wa + 0.75 * wb, atol=1e-6)
    s0 = merge_models([a, b], tmp_path / "s0", method="slerp", t=0.0)
    assert torch.equal(lfm2.load(s0).model.model.layers[0].feed_forward.w1.weight, wa)
    x, y = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert torch.allclose(slerp(x, y, 0.5), torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]), atol=1e-6)
    other = write_checkpoint(tmp_path / "c", tiny_config(intermediate_size=128))
    with pytest.raises(CheckpointError, match="w1.weight has shape"):
        merge_models([a, other], tmp_path / "bad")
    with pytest.raises(ConfigError, match="exactly two"):
        merge_models([a, b, a], tmp_path / "bad", method="slerp")


def test_cli_finetune_and_merge(chat_checkpoint, tmp_path, capsys):
    from lfm2.cli import main

    data = _write_jsonl(tmp_path / "d.jsonl", _conversations(12))
    main(["finetune", "sft", "--model", str(chat_checkpoint), "--data", str(data), "--out", str(tmp_path / "run"),
          "--max-steps", "2", "--batch-size", "4", "--seq-len", "128", "--lora-rank", "2", "--call-weight", "3"])
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["call_weight"] == 3.0
    main(["merge", "--model", str(chat_checkpoint), "--adapter", str(tmp_path / "run" / "adapter"),
          "-o", str(tmp_path / "merged")])
    assert "merged checkpoint written" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["finetune", "sft", "--model", str(chat_checkpoint), "--data", str(data), "--out", str(tmp_path / "x"),
              "--lora-targets", "o_proj"])
    assert e.value.code == 2 and "o_proj" in capsys.readouterr().err


def test_gradient_checkpointing_gives_the_same_gradients(chat_checkpoint):
    model = random_model(lfm2.load(chat_checkpoint).config, seed=2).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 20))
    grads = []
    for flag in (False, True):
        model.gradient_checkpointing = flag
        model.zero_grad()
        model(ids).float().logsumexp(-1).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*grads, strict=True))
