"""lfm2's image preprocessing against golden outputs of transformers' `Lfm2VlProcessor`.

The fixtures in `tests/data/vl_processor` were written by `tests/fixtures/make_vl_fixtures.py` with
transformers 5.24 and torchvision in a separate environment (torchvision does not load against lfm2's
CPU torch build); `golden.json` records the versions. The images are the PNGs beside them, generated
by that script. Cases: several sizes and aspect ratios (tiny, tall and thin, wide, square, large),
small patch/tile sizes at two token budgets with tiling on and off, and the released defaults
(pixel values there as a SHA-256 of the bytes plus two patches per tile).

torchvision resizes 8-bit images with PyTorch's native uint8 kernel where the CPU has AVX2 (else in
float32, rounded); the fixtures were made on an AVX-512 machine, so on a CPU without AVX2 the pixel
comparison allows one 8-bit level.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lfm2.errors import GenerationError
from lfm2.images import ImageProcessor, batch, decode_image, load_image

DATA = Path(__file__).parent / "data" / "vl_processor"
GOLDEN = json.loads((DATA / "golden.json").read_text())
ARRAYS = np.load(DATA / "golden.npz")
NATIVE = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
# One 8-bit level after normalization (mean = std = 0.5): 2/255; none where the kernel is the fixtures'.
PIXEL_TOL = 1e-6 if NATIVE else 2 / 255 + 1e-6

CASES = [(case, i) for case, v in GOLDEN["cases"].items() for i in range(len(v["images"]))]


def image(name: str) -> Image.Image:
    return Image.open(DATA / name).convert("RGB")


@pytest.mark.parametrize(("case", "index"), CASES, ids=[f"{c}-{i}" for c, i in CASES])
def test_image_matches_transformers(case, index):
    spec = GOLDEN["cases"][case]
    entry = spec["images"][index]
    processor = ImageProcessor(**spec["settings"])
    got = processor(image(entry["image"]))
    key = f"{case}/{entry['image']}"
    assert (got.rows, got.cols) == (entry["rows"], entry["cols"])
    assert got.text == entry["placeholder"]
    assert got.num_tokens == entry["placeholder"].count("<image>")
    assert torch.equal(got.spatial_shapes, torch.from_numpy(ARRAYS[f"{key}/spatial_shapes"]))
    mask = torch.from_numpy(ARRAYS[f"{key}/pixel_attention_mask"])
    real = int(got.spatial_shapes.prod(-1).max())
    if real > mask.shape[1]:
        # A thin image over the budget: transformers returns all its patches but a mask cut at
        # max_num_patches; lfm2's mask covers every real patch (see `ImageProcessor.patchify`).
        assert got.pixel_attention_mask.shape == (1, real) and bool(got.pixel_attention_mask.all())
    else:
        assert torch.equal(got.pixel_attention_mask, mask)
    pixels = got.pixel_values
    if "sha256" in entry:
        assert list(pixels.shape) == entry["shape"]
        if NATIVE:
            assert hashlib.sha256(pixels.numpy().astype("<f4").tobytes()).hexdigest() == entry["sha256"]
        pixels = pixels[:, :2]
    ref = torch.from_numpy(ARRAYS[f"{key}/pixel_values"])
    assert pixels.shape == ref.shape
    assert (pixels - ref).abs().max() <= PIXEL_TOL


def tokenize(text: str, vocab: dict[str, int]) -> list[int]:
    """The fixture's word-level tokenizer: special markers whole, other text split on whitespace."""
    specials = sorted((t for t in vocab if t.startswith("<") and t != "<unk>"), key=len, reverse=True)
    out = []
    for piece in re.split("(" + "|".join(map(re.escape, specials)) + ")", text):
        if piece in vocab and piece in specials:
            out.append(vocab[piece])
        else:
            out += [vocab.get(w, vocab["<unk>"]) for w in piece.split()]
    return out


