"""mmproj files (LFM2-VL's vision part as llama.cpp keeps it): our writer against llama.cpp's converter,
our reader against the safetensors checkpoint, llama.cpp's `llama-mtmd-cli` on our files, and bad files.

The checkpoint is a small random transformers `Lfm2VlForConditionalGeneration` with the vision settings
llama.cpp accepts (patch 16, a 16 x 16 position grid, at least 3 tower blocks: llama.cpp's converter maps
`multi_modal_projector.linear_{bid}` through the tower's block numbers), a tied head (its converter cannot
map an untied `lm_head`), the released tensor layout (`model.vision_tower.vision_model.*`, the only one
its converter maps) and a byte-level BPE with LFM2-VL's image markers. The llama.cpp tests need its
sources (`LLAMA_CPP_DIR`: `convert_hf_to_gguf.py`, `gguf-py`; `llama-mtmd-cli` from `$LLAMA_MTMD_CLI`,
else `$LLAMA_CPP_DIR/build/bin`) and skip without them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import gguf
import pytest
import torch

import lfm2
from lfm2.convert import convert
from lfm2.errors import CheckpointError, ConfigError
from lfm2.gguf import GGUFFile, export_gguf
from lfm2.images import batch
from lfm2.mmproj import MMPROJ_TABLE, MMPROJ_TYPES, export_mmproj, mmproj_plan

transformers = pytest.importorskip("transformers")

IMAGE_TOKENS = ["<image>", "<|image_start|>", "<|image_end|>", "<|img_thumbnail|>"] + [
    f"<|img_row_{r}_col_{c}|>" for r in range(1, 11) for c in range(1, 11)]
# Not SigLIP's 0.5s, so that a file which dropped them would be caught.
PROCESSOR = {"image_mean": [0.48, 0.45, 0.4], "image_std": [0.27, 0.26, 0.28], "downsample_factor": 2,
             "encoder_patch_size": 16, "min_image_tokens": 64, "max_image_tokens": 256, "do_image_splitting": True,
             "tile_size": 512, "max_tiles": 10, "min_tiles": 2}


def vl_config(tokenizer, **overrides):
    text = dict(model_type="lfm2", vocab_size=tokenizer.get_vocab_size(), hidden_size=64, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, intermediate_size=96, block_auto_adjust_ff_dim=False,
                layer_types=["conv", "full_attention", "conv", "full_attention"], max_position_embeddings=4096)
    vision = dict(model_type="siglip2_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                  num_attention_heads=2, patch_size=16, num_patches=256, vision_use_head=False)
    return transformers.Lfm2VlConfig(text_config=text, vision_config=vision,
                                     image_token_id=tokenizer.token_to_id("<image>"), projector_hidden_size=40,
                                     downsample_factor=2, tie_word_embeddings=True, **overrides)


def write_vl_checkpoint(path: Path, released_layout: bool = True, seed: int = 0, **overrides) -> Path:
    """A random LFM2-VL checkpoint as transformers saves it, the tower renamed to the released layout."""
    from safetensors.torch import load_file, save_file
    from tokenizers import AddedToken, Tokenizer

    from lfm2.train.tokenizer import train_tokenizer
    from tests.conftest import CORPUS

    train_tokenizer(CORPUS, vocab_size=600, out_dir=path)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in IMAGE_TOKENS])
    tok.save(str(path / "tokenizer.json"))
    torch.manual_seed(seed)
    model = transformers.Lfm2VlForConditionalGeneration(vl_config(tok, **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("out_proj.weight", "w2.weight")) and "language_model" in name:
                p.mul_(8)  # context-dependent predictions (testing-random-models.md)
            if "vision_tower" in name and name.endswith("bias") or "norm" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)  # every weight matters
    model.save_pretrained(path)
    if released_layout:
        state = load_file(path / "model.safetensors")
        state = {k.replace("model.vision_tower.", "model.vision_tower.vision_model.", 1): v for k, v in state.items()}
        save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    (path / "processor_config.json").write_text(json.dumps({"image_processor": PROCESSOR,
                                                            "processor_class": "Lfm2VlProcessor"}))
    return path


@pytest.fixture(scope="module")
def vl_checkpoint(tmp_path_factory) -> Path:
    return write_vl_checkpoint(tmp_path_factory.mktemp("vl") / "LFM2-VL-tiny")


@pytest.fixture(scope="module")
def exported(vl_checkpoint, tmp_path_factory):
    """Our text GGUF (f32) and mmproj files of every type, written by `convert` as `lfm2 convert` does."""
    out = tmp_path_factory.mktemp("gguf")
    text, mmproj = convert(vl_checkpoint, "gguf", out / "model-f32.gguf", "f32", progress=False)
    files = {"text": text, "f32": mmproj}
    for t in ("f16", "bf16", "q8_0"):
        files[t] = export_mmproj(vl_checkpoint, out / f"mmproj-{t}.gguf", t, progress=False)
    return files


@pytest.fixture(scope="module")
def reference(vl_checkpoint):
    return lfm2.load(vl_checkpoint)


def picture(width: int, height: int, seed: int):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8).numpy())


def messages(image) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is this?"}]}]


@torch.no_grad()
def vl_logits(llm, image) -> tuple[list[int], torch.Tensor]:
    """The prompt's ids and the logits of the whole prompt (an image and a question) through `llm.vision`."""
    plan = llm.chat_plan(messages(image))
    return plan.ids, llm.vision(torch.tensor([plan.ids]), **batch(plan.images))[0]


