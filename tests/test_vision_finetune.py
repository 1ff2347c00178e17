"""LoRA SFT of LFM2-VL on image-text conversations (`lfm2 finetune sft` on JSONL rows with image parts).

The checkpoint is `tests.test_vision`'s random LFM2-VL with a real tokenizer. The rows ask one question
about different pictures, with a different answer each: a model can only learn them by looking.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import torch

import lfm2
from lfm2.train.data import TokenFile
from lfm2.train.datasets import DataError, tokenize_conversations, write_chat
from lfm2.train.finetune import FinetuneArgs, finetune
from lfm2.train.trainer import Objective, TrainConfig, _build_model, loss_fn
from tests.test_vision import picture, write_vl_chat_checkpoint

pytest.importorskip("transformers")

ANSWERS = ["A red boat.", "Two cats.", "The moon.", "Some trees."]
QUESTION = "What is in the picture?"
GREEDY = dict(temperature=0, repetition_penalty=1.0, max_new_tokens=12)


@pytest.fixture(scope="module")
def vl(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vl-sft")
    write_vl_chat_checkpoint(path, head_scale=25.0)  # a head whose logits can make a reply likely
    return path


@pytest.fixture
def rows(tmp_path) -> tuple[Path, list[dict]]:
    """A JSONL file of four conversations, each image given another way: a relative path (OpenAI's part), an
    absolute one (transformers' `path`), a data URL, and `file://`; and the same rows with absolute paths."""
    (tmp_path / "pics").mkdir()
    files = []
    for i, size in enumerate([(64, 32), (16, 16), (40, 24), (24, 40)]):
        files.append(tmp_path / "pics" / f"{i}.png")
        picture(*size, seed=20 + i).save(files[-1])
    url = "data:image/png;base64," + base64.b64encode(files[2].read_bytes()).decode()
    parts = [{"type": "image_url", "image_url": {"url": "pics/0.png"}},
             {"type": "image", "path": str(files[1])},
             {"type": "image_url", "image_url": {"url": url}},
             {"type": "image", "url": f"file://{files[3]}"}]
    data = [{"messages": [{"role": "user", "content": [part, {"type": "text", "text": QUESTION}]},
                          {"role": "assistant", "content": answer}]}
            for part, answer in zip(parts, ANSWERS, strict=True)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in data), encoding="utf-8")
    plain = [{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(f)}},
                                                        {"type": "text", "text": QUESTION}]},
                           {"role": "assistant", "content": answer}]} for f, answer in zip(files, ANSWERS, strict=True)]
    return path, plain


def _args(model: Path, data: Path, out: Path, **kw) -> FinetuneArgs:
    base = dict(kind="sft", model=str(model), data=str(data), eval_data=str(data), out=str(out), batch_size=4,
                seq_len=256, eval_every=100, save_every=100, lora_rank=8, autocast="off")
    return FinetuneArgs(**{**base, **kw})


def test_image_rows_tokenize_as_chat_prompts(vl, rows):
    """The prompt ids are those `LLM.chat_plan` gives the same conversation (images expanded as in chat); the
    loss mask covers the reply and its end of turn; the images are kept as their files' bytes."""
    path, plain = rows
    llm = lfm2.load(vl)
    examples = tokenize_conversations(path, llm.tokenizer, 512, image_processor=llm.image_processor)
    assert len(examples) == 4
    for (ids, mask, images), row in zip(examples, plain, strict=True):
        prompt = llm.chat_plan(row["messages"][:-1]).ids
        assert ids[: len(prompt)] == prompt and not any(mask[: len(prompt)])
        reply = llm.tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])
        assert reply == row["messages"][-1]["content"] + "<|im_end|>\n"  # as for text rows
        image = row["messages"][0]["content"][0]["image_url"]["url"]
        assert images == [Path(image).read_bytes()]
    write_chat(examples, path.parent / "tokens", "train")
    data = TokenFile.open(path.parent / "tokens", "train")
    assert data.num_images == 4 and data.images([2, 0], 256) == [examples[2][2][0], examples[0][2][0]]
    # each file stored once, however many rows show it
    write_chat(examples + examples, path.parent / "tokens", "twice")
    assert (path.parent / "tokens" / "twice.images.bin").stat().st_size == sum(len(e[2][0]) for e in examples)


def test_bad_images_name_the_line_and_the_path(vl, rows, chat_checkpoint, tmp_path):
    path, plain = rows
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    lines = path.read_text().splitlines()
    for ref, message in [("missing.png", r"d2\.jsonl:3: .*missing\.png: no such image file"),
                         ("broken.png", r"d2\.jsonl:3: .*broken\.png: .*(not an image|cannot be decoded)")]:
        bad = json.loads(lines[0])
        bad["messages"][0]["content"][0]["image_url"]["url"] = ref
        data = tmp_path / "d2.jsonl"
        data.write_text("\n".join([lines[0], lines[1], json.dumps(bad), lines[3]]) + "\n")
        with pytest.raises(DataError, match=message):
            finetune(_args(vl, data, tmp_path / "run", max_steps=1))
    llm = lfm2.load(chat_checkpoint)  # a text model: image parts are named, not rendered as text
    with pytest.raises(DataError, match=r"d\.jsonl:1: message 0: content part 0 is an image.*vision model"):
        tokenize_conversations(path, llm.tokenizer, 512)


