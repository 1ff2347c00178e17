"""Images for LFM2-VL: decoding (Pillow), and the preprocessing of transformers' `Lfm2VlImageProcessor`.

What the processor does to one image (transformers' `models/lfm2_vl/image_processing_lfm2_vl.py`
and `processing_lfm2_vl.py`, whose behaviour this module reproduces; llama.cpp's `tools/mtmd`
implements the same steps):
- `smart_resize`: a size whose sides are multiples of `encoder_patch_size * downsample_factor`
  (32 px), near the original aspect ratio, with between `min_image_tokens` and `max_image_tokens`
  tokens (one token per 2x2 patches);
- an image too large for that budget (by `max_pixels_tolerance`) is, with tiling on, resized to a
  grid of `tile_size` tiles (the grid whose aspect ratio is closest, from `min_tiles` to
  `max_tiles` tiles) and cut into them, row by row, and a thumbnail at the smart-resized size
  follows the tiles;
- resizing is bilinear with antialiasing on the 8-bit pixels (torchvision's kernel, which is
  PyTorch's `interpolate`), then `(x - 255*mean) / (255*std)` in float32;
- each tile is cut into `p x p` patches, row-major, each flattened as (row, column, channel), and
  padded with zero patches to `max_num_patches`; the mask marks the real ones;
- in the prompt, each image becomes `<|image_start|>`, then per tile `<|img_row_R_col_C|>` and the
  tile's `<image>` tokens, then `<|img_thumbnail|>` and the thumbnail's tokens, then `<|image_end|>`
  (a single-tile image: its tokens alone between start and end).

Decoding refuses what would hurt a server: unknown formats, truncated files, empty images and
decompression bombs (more than `MAX_PIXELS` pixels) raise `GenerationError` saying which.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lfm2.errors import ConfigError, GenerationError

MAX_PIXELS = 64 * 2**20  # decoded pixels an image may have (Pillow's own bomb limit is ~89M, as a warning)
MAX_IMAGE_BYTES = 32 * 2**20
DEFAULT_FEATURE_CACHE_BYTES = 256 * 2**20  # ~700 images of 256 tokens at LFM2-VL-1.6B's width (2048, float32)


@dataclass
class ImageLayout:
    """One image, preprocessed: its tiles' patches and where its tokens go in the prompt."""

    pixel_values: torch.Tensor  # (tiles, max_num_patches, 3*p*p) float32
    pixel_attention_mask: torch.Tensor  # (tiles, max_num_patches) int32, 1 for real patches
    spatial_shapes: torch.Tensor  # (tiles, 2) int64: (rows, columns) of patches
    rows: int  # tile grid; 1 x 1 when the image is not split
    cols: int
    text: str  # the image's placeholder text: markers and `<image>` tokens
    num_tokens: int  # `<image>` tokens in `text`: the embeddings the model's features give

    @functools.cached_property
    def digest(self) -> bytes:
        """A hash of what the vision tower reads (the tiles' pixels, masks and grids): equal digests, equal features."""
        h = hashlib.blake2b(digest_size=16)
        for t in (self.pixel_values, self.pixel_attention_mask, self.spatial_shapes):
            h.update(str((t.dtype, tuple(t.shape))).encode())
            h.update(t.contiguous().numpy().tobytes())
        return h.digest()


