"""LFM2-VL: a SigLIP2 NaFlex vision encoder, a 2x2 pixel-unshuffle, a projector, and an LFM2 language model.

As in transformers' `models/lfm2_vl/modeling_lfm2_vl.py` (`Lfm2VlForConditionalGeneration`):
- each image (or tile) goes through the vision tower (`lfm2.models.siglip2`) as patches at its own
  (rows, columns) grid;
- its hidden states, laid back out as that grid, are pixel-unshuffled: every `f x f` block of
  neighbouring patches (f = `downsample_factor`, 2) becomes one vector of f*f*C channels, so an
  image of R x W patches gives (R/f) * (W/f) tokens;
- the projector maps those to the text width: LayerNorm (optional), linear, GELU, linear;
- the prompt holds one `<image>` token (`image_token_id`) per image token; their embeddings are
  replaced by the projected features, in order, and the language model runs on the result.

The language model is lfm2's own `Lfm2ForCausalLM`, with its caches and kernels: its backbone
sits at `model.language_model` and its head at `lm_head`, the checkpoint's names, so a
`model.safetensors` loads one-to-one. `language` is a view of the same modules as a text model,
which the engine runs (on `inputs_embeds` where a prompt holds images).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from lfm2.cache import Cache
from lfm2.config import ModelConfig
from lfm2.errors import ConfigError, GenerationError
from lfm2.models.lfm2 import Lfm2ForCausalLM
from lfm2.models.siglip2 import Siglip2VisionModel, VisionConfig, activation

VL_MODEL_TYPES = ("lfm2_vl", "lfm2-vl")


@dataclass
class VlConfig:
    """An LFM2-VL `config.json` (transformers' `Lfm2VlConfig` field names)."""

    text: ModelConfig
    vision: VisionConfig = field(default_factory=VisionConfig)
    image_token_id: int = 396
    projector_hidden_act: str = "gelu"
    projector_hidden_size: int = 2560
    projector_bias: bool = True
    projector_use_layernorm: bool = True
    downsample_factor: int = 2
    model_type: str = "lfm2_vl"

    def __post_init__(self) -> None:
        activation(self.projector_hidden_act, "config projector_hidden_act")
        if self.downsample_factor < 1:
            raise ConfigError(f"config: downsample_factor must be a positive integer, found {self.downsample_factor}")
        if not 0 <= self.image_token_id < self.text.vocab_size:
            raise ConfigError(f"config: image_token_id {self.image_token_id} is outside the vocabulary "
                              f"(0..{self.text.vocab_size - 1})")

    @property
    def tie_word_embeddings(self) -> bool:
        return self.text.tie_word_embeddings

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> VlConfig:
        """Build from a `config.json` dict. The top-level `tie_word_embeddings` (or `tie_embedding`)
        decides whether `lm_head` is tied, as in transformers; released configs also say
        `image_token_index` for `image_token_id`."""
        if raw.get("model_type") not in VL_MODEL_TYPES:
            raise ConfigError(f"{source}: model_type {raw.get('model_type')!r} is not LFM2-VL ({VL_MODEL_TYPES[0]})")
        for name in ("text_config", "vision_config"):
            if not isinstance(raw.get(name), dict):
                raise ConfigError(f"{source}: LFM2-VL config needs a {name!r} object")
        text = dict(raw["text_config"])
        text.setdefault("model_type", "lfm2")
        text.pop("tie_embedding", None)
        text["tie_word_embeddings"] = raw.get("tie_embedding", raw.get("tie_word_embeddings", True))
        fields = {k: raw[k] for k in ("projector_hidden_act", "projector_hidden_size", "projector_bias",
                                      "projector_use_layernorm", "downsample_factor") if raw.get(k) is not None}
        token = raw.get("image_token_id", raw.get("image_token_index"))
        if token is not None:
            fields["image_token_id"] = token
        try:
            return cls(text=ModelConfig.from_dict(text, source=f"{source} text_config"),
                       vision=VisionConfig.from_dict(raw["vision_config"]), **fields)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None


    def to_dict(self) -> dict[str, Any]:
        """A `config.json` that both lfm2 and transformers (`Lfm2VlConfig`) read back to this config."""
        vision = {"model_type": "siglip2_vision_model", **asdict(self.vision), "vision_use_head": False}
        fields = {k: getattr(self, k) for k in ("image_token_id", "projector_hidden_act", "projector_hidden_size",
                                                 "projector_bias", "projector_use_layernorm", "downsample_factor")}
        return {"architectures": ["Lfm2VlForConditionalGeneration"], "model_type": "lfm2_vl",
                "text_config": self.text.to_dict(), "vision_config": vision, **fields,
                "tie_word_embeddings": self.text.tie_word_embeddings}


def is_vl_config(raw: dict[str, Any]) -> bool:
    return raw.get("model_type") in VL_MODEL_TYPES


class Lfm2VlMultiModalProjector(nn.Module):
    """Vision hidden states of one image laid out as its patch grid (1, R, W, C) -> text-width tokens (R/f * W/f, d)."""

    def __init__(self, config: VlConfig) -> None:
        super().__init__()
        self.factor = f = config.downsample_factor
        width = config.vision.hidden_size * f * f
        self.layer_norm = nn.LayerNorm(width) if config.projector_use_layernorm else None
        self.linear_1 = nn.Linear(width, config.projector_hidden_size, bias=config.projector_bias)
        self.act = activation(config.projector_hidden_act, "config projector_hidden_act")
        self.linear_2 = nn.Linear(config.projector_hidden_size, config.text.hidden_size, bias=config.projector_bias)

    def pixel_unshuffle(self, grid: torch.Tensor) -> torch.Tensor:
        """(R, W, C) -> (R/f * W/f, f*f*C), tokens row-major; a token's channels are its block's patches
        in row-major order (row offset, then column offset), as transformers' `pixel_unshuffle` orders them."""
        R, W, C = grid.shape
        f = self.factor
        # (R, W, C) -> (R/f, f, W/f, f, C) -> (R/f, W/f, f, f, C)
        blocks = grid.reshape(R // f, f, W // f, f, C).permute(0, 2, 1, 3, 4)
        return blocks.reshape((R // f) * (W // f), f * f * C)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        x = self.pixel_unshuffle(grid)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return self.linear_2(self.act(self.linear_1(x)))


class Lfm2VlModel(nn.Module):
    """`model.*` in the checkpoint: the vision tower, the projector and the text backbone."""

    def __init__(self, config: VlConfig, language_model: nn.Module) -> None:
        super().__init__()
        self.vision_tower = Siglip2VisionModel(config.vision)
        self.multi_modal_projector = Lfm2VlMultiModalProjector(config)
        self.language_model = language_model


class Lfm2VlForConditionalGeneration(nn.Module):
    """Token ids (B, T) and images -> logits (B, T, vocab); the arguments are transformers' and lfm2's.

    `pixel_values` (N, P, 3*p*p), `pixel_attention_mask` (N, P) and `spatial_shapes` (N, 2) hold the
    N images (tiles) of the whole batch in prompt order, as `Lfm2VlProcessor` makes them; `cache`,
    `attention_mask`, `last_only`, and for training `segment_ids` and `logits_at`, are `Lfm2ForCausalLM`'s.
    """

    # Where the embedding lives, for loading a tied head (`lfm2.weights.load_into`).
    embedding_key = "model.language_model.embed_tokens.weight"
    # What fine-tuning leaves as it is (`lfm2.lora`, `lfm2.train`): the vision side. LoRA adapts the
    # language model's projections only, and full fine-tuning trains the language model and head.
    frozen_prefixes = ("model.vision_tower.", "model.multi_modal_projector.")

    def __init__(self, config: VlConfig, language: Lfm2ForCausalLM | None = None) -> None:
        """`language`: a language model already built (a GGUF text model beside an mmproj file, perhaps
        quantized) to wrap instead of a new one; it must be of `config.text`."""
        super().__init__()
        self.config = config
        language = Lfm2ForCausalLM(config.text) if language is None else language
        self.model = Lfm2VlModel(config, language.model)
        self.lm_head = language.lm_head
        # Kept out of the module tree: it holds the same modules, which would otherwise appear in the
        # state dict twice, under a second name.
        self.__dict__["language"] = language

    language: Lfm2ForCausalLM

    @property
    def device(self) -> torch.device:
        return self.language.device

    def train(self, mode: bool = True) -> Lfm2VlForConditionalGeneration:
        """Also `language`'s own flag, which lies outside the module tree (gradient checkpointing reads it)."""
        self.language.train(mode)
        return super().train(mode)

    @property
    def dtype(self) -> torch.dtype:
        return self.language.dtype

    def make_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> Cache:
        return self.language.make_cache(batch_size, max_len, dtype)

    @staticmethod
    def released_name(name: str) -> str:
        """Our tensor name -> the released checkpoints' (the tower nested as `vision_tower.vision_model.*`,
        the layout transformers 4 and 5, llama.cpp's converter and lfm2 all read)."""
        return name.replace("model.vision_tower.", "model.vision_tower.vision_model.", 1)

    def sanitize(self, names: list[str]) -> dict[str, str]:
        """Checkpoint tensor name -> ours, for the names that differ; None drops a tensor.

        transformers before 5.x nested the tower as `vision_tower.vision_model.*` (released
        checkpoints keep that layout); SigLIP2's attention-pooling head is unused by LFM2-VL."""
        out = {}
        for name in names:
            if name.startswith("model.vision_tower.head."):
                out[name] = None
            elif name.startswith("model.vision_tower.vision_model."):
                out[name] = name.replace("model.vision_tower.vision_model.", "model.vision_tower.", 1)
        return out

    def image_features(
        self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor, spatial_shapes: torch.Tensor
    ) -> list[torch.Tensor]:
        """Each image's tokens (R/f * W/f, text hidden), in order: the embeddings its `<image>` tokens take."""
        f = self.config.downsample_factor
        shapes = spatial_shapes.tolist()
        for i, (rows, cols) in enumerate(shapes):
            if rows % f or cols % f or rows * cols > pixel_values.shape[1] or rows <= 0 or cols <= 0:
                raise GenerationError(f"image {i}: a patch grid of {rows} x {cols} does not fit: it must be positive, "
                                      f"a multiple of {f} each way and at most {pixel_values.shape[1]} patches")
        dtype = self.model.vision_tower.embeddings.patch_embedding.weight.dtype
        hidden = self.model.vision_tower(pixel_values.to(self.device, dtype), pixel_attention_mask.to(self.device),
                                         spatial_shapes)
        project = self.model.multi_modal_projector
        return [project(hidden[i, : r * c].reshape(r, c, -1)) for i, (r, c) in enumerate(shapes)]

    def embed(self, input_ids: torch.Tensor, features: list[torch.Tensor] | torch.Tensor | None) -> torch.Tensor:
        """Token embeddings (B, T, d) with the `<image>` positions (row-major) replaced by `features` in order."""
        x = self.model.language_model.embed_tokens(input_ids)
        slots = input_ids == self.config.image_token_id
        n = int(slots.sum())
        feats = torch.cat(list(features)) if features is not None and len(features) else x.new_zeros(0, x.shape[-1])
        if n != feats.shape[0]:
            raise GenerationError(f"the prompt holds {n} image tokens but the images give {feats.shape[0]} "
                                  "embeddings: the prompt and the images do not match")
        if n == 0:
            return x
        return x.masked_scatter(slots[..., None], feats.to(x.dtype))

    def prompt_embedder(self, ids: Sequence[int], sizes: Sequence[int], digests: Sequence[bytes],
                        features: Callable[[list[int]], list[torch.Tensor]]) -> PromptEmbedder:
        """The engine's `Request.embed` for a prompt whose images have `sizes[i]` tokens each and
        contents named by `digests[i]`; `features(indices)` encodes the listed images (see `PromptEmbedder`)."""
        return PromptEmbedder(self, ids, sizes, digests, features)

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        spatial_shapes: torch.Tensor | None = None,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        last_only: bool = False,
        segment_ids: torch.Tensor | None = None,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        features = None
        if pixel_values is not None:
            if pixel_attention_mask is None or spatial_shapes is None:
                raise GenerationError("pixel_values need pixel_attention_mask and spatial_shapes "
                                      "(the processor makes all three)")
            features = self.image_features(pixel_values, pixel_attention_mask, spatial_shapes)
        embeds = self.embed(input_ids, features)
        return self.language(input_ids, cache, attention_mask, last_only=last_only, segment_ids=segment_ids,
                             logits_at=logits_at, inputs_embeds=embeds)


class PromptEmbedder:
    """`embed(start, end)`: the input embeddings (1, end - start, d) of `ids[start:end]`, the image
    features placed at the `<image>` tokens in that range, so a chunked prefill may cut an image
    anywhere (`lfm2.engine.Request.embed`).

    Images are encoded lazily, only those a requested range holds: a prompt resumed from the prefix
    cache past its images never runs the vision tower. `prefetch(start)` encodes the images from
    position `start` on ahead of time (in the caller's thread, so that the engine's thread, which
    decodes other requests meanwhile, does not stall on the tower); encoded features are kept.

    `key` names the prompt's content for the prefix cache: `ids` with each image's `<image>` tokens
    replaced by one negative id drawn from its digest (a hash of its preprocessed pixels), since
    equal placeholder ids do not mean equal images while equal digests do.
    """

    def __init__(self, model: Lfm2VlForConditionalGeneration, ids: Sequence[int], sizes: Sequence[int],
                 digests: Sequence[bytes], features: Callable[[list[int]], list[torch.Tensor]]) -> None:
        self.model = model
        self.ids = list(ids)
        self.sizes = list(sizes)
        self.features = features
        self.encoded: dict[int, torch.Tensor] = {}  # image index -> its features
        slots = torch.tensor(self.ids) == model.config.image_token_id
        if int(slots.sum()) != sum(self.sizes):
            raise GenerationError(f"the prompt holds {int(slots.sum())} image tokens but the images give "
                                  f"{sum(self.sizes)} embeddings: the prompt and the images do not match")
        self.slots = slots
        self.before = torch.cumsum(slots, 0) - slots.long()  # image tokens before each position
        self.bounds = [0, *itertools.accumulate(self.sizes)]  # image i's tokens are ordinals bounds[i]:bounds[i+1]
        owner = torch.repeat_interleave(torch.arange(len(self.sizes)), torch.tensor(self.sizes, dtype=torch.long))
        names = torch.tensor([-1 - int.from_bytes(d[:8], "little") % (1 << 62) for d in digests], dtype=torch.long)
        key = torch.tensor(self.ids, dtype=torch.long)
        key[slots] = names[owner]
        self.key = key.tolist()

    def images_in(self, start: int, end: int) -> list[int]:
        """Indices of the images with tokens in `ids[start:end]`."""
        if start >= len(self.ids):
            return []
        first, n = int(self.before[start]), int(self.slots[start:end].sum())
        return [i for i in range(len(self.sizes)) if self.bounds[i] < first + n and self.bounds[i + 1] > first]

    def prefetch(self, start: int = 0) -> None:
        """Encode now the images with tokens from position `start` on."""
        self._encode(self.images_in(start, len(self.ids)))

    def _encode(self, indices: list[int]) -> list[torch.Tensor]:
        missing = [i for i in indices if i not in self.encoded]
        if missing:
            self.encoded.update(zip(missing, self.features(missing), strict=True))
        return [self.encoded[i] for i in indices]

    def __call__(self, start: int, end: int) -> torch.Tensor:
        chunk = torch.tensor([self.ids[start:end]], device=self.model.device)
        wanted = self.images_in(start, end)
        if not wanted:
            return self.model.embed(chunk, None)
        first, n = int(self.before[start]), int(self.slots[start:end].sum())
        feats = torch.cat(self._encode(wanted))
        offset = first - self.bounds[wanted[0]]
        return self.model.embed(chunk, [feats[offset : offset + n]])