def test_only_the_language_model_gets_gradients(vl, rows, tmp_path):
    """A training step runs the vision tower (the loss depends on the pixels) but gives it no gradient: LoRA
    trains the language model's adapters, full fine-tuning its weights, neither the tower nor the projector.
    Packed rows (several conversations, each with its image) give the loss of the rows run apart."""
    path, _ = rows
    llm = lfm2.load(vl)
    write_chat(tokenize_conversations(path, llm.tokenizer, 512, image_processor=llm.image_processor),
               tmp_path / "tokens", "train")
    data = TokenFile.open(tmp_path / "tokens", "train")
    vision_side = ("model.vision_tower.", "model.multi_modal_projector.")
    for lora in ({"rank": 4, "alpha": 8.0}, None):
        cfg = TrainConfig(out_dir=str(tmp_path), data_dir=str(tmp_path / "tokens"), init_from=str(vl), seq_len=256,
                          lora=lora, autocast="off")
        model, processor = _build_model(cfg, llm.tokenizer, torch.device("cpu"))
        objective = Objective(cfg, model, torch.device("cpu"), data={"train": data}, image_processor=processor)
        loss, count, _ = objective(model, data.batch([0, 1, 2, 3], 256, 0), [0, 1, 2, 3], "train")
        (loss / count).backward()
        params = dict(model.named_parameters())
        vision = {n: p for n, p in params.items() if n.startswith(vision_side)}
        assert len(vision) > 20 and all(p.grad is None and not p.requires_grad for p in vision.values())
        trained = {n: p for n, p in params.items() if p.requires_grad}
        assert all(p.grad is not None for p in trained.values())
        if lora:
            assert trained and all("lora_" in n and n.startswith("model.language_model.") for n in trained)
            assert all(p.grad.abs().max() > 0 for n, p in trained.items() if "lora_B" in n)
        else:
            assert "lm_head.weight" in trained and "model.language_model.layers.0.conv.in_proj.weight" in trained
    with torch.no_grad():
        from lfm2.images import batch

        x, y = data.batch([0], 256, 0)
        own = float(loss_fn(model, x, y, **objective.image_inputs("train", [0]))[0])
        other = batch([processor(picture(64, 32, seed=99))])  # the same size as row 0's picture: the same ids
        assert abs(float(loss_fn(model, x, y, **other)[0]) - own) > 1e-3 * own
        alone = sum(float(loss_fn(model, *data.batch([i], 256, 0), **objective.image_inputs("train", [i]))[0])
                    for i in range(4))
        cfg = TrainConfig(out_dir=str(tmp_path), data_dir=str(tmp_path / "tokens"), init_from=str(vl), seq_len=256,
                          pack=True)
        packed = Objective(cfg, model, torch.device("cpu"), data={"train": data}, image_processor=processor)
        rows = list(range(len(data.packs(256))))
        assert len(rows) < 4
        loss, _, _ = packed(model, data.batch(rows, 256, 0, pack=True), rows, "train")
        assert abs(float(loss) - alone) <= 1e-4 * alone


def test_lora_sft_on_image_rows_learns_each_pictures_answer(vl, rows, tmp_path):
    """Four rows ask the same question of four pictures: after 20 steps the adapter, loaded with
    `lfm2.load(vl, adapter=)`, answers each picture as trained, which the base model does not."""
    path, plain = rows
    out = finetune(_args(vl, path, tmp_path / "run", max_steps=20, lr=1e-2))
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.05 * losses[0]  # measured: 14.4 -> 0.004
    base, tuned = lfm2.load(vl), lfm2.load(vl, adapter=out / "adapter")
    asks = [row["messages"][:-1] for row in plain]
    before = [base.chat(ask, **GREEDY)["content"] for ask in asks]
    after = [tuned.chat(ask, **GREEDY)["content"] for ask in asks]
    assert after == ANSWERS and not set(before) & set(ANSWERS)


def test_full_fine_tuning_writes_a_vl_checkpoint(vl, rows, tmp_path):
    """`--full` trains the language model and head, not the vision side, and writes a whole LFM2-VL checkpoint
    (its config.json and processor settings kept) that loads as one; here with gradient checkpointing and packing."""
    path, _ = rows
    out = finetune(_args(vl, path, tmp_path / "run", max_steps=2, lr=1e-3, full=True, grad_checkpointing=True,
                         pack=True, batch_size=1))
    base, tuned = lfm2.load(vl), lfm2.load(out / "model")
    assert tuned.vision is not None and (out / "model" / "processor_config.json").is_file()
    assert (out / "model" / "config.json").read_text() == (vl / "config.json").read_text()
    before, after = base.vision.state_dict(), tuned.vision.state_dict()
    changed = {n for n, t in after.items() if not torch.equal(t, before[n])}
    assert "lm_head.weight" in changed and "model.language_model.layers.0.conv.in_proj.weight" in changed
    assert not [n for n in changed if n.startswith(("model.vision_tower.", "model.multi_modal_projector."))]