@dataclass
class ImageProcessor:
    """The settings of `Lfm2VlImageProcessor` (its field names and defaults) and the preprocessing itself.

    `min_image_tokens` / `max_image_tokens` and `do_image_splitting` are the speed/quality dial:
    fewer tokens encode and prefill faster, tiles keep detail in large images."""

    downsample_factor: int = 2
    do_image_splitting: bool = True
    min_tiles: int = 2
    max_tiles: int = 10
    use_thumbnail: bool = True
    min_image_tokens: int = 64
    max_image_tokens: int = 256
    encoder_patch_size: int = 16
    tile_size: int = 512
    max_pixels_tolerance: float = 2.0
    image_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    use_image_special_tokens: bool = True
    image_token: str = "<image>"

    def __post_init__(self) -> None:
        for name in ("downsample_factor", "min_tiles", "max_tiles", "min_image_tokens", "max_image_tokens",
                     "encoder_patch_size", "tile_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"image processor: {name} must be a positive integer, found {value!r}")
        if self.min_image_tokens > self.max_image_tokens:
            raise ConfigError(f"image processor: min_image_tokens {self.min_image_tokens} is above "
                              f"max_image_tokens {self.max_image_tokens}")
        if self.do_image_splitting and self.min_tiles > self.max_tiles:
            raise ConfigError(f"image processor: min_tiles {self.min_tiles} is above max_tiles {self.max_tiles}")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ImageProcessor:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known and v is not None})

    @classmethod
    def from_dir(cls, ckpt: str | os.PathLike, **overrides: Any) -> ImageProcessor:
        """The settings a checkpoint ships, then `overrides` (e.g. `max_image_tokens=128`).

        Released LFM2-VL checkpoints keep the tiling and token settings at the top level of
        `processor_config.json` and `config.json` (and `image_mean`/`image_std` in `preprocessor_config.json`);
        transformers 5 nests them under `image_processor`. Both are read, later ones winning."""
        ckpt = Path(ckpt)
        raw: dict[str, Any] = {}
        for name in ("config.json", "preprocessor_config.json", "processor_config.json"):
            path = ckpt / name
            if path.is_file():
                try:
                    data = json.loads(path.read_text(encoding="utf-8"))
                except (OSError, ValueError) as e:
                    raise ConfigError(f"{path}: cannot read ({e})") from None
                if not isinstance(data, dict):
                    raise ConfigError(f"{path}: expected a JSON object")
                raw.update(data)
                raw.update(data.get("image_processor") or {})
        return cls.from_dict({**raw, **overrides})

    def with_budget(self, min_image_tokens: int | None = None, max_image_tokens: int | None = None,
                    splitting: bool | None = None) -> ImageProcessor:
        """A copy with the speed/quality dial turned (None keeps a setting), checked as a new one is."""
        given = {"min_image_tokens": min_image_tokens, "max_image_tokens": max_image_tokens,
                 "do_image_splitting": splitting}
        return dataclasses.replace(self, **{k: v for k, v in given.items() if v is not None})

    @property
    def max_num_patches(self) -> int:
        """Patches every tile is padded to: the most a thumbnail or a tile can have."""
        tile = (self.tile_size // self.encoder_patch_size) ** 2 if self.do_image_splitting else 0
        return max(self.max_image_tokens * self.downsample_factor**2, tile)

    # -- sizes ---------------------------------------------------------------------------------

    def smart_resize(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) with sides multiples of patch*factor and tokens within [min, max] (`smart_resize`)."""
        unit = self.encoder_patch_size * self.downsample_factor
        per_token = self.encoder_patch_size**2 * self.downsample_factor**2
        min_pixels, max_pixels = self.min_image_tokens * per_token, self.max_image_tokens * per_token
        h, w = max(unit, _round_by(height, unit)), max(unit, _round_by(width, unit))
        if h * w > max_pixels:
            beta = math.sqrt(height * width / max_pixels)
            h = max(unit, math.floor(height / beta / unit) * unit)
            w = max(unit, math.floor(width / beta / unit) * unit)
        elif h * w < min_pixels:
            beta = math.sqrt(min_pixels / (height * width))
            h = math.ceil(height * beta / unit) * unit
            w = math.ceil(width * beta / unit) * unit
        return h, w

    def too_large(self, height: int, width: int) -> bool:
        """Whether an image needs tiles (`_is_image_too_large`; note its odd `max(patch, ...)`, kept as is)."""
        unit = self.encoder_patch_size * self.downsample_factor
        h = max(self.encoder_patch_size, _round_by(height, unit))
        w = max(self.encoder_patch_size, _round_by(width, unit))
        limit = self.max_image_tokens * self.encoder_patch_size**2 * self.downsample_factor**2
        return h * w > limit * self.max_pixels_tolerance

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """(columns, rows) of tiles whose aspect ratio is closest to the image's (`find_closest_aspect_ratio`):
        among equally close ones, a later (more tiles) grid wins if the image covers over half its area."""
        ratios = sorted({(w, h) for n in range(self.min_tiles, self.max_tiles + 1) for w in range(1, n + 1)
                         for h in range(1, n + 1) if self.min_tiles <= w * h <= self.max_tiles},
                        key=lambda r: r[0] * r[1])
        aspect = width / height
        best, best_diff = (1, 1), float("inf")
        for r in ratios:
            diff = abs(aspect - r[0] / r[1])
            if diff < best_diff:
                best, best_diff = r, diff
            elif diff == best_diff and width * height > 0.5 * self.tile_size**2 * r[0] * r[1]:
                best = r
        return best

    # -- pixels --------------------------------------------------------------------------------

    def __call__(self, image: Any) -> ImageLayout:
        """Preprocess one image (a PIL image, or anything `load_image` takes)."""
        pixels = to_tensor(load_image(image) if not _is_pil(image) else _checked(image))  # (3, H, W) uint8
        _, height, width = pixels.shape
        split = self.do_image_splitting and not self.min_tiles == self.max_tiles == 1
        new_h, new_w = self.smart_resize(height, width)
        if split and self.too_large(height, width):
            cols, rows = self.grid(height, width)
            big = resize(pixels, rows * self.tile_size, cols * self.tile_size)
            t = self.tile_size
            tiles = [big[:, r * t : (r + 1) * t, c * t : (c + 1) * t] for r in range(rows) for c in range(cols)]
            if self.use_thumbnail and rows * cols != 1:
                tiles.append(resize(pixels, new_h, new_w))
        else:
            rows = cols = 1
            tiles = [resize(pixels, new_h, new_w)]
        patches, masks, shapes = zip(*(self.patchify(tile) for tile in tiles), strict=True)
        text = self.placeholder(rows, cols, new_h, new_w)
        return ImageLayout(torch.stack(patches), torch.stack(masks), torch.tensor(shapes), rows, cols, text,
                           text.count(self.image_token))

    def patchify(self, tile: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """A uint8 tile (3, H, W) -> normalized patches (max_num_patches, 3*p*p), mask, (rows, columns)."""
        p = self.encoder_patch_size
        mean = torch.tensor(self.image_mean, dtype=torch.float32)[:, None, None] * 255
        std = torch.tensor(self.image_std, dtype=torch.float32)[:, None, None] * 255
        x = (tile.float() - mean) / std
        C, H, W = x.shape
        # (C, H, W) -> (H/p, W/p, p, p, C) -> (H/p * W/p, p*p*C)
        x = x.reshape(C, H // p, p, W // p, p).permute(1, 3, 2, 4, 0).reshape((H // p) * (W // p), -1)
        # A very thin image can exceed the budget (smart_resize keeps at least one token each way); it keeps
        # all its patches here, where transformers returns more patches than its mask covers (its mask stops
        # at max_num_patches), an output its own model cannot take batched.
        n = max(self.max_num_patches, x.shape[0])
        out = torch.zeros(n, x.shape[1])
        out[: x.shape[0]] = x
        mask = torch.zeros(n, dtype=torch.int32)
        mask[: x.shape[0]] = 1
        return out, mask, (H // p, W // p)

    def placeholder(self, rows: int, cols: int, height: int, width: int) -> str:
        """The text an image's `<image>` becomes in the prompt (`Lfm2VlProcessor._build_image_tokens`)."""
        p, f = self.encoder_patch_size, self.downsample_factor
        per_tile = math.ceil((self.tile_size // p) / f) ** 2
        thumb = math.ceil((height // p) / f) * math.ceil((width // p) / f)
        special = self.use_image_special_tokens
        parts = ["<|image_start|>"] if special else []
        if rows > 1 or cols > 1:
            for r in range(rows):
                for c in range(cols):
                    if special:
                        parts.append(f"<|img_row_{r + 1}_col_{c + 1}|>")
                    parts.append(self.image_token * per_tile)
            if self.use_thumbnail:
                if special:
                    parts.append("<|img_thumbnail|>")
                parts.append(self.image_token * thumb)
        else:
            parts.append(self.image_token * thumb)
        if special:
            parts.append("<|image_end|>")
        return "".join(parts)

    def expand(self, text: str, layouts: list[ImageLayout]) -> str:
        """`text` with its i-th `<image>` replaced by image i's placeholder; the counts must agree."""
        pieces = text.split(self.image_token)
        if len(pieces) - 1 != len(layouts):
            raise GenerationError(f"the prompt has {len(pieces) - 1} {self.image_token} markers but "
                                  f"{len(layouts)} images were given")
        out = pieces[0]
        for layout, piece in zip(layouts, pieces[1:], strict=True):
            out += layout.text + piece
        return out


def batch(layouts: list[ImageLayout]) -> dict[str, torch.Tensor]:
    """The model's image inputs for these images in order: their tiles stacked (`Lfm2VlProcessor`'s output),
    padded to the longest tile (only a very thin image is longer than `max_num_patches`)."""
    n = max(x.pixel_values.shape[1] for x in layouts)
    return {
        "pixel_values": torch.cat([F.pad(x.pixel_values, (0, 0, 0, n - x.pixel_values.shape[1])) for x in layouts]),
        "pixel_attention_mask": torch.cat([F.pad(x.pixel_attention_mask, (0, n - x.pixel_attention_mask.shape[1]))
                                           for x in layouts]),
        "spatial_shapes": torch.cat([x.spatial_shapes for x in layouts]),
    }


def split_images(messages: Any, image_token: str = "<image>") -> tuple[list[dict[str, Any]], list[Any]]:
    """Chat messages with image parts -> (messages where each image part is the text `<image>`, the images in order).

    Image parts are OpenAI's `{"type": "image_url", "image_url": {"url": ...}}` (or `"image_url": "..."`)
    and transformers' `{"type": "image", "image": ...}` (also `"url"` or `"path"`); an image is then any
    reference `load_image` takes. Each becomes a text part, so any chat template that renders text parts
    places the marker where the image was (LFM2-VL's own template renders an image part as `<image>`)."""
    if not isinstance(messages, (list, tuple)):
        return messages, []
    out, images = [], []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            out.append(message)
            continue
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image_url":
                ref = part.get("image_url")
                ref = ref.get("url") if isinstance(ref, dict) else ref
            elif kind == "image":
                ref = next((part[k] for k in ("image", "url", "path") if part.get(k) is not None), None)
            else:
                parts.append(part)
                continue
            if ref is None:
                raise GenerationError(f"messages[{i}].content[{j}]: an {kind} part without an image "
                                      "(expected image_url.url, or image / url / path)")
            images.append(ref)
            parts.append({"type": "text", "text": image_token})
        out.append({**message, "content": parts})
    return out, images


def _round_by(number: float, factor: int) -> int:
    return round(number / factor) * factor


def resize(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear, antialiased resize of uint8 (3, H, W), exactly as torchvision's `resize` on a CPU: PyTorch's
    native uint8 kernel where the CPU has AVX2 (or is ARM), else float32, rounded back to uint8."""
    if pixels.shape[-2:] == (height, width):
        return pixels
    x = pixels[None].contiguous()
    if _native_uint8():
        out = F.interpolate(x, size=[height, width], mode="bilinear", align_corners=False, antialias=True)
    else:
        out = F.interpolate(x.float(), size=[height, width], mode="bilinear", align_corners=False, antialias=True)
        out = out.round_().to(torch.uint8)
    return out[0]


def _native_uint8() -> bool:
    import platform

    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in ("aarch64", "arm64")


# -- decoding ----------------------------------------------------------------------------------


def _is_pil(image: Any) -> bool:
    from PIL import Image

    return isinstance(image, Image.Image)


def _checked(image: Any) -> Any:
    """A PIL image given directly, checked like a decoded one and converted to RGB."""
    w, h = image.size
    if w <= 0 or h <= 0:
        raise GenerationError(f"the image is empty ({w} x {h} pixels)")
    if w * h > MAX_PIXELS:
        raise GenerationError(f"the image is {w} x {h} pixels, more than the {MAX_PIXELS} allowed")
    return image if image.mode == "RGB" else image.convert("RGB")


def decode_image(data: bytes, source: str = "image") -> Any:
    """Bytes of an image file -> an RGB PIL image; a clear `GenerationError` for anything else.

    The size is checked from the header before any pixel is decoded, so a small file that
    expands to gigabytes (a decompression bomb) is refused without the memory being spent."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise GenerationError(f"{source}: empty file (0 bytes), not an image")
    if len(data) > MAX_IMAGE_BYTES:
        raise GenerationError(f"{source}: {len(data)} bytes, more than the {MAX_IMAGE_BYTES} allowed for an image")
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w <= 0 or h <= 0:
                raise GenerationError(f"{source}: the image is empty ({w} x {h} pixels)")
            if w * h > MAX_PIXELS:
                raise GenerationError(f"{source}: the image is {w} x {h} pixels, more than the {MAX_PIXELS} "
                                      "allowed (a decompression bomb?)")
            im.load()
            return _checked(im)
    except UnidentifiedImageError:
        raise GenerationError(f"{source}: not an image Pillow can read (PNG, JPEG, WebP, GIF, BMP, ...)") from None
    except Image.DecompressionBombError as e:
        raise GenerationError(f"{source}: refused as a decompression bomb ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise GenerationError(f"{source}: the image cannot be decoded, truncated or corrupt ({e})") from None


def load_image(ref: Any) -> Any:
    """An RGB PIL image from a PIL image, bytes, a `data:image/...;base64,` URL, a `file://` URL or a local path.

    Remote URLs (http, https) are refused here: fetching them is the caller's decision."""
    if _is_pil(ref):
        return _checked(ref)
    if isinstance(ref, (bytes, bytearray)):
        return decode_image(bytes(ref))
    return decode_image(*image_bytes(ref))


def image_bytes(ref: str | os.PathLike) -> tuple[bytes, str]:
    """The encoded bytes of an image given as a data URL, a `file://` URL or a local path, and what to call
    it in an error (the path); nothing is decoded yet (`decode_image`). Remote URLs are refused."""
    if not isinstance(ref, (str, os.PathLike)):
        raise GenerationError(f"an image must be a path, a data URL, bytes or a PIL image, not {type(ref).__name__}")
    text = str(ref)
    if text.startswith("data:"):
        head, _, payload = text.partition(",")
        if not head.startswith("data:image/") or not head.endswith(";base64"):
            raise GenerationError(f"image data URL must be data:image/<type>;base64,..., found {head[:40]!r}")
        try:
            return base64.b64decode(payload, validate=True), "image data URL"
        except (binascii.Error, ValueError):
            raise GenerationError("image data URL: the payload is not valid base64") from None
    if text.startswith(("http://", "https://")):
        raise GenerationError(f"remote image URLs are not fetched: {text[:80]!r}; pass a local path or a data URL")
    path = Path(text.removeprefix("file://")).expanduser()
    if not path.is_file():
        raise GenerationError(f"{path}: no such image file")
    if path.stat().st_size > MAX_IMAGE_BYTES:
        raise GenerationError(f"{path}: {path.stat().st_size} bytes, more than the {MAX_IMAGE_BYTES} allowed")
    return path.read_bytes(), str(path)


def fetch_image(url: str, max_bytes: int = MAX_IMAGE_BYTES, timeout: float = 10.0) -> bytes:
    """The bytes at an http(s) `url`, at most `max_bytes` of them (a server's choice to fetch: see
    `lfm2 serve --remote-images`). Read in pieces, so a huge or endless body stops at the limit."""
    import urllib.error
    import urllib.request

    if not url.startswith(("http://", "https://")):
        raise GenerationError(f"{url[:80]!r}: only http and https image URLs are fetched")
    request = urllib.request.Request(url, headers={"User-Agent": "lfm2", "Accept": "image/*"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                raise GenerationError(f"{url[:80]}: {declared} bytes, more than the {max_bytes} allowed")
            data = bytearray()
            while chunk := response.read(1 << 16):
                data += chunk
                if len(data) > max_bytes:
                    raise GenerationError(f"{url[:80]}: more than the {max_bytes} bytes allowed")
            return bytes(data)
    except urllib.error.HTTPError as exc:
        raise GenerationError(f"{url[:80]}: the image could not be fetched (HTTP {exc.code})") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise GenerationError(f"{url[:80]}: the image could not be fetched ({reason})") from None


def to_tensor(image: Any) -> torch.Tensor:
    """RGB PIL image -> uint8 (3, H, W)."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


__all__ = ["ImageLayout", "ImageProcessor", "batch", "decode_image", "image_bytes", "load_image", "resize",
           "split_images", "to_tensor"]


class FeatureCache:
    """Encoded images (the vision tower's and projector's output) by content digest, least recently
    used dropped first once `max_bytes` is passed (0 keeps nothing), so a follow-up turn about the
    same image, or the `n` choices of one request, do not encode it again. Shared by the engine's
    thread and callers' threads: a lock guards it (encoding runs outside it)."""

    def __init__(self, max_bytes: int = DEFAULT_FEATURE_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def stats(self) -> dict[str, int]:
        return {"entries": len(self._items), "bytes": self.bytes, "max_bytes": self.max_bytes,
                "hits": self.hits, "misses": self.misses}

    def get(self, layouts: list[ImageLayout], encode: Callable[[list[ImageLayout]], list[torch.Tensor]]
            ) -> list[torch.Tensor]:
        """Each layout's features, encoding (in one `encode` call) those not kept."""
        with self._lock:
            found = {x.digest: self._items.get(x.digest) for x in layouts}
            for d, t in found.items():
                if t is not None:
                    self._items.move_to_end(d)
        missing = list({x.digest: x for x in layouts if found[x.digest] is None}.values())
        with self._lock:
            self.hits += len(layouts) - len(missing)
            self.misses += len(missing)
        if missing:
            for x, t in zip(missing, encode(missing), strict=True):
                found[x.digest] = t
                self._put(x.digest, t)
        return [found[x.digest] for x in layouts]

    def _put(self, digest: bytes, features: torch.Tensor) -> None:
        size = features.numel() * features.element_size()
        with self._lock:
            if size > self.max_bytes or digest in self._items:
                return
            self._items[digest] = features
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self.bytes -= old.numel() * old.element_size()