def read_gguf_file(path: Path) -> tuple[dict, dict]:
    """{key: (value types, value)} and {tensor: (type, shape, bytes)} as gguf-py reads them."""
    r = gguf.GGUFReader(path)
    kv = {k: (tuple(f.types), f.contents()) for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: (t.tensor_type.name, tuple(int(x) for x in t.shape), t.data.tobytes()) for t in r.tensors}
    return kv, tensors


# -- the file ------------------------------------------------------------------------------------


def test_layout_is_llama_cpps(exported, vl_checkpoint, reference):
    """What clip.cpp reads for PROJECTOR_TYPE_LFM2, as its converter writes it (checked byte for byte against
    the converter itself below, where llama.cpp's sources are present)."""
    f = GGUFFile(exported["f16"])
    m = f.metadata
    assert (m["general.architecture"], m["general.type"], m["clip.projector_type"]) == ("clip", "mmproj", "lfm2")
    assert m["clip.has_vision_encoder"] is True and m["clip.use_gelu"] is True
    assert m["clip.vision.projection_dim"] == 64 and m["clip.vision.embedding_length"] == 32
    assert (m["clip.vision.block_count"], m["clip.vision.attention.head_count"]) == (3, 2)
    assert (m["clip.vision.patch_size"], m["clip.vision.image_size"], m["clip.vision.projector.scale_factor"]) == (
        16, 256, 2)
    assert m["clip.vision.image_mean"] == PROCESSOR["image_mean"]
    assert m["clip.vision.image_std"] == PROCESSOR["image_std"]
    assert m["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    T = gguf.GGMLQuantizationType
    assert f.tensors["v.patch_embd.weight"].shape == (32, 3, 16, 16)  # a conv kernel; ours is linear
    assert f.tensors["v.patch_embd.weight"].type == T.F16 and f.tensors["v.position_embd.weight"].type == T.F32
    assert f.tensors["v.blk.0.attn_q.weight"].type == T.F16 and f.tensors["mm.input_norm.weight"].type == T.F32
    config = reference.vision.config
    expected = {k for k in reference.vision.state_dict() if k.startswith(("model.vision_tower.",
                                                                          "model.multi_modal_projector."))}
    assert {ours for _, ours in mmproj_plan(config)} == expected
    assert set(f.tensors) == {g for g, _ in mmproj_plan(config)}
    assert len({g for g, _, _ in MMPROJ_TABLE}) == len(MMPROJ_TABLE)
    q8 = GGUFFile(exported["q8_0"]).tensors
    # Q8_0 where rows split into blocks of 32, else F16 (the converter's fallback); the patch kernel F32
    assert (q8["v.blk.0.ffn_up.weight"].type, q8["v.blk.0.ffn_down.weight"].type) == (T.Q8_0, T.F16)
    assert q8["v.patch_embd.weight"].type == T.F32


def test_both_checkpoint_layouts_write_the_same_file(exported, tmp_path):
    """transformers 5 saves the tower without `vision_model`; released checkpoints have it."""
    ckpt = write_vl_checkpoint(tmp_path / "t5", released_layout=False)
    ours = export_mmproj(ckpt, tmp_path / "mmproj.gguf", "f32", progress=False)
    assert read_gguf_file(ours)[1] == read_gguf_file(exported["f32"])[1]


def test_convert_writes_the_text_model_and_an_mmproj_beside_it(vl_checkpoint, tmp_path):
    text, mmproj = convert(vl_checkpoint, "gguf", tmp_path / "m-q4_0.gguf", "q4_0", progress=False)
    assert mmproj == tmp_path / "mmproj-m-q4_0.gguf"
    assert GGUFFile(text).metadata["general.architecture"] == "lfm2"
    assert GGUFFile(mmproj).metadata["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16  # q4_0: not for mmproj
    _, mm = convert(vl_checkpoint, "gguf", tmp_path / "a.gguf", "q8_0", progress=False, mmproj=tmp_path / "v.gguf")
    assert mm == tmp_path / "v.gguf" and GGUFFile(mm).metadata["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    _, mm = convert(vl_checkpoint, "gguf", tmp_path / "b.gguf", "q8_0", progress=False, mmproj_type="f32")
    assert GGUFFile(mm).metadata["general.file_type"] == gguf.LlamaFileType.ALL_F32
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.gguf", "b.gguf", "m-q4_0.gguf", "mmproj-b.gguf", "mmproj-m-q4_0.gguf", "v.gguf"]  # no temporaries left


# -- loading -------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(60, 40), (900, 600)], ids=["one-tile", "tiled"])
def test_round_trip_logits_equal_the_checkpoints(exported, reference, size):
    """Text GGUF + mmproj (f32) give the safetensors checkpoint's logits on a prompt with an image."""
    llm = lfm2.load(exported["text"], mmproj=exported["f32"])
    assert llm.image_processor == reference.image_processor  # the file's settings and llama.cpp's fixed ones
    assert replace(llm.vision.config, text=reference.vision.config.text) == reference.vision.config
    image = picture(*size, seed=1)
    ids, got = vl_logits(llm, image)
    ref_ids, ref = vl_logits(reference, image)
    assert ids == ref_ids and ids.count(llm.vision.config.image_token_id) > 0
    assert (got - ref).abs().max() <= 1e-4
    # The image matters: other pixels give other logits.
    assert (vl_logits(llm, picture(*size, seed=2))[1] - got).abs().max() > 1e-2


def test_reduced_precision_files_load_close(exported, reference):
    image = picture(48, 64, seed=3)
    _, ref = vl_logits(reference, image)
    for t, tolerance in (("f16", 0.05), ("q8_0", 0.3)):
        llm = lfm2.load(exported["text"], mmproj=exported[t])
        _, got = vl_logits(llm, image)
        assert (got - ref).abs().max() <= tolerance, t


@torch.no_grad()
def test_gguf_and_mmproj_back_to_a_checkpoint(exported, reference, tmp_path):
    """`lfm2 convert model.gguf --to hf --mmproj mmproj.gguf`: an LFM2-VL checkpoint that lfm2 and transformers
    load to the original's logits, with the preprocessing settings of the original."""
    out, = convert(exported["text"], "hf", tmp_path / "back", progress=False, mmproj=exported["f32"])
    assert json.loads((out / "config.json").read_text())["model_type"] == "lfm2_vl"
    back = lfm2.load(out)
    assert back.image_processor == reference.image_processor
    image = picture(70, 90, seed=9)
    ids, ref = vl_logits(reference, image)
    assert (vl_logits(back, image)[1] - ref).abs().max() <= 1e-4
    plan = reference.chat_plan(messages(image))
    theirs = transformers.Lfm2VlForConditionalGeneration.from_pretrained(out).eval()
    logits = theirs(input_ids=torch.tensor([ids]), **batch(plan.images)).logits[0]
    assert (logits - ref).abs().max() <= 1e-4
    # In the released layout, which llama.cpp's converter reads, and so our writer writes the same file again.
    again = export_mmproj(out, tmp_path / "again.gguf", "f32", progress=False)
    assert read_gguf_file(again)[1] == read_gguf_file(exported["f32"])[1]


def test_chat_with_an_image_on_a_quantized_text_model(exported, vl_checkpoint, tmp_path):
    """A Q8_0 text file runs in its own format with an mmproj beside it (llama.cpp's usual pairing)."""
    text = export_gguf(vl_checkpoint, tmp_path / "model-q8_0.gguf", "q8_0", progress=False)
    llm = lfm2.load(text, mmproj=exported["f16"])
    from lfm2.quant import QuantLinear

    assert any(isinstance(m, QuantLinear) for m in llm.model.modules())
    reply = llm.chat(messages(picture(80, 50, seed=4)), max_new_tokens=6, temperature=0)
    assert reply["content"] and llm.last_stats[0].prompt_tokens > 40


def test_adapter_and_compile_with_mmproj(exported, vl_checkpoint, reference, tmp_path):
    """A LoRA adapter of the LFM2-VL checkpoint applies to the GGUF pair's language model as to the checkpoint's;
    compile=True compiles the language model's decode step (on first use)."""
    from lfm2.lora import LoraConfig, apply_lora, save_adapter

    vision = lfm2.load(vl_checkpoint).vision
    apply_lora(vision, LoraConfig(rank=4, alpha=8.0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in vision.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2, generator=g)
    adapter = save_adapter(vision, tmp_path / "adapter")
    image = picture(60, 40, seed=6)
    pair = lfm2.load(exported["text"], mmproj=exported["f32"], adapter=adapter)
    ids, ref = vl_logits(lfm2.load(vl_checkpoint, adapter=adapter), image)
    assert (vl_logits(pair, image)[1] - ref).abs().max() <= 1e-4
    assert (vl_logits(reference, image)[1] - ref).abs().max() > 1e-2  # the adapter matters
    assert lfm2.load(exported["text"], mmproj=exported["f32"], compile=True).model.decode_step is not None


def test_cli_chat_reads_an_image_with_mmproj(exported, tmp_path):
    image = tmp_path / "cat.png"
    picture(64, 48, seed=5).save(image)
    r = subprocess.run([sys.executable, "-m", "lfm2", "chat", "-m", str(exported["text"]), "--mmproj",
                        str(exported["f16"]), "--image", str(image), "--temperature", "0", "--max-new-tokens", "4",
                        "--verbose"], input="What is it?\n/exit\n", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    # 64 image tokens (a 64 x 48 image is scaled up to the least budget) and the markers, and a reply
    prompt = re.search(r"\[(\d+) prompt tokens, 4 generated", r.stderr)
    assert prompt and int(prompt.group(1)) > 64, r.stderr


def test_server_takes_images_with_mmproj(exported):
    from fastapi.testclient import TestClient

    from lfm2.server import create_app
    from tests.test_vision import data_url

    llm = lfm2.load(exported["text"], mmproj=exported["f16"])
    with TestClient(create_app(llm, "vl")) as client:
        r = client.post("/v1/chat/completions", json={"model": "vl", "max_tokens": 4, "temperature": 0, "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(picture(40, 40, 6))}},
                                         {"type": "text", "text": "Describe it."}]}]})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] > 64  # the image's tokens are in the prompt


# -- bad files and arguments ---------------------------------------------------------------------


def _gguf_with(*args, **kwargs):
    from tests.test_gguf import _gguf_with

    return _gguf_with(*args, **kwargs)


def test_bad_mmproj_files_are_named_and_explained(exported, tmp_path):
    text, good = exported["text"], exported["f32"]
    cases = [
        (text, ConfigError, ["model-f32.gguf", "text model GGUF", "not an mmproj file"]),
        (_gguf_with(good, tmp_path / "gemma.gguf", metadata={"clip.projector_type": "gemma3"}), ConfigError,
         ["gemma.gguf", "'gemma3'", "not LFM2-VL's ('lfm2')"]),
        (_gguf_with(good, tmp_path / "wide.gguf", metadata={"clip.vision.projection_dim": 2048}), ConfigError,
         ["wide.gguf", "width 2048", "hidden size 64", "different models"]),
        (_gguf_with(good, tmp_path / "llama.gguf", metadata={"general.architecture": "llama"}), ConfigError,
         ["llama.gguf", "'llama'", "not an mmproj"]),
        (_gguf_with(good, tmp_path / "audio.gguf", metadata={"clip.has_vision_encoder": False}), ConfigError,
         ["audio.gguf", "no vision encoder"]),
        (_gguf_with(good, tmp_path / "short.gguf", drop=("mm.2.bias",)), CheckpointError,
         ["short.gguf", "'mm.2.bias' is missing"]),
        (_gguf_with(good, tmp_path / "deep.gguf", metadata={"clip.vision.block_count": 4}), CheckpointError,
         ["deep.gguf", "'v.blk.3.ln1.weight' is missing"]),
        (_gguf_with(good, tmp_path / "nomean.gguf", drop_keys=("clip.vision.image_mean",)), ConfigError,
         ["nomean.gguf", "clip.vision.image_mean"]),
    ]
    for path, error, words in cases:
        with pytest.raises(error) as e:
            lfm2.load(text, mmproj=path)
        for w in words:
            assert w in str(e.value), (path, str(e.value))
    (tmp_path / "cat.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    with pytest.raises(CheckpointError, match="cat.png: not a GGUF file"):
        lfm2.load(text, mmproj=tmp_path / "cat.png")


def test_mmproj_needs_an_lfm2_vl_text_model(exported, chat_checkpoint, tmp_path):
    """A text model without the `<image>` token (a plain LFM2) cannot take an LFM2-VL mmproj."""
    plain = export_gguf(chat_checkpoint, tmp_path / "plain.gguf", "f32", progress=False)  # also 64 wide
    with pytest.raises(ConfigError, match="plain.gguf: its vocabulary has no '<image>' token"):
        lfm2.load(plain, mmproj=exported["f32"])


def test_mmproj_arguments_are_checked(exported, vl_checkpoint, chat_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="this is an mmproj file"):
        lfm2.load(exported["f32"])
    with pytest.raises(ConfigError, match="goes with a .gguf text model"):
        lfm2.load(vl_checkpoint, mmproj=exported["f32"])
    with pytest.raises(ConfigError, match="not an LFM2-VL checkpoint"):
        convert(chat_checkpoint, "gguf", tmp_path / "x.gguf", mmproj=tmp_path / "mm.gguf", progress=False)
    with pytest.raises(ConfigError, match="not LFM2-VL"):
        export_mmproj(chat_checkpoint, tmp_path / "mm.gguf", progress=False)
    with pytest.raises(ConfigError, match="unknown mmproj type 'q4_0'"):
        export_mmproj(vl_checkpoint, tmp_path / "mm.gguf", "q4_0", progress=False)
    with pytest.raises(ConfigError, match="--mmproj-type goes with --to gguf"):
        convert(exported["text"], "hf", tmp_path / "hf", mmproj_type="f16", progress=False)
    with pytest.raises(ConfigError, match="text model GGUF"):
        convert(exported["text"], "hf", tmp_path / "hf", mmproj=exported["text"], progress=False)
    assert not list(tmp_path.iterdir())


def test_export_refuses_what_llama_cpp_cannot_run(tmp_path):
    ckpt = write_vl_checkpoint(tmp_path / "nobias", projector_bias=False)
    with pytest.raises(ConfigError, match="projector_bias is false"):
        export_mmproj(ckpt, tmp_path / "mm.gguf", progress=False)
    assert not (tmp_path / "mm.gguf").exists()


def test_cli_errors_are_one_line(exported):
    r = subprocess.run([sys.executable, "-m", "lfm2", "generate", "-m", str(exported["text"]), "--mmproj",
                        str(exported["text"]), "hi"], capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "not an mmproj file" in lines[0], r.stderr


# -- against llama.cpp ---------------------------------------------------------------------------


def llama_cpp_dir() -> Path:
    where = os.environ.get("LLAMA_CPP_DIR")
    if not where:
        pytest.skip("set LLAMA_CPP_DIR to a llama.cpp source tree (convert_hf_to_gguf.py, gguf-py) to compare with "
                    "llama.cpp's converter")
    path = Path(where)
    if not (path / "convert_hf_to_gguf.py").is_file() or not (path / "gguf-py" / "gguf").is_dir():
        pytest.skip(f"LLAMA_CPP_DIR={where} has no convert_hf_to_gguf.py and gguf-py")
    return path


# Runs llama.cpp's converter once per type in one process (its imports take most of the time).
_DRIVER = """
import runpy, sys
script, ckpt, out, *types = sys.argv[1:]
sys.path.insert(0, str(__import__("pathlib").Path(script).parent))
for t in types:
    sys.argv = [script, ckpt, "--mmproj", "--outtype", t, "--outfile", f"{out}/mmproj-{t}.gguf"]
    runpy.run_path(script, run_name="__main__")
"""


@pytest.fixture(scope="module")
def llama_cpp_mmproj(vl_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """llama.cpp's own `convert_hf_to_gguf.py --mmproj` files of the checkpoint, one per type."""
    root = llama_cpp_dir()
    out = tmp_path_factory.mktemp("llama-cpp")
    env = {**os.environ, "PYTHONPATH": str(root / "gguf-py")}
    r = subprocess.run([sys.executable, "-c", _DRIVER, str(root / "convert_hf_to_gguf.py"), str(vl_checkpoint),
                        str(out), *MMPROJ_TYPES], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return {t: out / f"mmproj-{t}.gguf" for t in MMPROJ_TYPES}


@pytest.mark.slow  # llama.cpp's converter: about 8 s
@pytest.mark.parametrize("kind", list(MMPROJ_TYPES))
def test_mmproj_equals_llama_cpp_converters(exported, llama_cpp_mmproj, kind):
    """Key by key (value types too) and tensor by tensor (name, type, shape, bytes); only general.name differs
    (the converter title-cases the directory's name)."""
    ours_kv, ours_t = read_gguf_file(exported[kind])
    theirs_kv, theirs_t = read_gguf_file(llama_cpp_mmproj[kind])
    assert ours_kv.pop("general.name")[1] == "LFM2-VL-tiny" and theirs_kv.pop("general.name")
    assert ours_kv == theirs_kv
    assert list(ours_kv) == list(theirs_kv)  # in the same order
    assert ours_t.keys() == theirs_t.keys()
    for name, t in theirs_t.items():
        assert ours_t[name] == t, name


@pytest.mark.slow
def test_llama_cpps_mmproj_loads_to_the_same_logits(exported, llama_cpp_mmproj, reference):
    llm = lfm2.load(exported["text"], mmproj=llama_cpp_mmproj["f32"])
    image = picture(900, 600, seed=7)
    ids, got = vl_logits(llm, image)
    assert ids == vl_logits(reference, image)[0]
    assert (got - vl_logits(reference, image)[1]).abs().max() <= 1e-4


def mtmd_cli() -> Path:
    where = os.environ.get("LLAMA_MTMD_CLI")
    if where:
        path = Path(where)
    elif os.environ.get("LLAMA_CPP_DIR"):
        path = Path(os.environ["LLAMA_CPP_DIR"]) / "build" / "bin" / "llama-mtmd-cli"
    else:
        pytest.skip("set LLAMA_MTMD_CLI (or LLAMA_CPP_DIR with a build) to run llama.cpp's llama-mtmd-cli")
    if not path.is_file():
        pytest.skip(f"{path}: no llama-mtmd-cli there (cmake --build build --target llama-mtmd-cli)")
    return path


@pytest.mark.slow  # llama.cpp encodes a tiled image: about 5 s
@pytest.mark.parametrize("size", [(200, 300), (1200, 700)], ids=["one-tile", "tiled"])
def test_llama_mtmd_cli_runs_our_files(exported, tmp_path, size):
    """llama.cpp loads our text GGUF and mmproj, encodes the image and answers; it cuts the image into the
    tiles our processor cuts, of the same sizes and as many image tokens.

    Its log is read for the tiles only: llama.cpp logs from a worker thread that is not flushed at exit, so
    the last lines (the timings) are sometimes lost; the tiles are logged well before the reply ends."""
    cli = mtmd_cli()
    path = tmp_path / "image.png"
    picture(*size, seed=8).save(path)
    r = subprocess.run([str(cli), "-m", str(exported["text"]), "--mmproj", str(exported["f16"]), "--image", str(path),
                        "-p", "What is this?", "-n", "16", "--temp", "0", "-t", "2", "-c", "4096", "-v"],
                       capture_output=True, text=True, timeout=300)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    assert r.stdout.strip()  # the reply
    llm = lfm2.load(exported["text"], mmproj=exported["f16"])
    layout = llm.image_processor(path)
    p = llm.image_processor.encoder_patch_size
    tiles = [(w * p, h * p) for h, w in layout.spatial_shapes.tolist()]  # (width, height) in pixels
    assert len(tiles) == (1 if size == (200, 300) else 7)  # one image; 2 x 3 tiles and the thumbnail
    found = re.findall(r"copying image 1/1 to input buffer \(nx=(\d+), ny=(\d+)\)", log)
    assert [(int(x), int(y)) for x, y in found] == tiles
    encoded = re.findall(r"encoding batch with 1 entries and total (\d+) tokens", log)
    assert sum(map(int, encoded)) == layout.num_tokens