@pytest.mark.parametrize("case", list(GOLDEN["cases"]))
def test_prompt_with_two_images_matches_transformers(case):
    spec = GOLDEN["cases"][case]
    processor = ImageProcessor(**spec["settings"])
    layouts = [processor(image(name)) for name in spec["pair"]]
    text = processor.expand(GOLDEN["prompt"], layouts)
    assert tokenize(text, GOLDEN["vocab"]) == ARRAYS[f"{case}/pair/input_ids"][0].tolist()
    assert torch.equal(batch(layouts)["spatial_shapes"], torch.from_numpy(ARRAYS[f"{case}/pair/spatial_shapes"]))
    with pytest.raises(GenerationError, match="2 <image> markers but 1 images"):
        processor.expand(GOLDEN["prompt"], layouts[:1])


def png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(buf, "PNG")
    return buf.getvalue()


def test_bad_images_give_clear_errors(tmp_path):
    good = png(40, 30)
    assert decode_image(good).size == (40, 30)
    with pytest.raises(GenerationError, match="empty file"):
        decode_image(b"")
    with pytest.raises(GenerationError, match="not an image"):
        decode_image(b"hello, this is text")
    with pytest.raises(GenerationError, match="truncated or corrupt"):
        decode_image(good[: len(good) // 2])
    with pytest.raises(GenerationError, match="decompression bomb"):
        decode_image(png(9000, 9000))  # a few KB of PNG, 81M pixels
    with pytest.raises(GenerationError, match="no such image file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(GenerationError, match="not valid base64"):
        load_image("data:image/png;base64,@@@")
    with pytest.raises(GenerationError, match="remote image URLs"):
        load_image("https://example.com/cat.png")
    import base64

    url = "data:image/png;base64," + base64.b64encode(good).decode()
    assert load_image(url).size == (40, 30)
    (tmp_path / "a.png").write_bytes(good)
    assert load_image(str(tmp_path / "a.png")).size == (40, 30)


def test_settings_are_checked():
    with pytest.raises(Exception, match="min_image_tokens 300 is above"):
        ImageProcessor(min_image_tokens=300, max_image_tokens=256)
    # The token budget is the speed/quality dial; with tiling, a small budget makes large images tiled.
    few = ImageProcessor(max_image_tokens=64, min_image_tokens=16, do_image_splitting=False)
    big = image("img6_600x400.png")
    assert few(big).num_tokens == 54 < ImageProcessor()(big).num_tokens == 228
    tiled = ImageProcessor(max_image_tokens=64, min_image_tokens=16)(big)
    assert (tiled.rows, tiled.cols) == (2, 3) and tiled.num_tokens == 6 * 256 + 54


def test_settings_from_a_released_checkpoint(tmp_path):
    """LFM2-VL-450M's files: settings at the top level of processor_config.json (transformers 4.55 era),
    normalization in preprocessor_config.json; transformers 5 nests them under `image_processor`."""
    (tmp_path / "processor_config.json").write_text(json.dumps({
        "do_image_splitting": True, "downsample_factor": 2, "encoder_patch_size": 16, "max_image_tokens": 256,
        "max_num_patches": 1024, "max_pixels_tolerance": 2.0, "max_tiles": 10, "min_image_tokens": 64,
        "min_tiles": 2, "processor_class": "Lfm2VlProcessor", "tile_size": 512, "use_image_special_tokens": True,
        "use_thumbnail": False}))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "max_num_patches": 1024, "patch_size": 16}))
    p = ImageProcessor.from_dir(tmp_path)
    assert not p.use_thumbnail and p.max_image_tokens == 256 and p.max_num_patches == 1024
    assert ImageProcessor.from_dir(tmp_path, max_image_tokens=64).max_image_tokens == 64
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": {"use_thumbnail": True,
                                                                                      "min_image_tokens": 32}}))
    p = ImageProcessor.from_dir(tmp_path)
    assert p.use_thumbnail and p.min_image_tokens == 32
