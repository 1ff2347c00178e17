"""mmproj files: LFM2-VL's vision part as llama.cpp keeps it, in a GGUF file beside the text model's.

llama.cpp runs LFM2-VL as two files: the language model as an ordinary `lfm2` GGUF (`lfm2.gguf`
writes it from a VL checkpoint too) and an "mmproj" file (`general.architecture` "clip",
`general.type` "mmproj", `clip.projector_type` "lfm2") holding the SigLIP2 tower, the projector and
some preprocessing settings. `export_mmproj` writes one as llama.cpp's `convert_hf_to_gguf.py --mmproj`
does (its `LFM2VLModel` over `MmprojModel`): the same keys with the same value types, the same tensor
names, shapes and types. `load_mmproj` reads one (ours or llama.cpp's) into an
`Lfm2VlForConditionalGeneration` around a GGUF language model, with its `ImageProcessor`.

What the file holds, and where llama.cpp's reading differs from transformers:
- `clip.vision.*`: the tower's width, MLP width, block and head counts, layer-norm epsilon, patch
  size, `projection_dim` (the text model's width), `image_mean` / `image_std`, and
  `projector.scale_factor` (the pixel-unshuffle factor); `clip.use_gelu` (the tower's MLP is GELU,
  which ggml computes with the tanh approximation, SigLIP2's own `gelu_pytorch_tanh`);
  `clip.vision.image_size` is the constant 256 the converter writes (NaFlex images have no fixed size);
- the patch embedding is a conv kernel (hidden, 3, p, p); ours is a linear layer over patches
  flattened as (row, column, channel), so it is permuted both ways. The position table is always
  F32 and the patch kernel F32 unless the file is F16 (the converter's `tensor_force_quant`); norms
  and biases F32; the other matrices of the file's type, F16 where rows do not split into Q8_0 blocks;
- not in the file: the `<image>` token id (read from the text model's vocabulary); the token budget
  and tiling, which llama.cpp hard-codes from the released `processor_config.json` (64-256 tokens,
  512-pixel tiles, 2-10 of them, tolerance 2: `ImageProcessor`'s defaults); the projector's
  activation: llama.cpp's graph applies ggml's tanh-approximated GELU, and lfm2 reads the file with
  the exact GELU that transformers and the released checkpoints use (`projector_hidden_act` "gelu"),
  so it gives the checkpoint's logits where llama.cpp's differ slightly. The projector LayerNorm's
  epsilon is 1e-5 on both sides (`nn.LayerNorm`'s default, a constant in llama.cpp's graph).

`MMPROJ_TABLE` is the one place where mmproj tensor names meet ours.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

import gguf
import torch
from safetensors import safe_open

from lfm2.config import ModelConfig
from lfm2.errors import CheckpointError, ConfigError
from lfm2.gguf import ARCHITECTURES, GGMLType, GGUFFile, check_type, write_gguf_file
from lfm2.images import ImageProcessor
from lfm2.models.lfm2_vl import Lfm2VlForConditionalGeneration, VlConfig, is_vl_config
from lfm2.models.siglip2 import VisionConfig
from lfm2.weights import resolve_checkpoint, tensor_table

ARCH = "clip"
PROJECTOR_TYPE = "lfm2"
IMAGE_TOKEN = "<image>"
# `clip.vision.image_size`: llama.cpp's converter writes this constant for LFM2-VL (NaFlex has no image size).
IMAGE_SIZE = 256
# `export_mmproj(type=...)`: the type of the weight matrices, and the `general.file_type` it sets.
MMPROJ_TYPES = {"f32": GGMLType.F32, "f16": GGMLType.F16, "bf16": GGMLType.BF16, "q8_0": GGMLType.Q8_0}
_FILE_TYPES = {GGMLType.F32: gguf.LlamaFileType.ALL_F32, GGMLType.F16: gguf.LlamaFileType.MOSTLY_F16,
               GGMLType.BF16: gguf.LlamaFileType.MOSTLY_BF16, GGMLType.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0}
# Activations as llama.cpp's keys name them: `clip.use_gelu` is ggml's GELU, the tanh approximation.
_TANH_GELU = ("gelu_pytorch_tanh", "gelu_new")
_PROJECTOR_ACTS = ("gelu", *_TANH_GELU)

_TOWER = "model.vision_tower."
_PROJ = "model.multi_modal_projector."
# (mmproj name, our name in `Lfm2VlForConditionalGeneration`, which models have it): "model" every
# one, "block" every tower block `{i}`, "layernorm" a projector with its LayerNorm.
MMPROJ_TABLE: tuple[tuple[str, str, str], ...] = (
    ("v.patch_embd.weight", _TOWER + "embeddings.patch_embedding.weight", "model"),
    ("v.patch_embd.bias", _TOWER + "embeddings.patch_embedding.bias", "model"),
    ("v.position_embd.weight", _TOWER + "embeddings.position_embedding.weight", "model"),
    ("v.blk.{i}.ln1.weight", _TOWER + "encoder.layers.{i}.layer_norm1.weight", "block"),
    ("v.blk.{i}.ln1.bias", _TOWER + "encoder.layers.{i}.layer_norm1.bias", "block"),
    ("v.blk.{i}.attn_q.weight", _TOWER + "encoder.layers.{i}.self_attn.q_proj.weight", "block"),
    ("v.blk.{i}.attn_q.bias", _TOWER + "encoder.layers.{i}.self_attn.q_proj.bias", "block"),
    ("v.blk.{i}.attn_k.weight", _TOWER + "encoder.layers.{i}.self_attn.k_proj.weight", "block"),
    ("v.blk.{i}.attn_k.bias", _TOWER + "encoder.layers.{i}.self_attn.k_proj.bias", "block"),
    ("v.blk.{i}.attn_v.weight", _TOWER + "encoder.layers.{i}.self_attn.v_proj.weight", "block"),
    ("v.blk.{i}.attn_v.bias", _TOWER + "encoder.layers.{i}.self_attn.v_proj.bias", "block"),
    ("v.blk.{i}.attn_out.weight", _TOWER + "encoder.layers.{i}.self_attn.out_proj.weight", "block"),
    ("v.blk.{i}.attn_out.bias", _TOWER + "encoder.layers.{i}.self_attn.out_proj.bias", "block"),
    ("v.blk.{i}.ln2.weight", _TOWER + "encoder.layers.{i}.layer_norm2.weight", "block"),
    ("v.blk.{i}.ln2.bias", _TOWER + "encoder.layers.{i}.layer_norm2.bias", "block"),
    ("v.blk.{i}.ffn_up.weight", _TOWER + "encoder.layers.{i}.mlp.fc1.weight", "block"),
    ("v.blk.{i}.ffn_up.bias", _TOWER + "encoder.layers.{i}.mlp.fc1.bias", "block"),
    ("v.blk.{i}.ffn_down.weight", _TOWER + "encoder.layers.{i}.mlp.fc2.weight", "block"),
    ("v.blk.{i}.ffn_down.bias", _TOWER + "encoder.layers.{i}.mlp.fc2.bias", "block"),
    ("v.post_ln.weight", _TOWER + "post_layernorm.weight", "model"),
    ("v.post_ln.bias", _TOWER + "post_layernorm.bias", "model"),
    ("mm.input_norm.weight", _PROJ + "layer_norm.weight", "layernorm"),
    ("mm.input_norm.bias", _PROJ + "layer_norm.bias", "layernorm"),
    ("mm.1.weight", _PROJ + "linear_1.weight", "model"),
    ("mm.1.bias", _PROJ + "linear_1.bias", "model"),
    ("mm.2.weight", _PROJ + "linear_2.weight", "model"),
    ("mm.2.bias", _PROJ + "linear_2.bias", "model"),
)
_PATCH = "v.patch_embd.weight"


def mmproj_plan(config: VlConfig) -> list[tuple[str, str]]:
    """(mmproj name, our name) of every tensor of the vision part of a model of this config, in the
    table's order with the tower's blocks one after the other."""
    block = [(gname, ours) for gname, ours, where in MMPROJ_TABLE if where == "block"]
    plan = []
    for gname, ours, where in MMPROJ_TABLE:
        if (gname, ours) == block[0]:
            plan += [(g.format(i=i), o.format(i=i)) for i in range(config.vision.num_hidden_layers) for g, o in block]
        elif where == "model" or (where == "layernorm" and config.projector_use_layernorm):
            plan.append((gname, ours))
    return plan


def _patch_to_gguf(t: torch.Tensor, p: int) -> torch.Tensor:
    # (hidden, p*p*3), patches flattened as (row, column, channel) -> the conv kernel (hidden, 3, p, p)
    return t.reshape(t.shape[0], p, p, -1).permute(0, 3, 1, 2)


def _patch_to_ours(t: torch.Tensor) -> torch.Tensor:
    # (hidden, 3, p, p) -> (hidden, p*p*3)
    return t.permute(0, 2, 3, 1).reshape(t.shape[0], -1)


def _tensor_type(gname: str, shape: tuple[int, ...], wanted: GGMLType) -> GGMLType:
    """The type of one tensor, by llama.cpp's converter's rules for mmproj files."""
    if len(shape) <= 1 or gname.endswith("_norm.weight") or gname == "v.position_embd.weight":
        return GGMLType.F32
    if gname == _PATCH:  # `MmprojModel.tensor_force_quant`: F16 in F16 files, else F32
        return GGMLType.F16 if wanted == GGMLType.F16 else GGMLType.F32
    if shape[-1] % gguf.GGML_QUANT_SIZES[wanted][0]:
        return GGMLType.F16  # rows that do not split into blocks: the converter falls back to F16
    return wanted


# -- writing ---------------------------------------------------------------------------------------


def _vl_config(src: Path) -> tuple[VlConfig, dict[str, Any]]:
    path = src / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read ({e})") from None
    if not isinstance(raw, dict) or not is_vl_config(raw):
        kind = raw.get("model_type") if isinstance(raw, dict) else None
        raise ConfigError(f"{path}: model_type {kind!r} is not LFM2-VL (lfm2_vl); only a vision checkpoint has an "
                          "mmproj part")
    return VlConfig.from_dict(raw, source=str(path)), raw


def _check_exportable(config: VlConfig, raw: dict[str, Any], src: Path) -> None:
    """Refuse what llama.cpp's LFM2-VL graph cannot run, rather than write a file it runs wrongly."""
    problems = []
    if config.vision.num_channels != 3:
        problems.append(f"vision_config num_channels is {config.vision.num_channels} (llama.cpp reads RGB images)")
    if config.vision.hidden_act not in _TANH_GELU:
        problems.append(f"vision_config hidden_act is {config.vision.hidden_act!r} (llama.cpp's tower computes "
                        "the tanh-approximated GELU)")
    if config.projector_hidden_act not in _PROJECTOR_ACTS:
        problems.append(f"projector_hidden_act is {config.projector_hidden_act!r} (llama.cpp's projector is GELU)")
    if not config.projector_bias:
        problems.append("projector_bias is false (llama.cpp's LFM2 projector needs its biases)")
    layer = raw.get("vision_feature_layer", -1)
    if layer not in (None, -1):
        problems.append(f"vision_feature_layer is {layer!r} (transformers' LFM2-VL uses the last layer's output, "
                        "which llama.cpp reads only as -1)")
    if problems:
        raise ConfigError(f"{src / 'config.json'}: cannot write an mmproj file that llama.cpp would run correctly: "
                          + "; ".join(problems))


def default_mmproj_path(model_path: str | os.PathLike) -> Path:
    """Where the mmproj file of a text GGUF goes by default: `mmproj-<its name>` beside it."""
    path = Path(model_path)
    return path.with_name(f"mmproj-{path.name}")


def export_mmproj(src: str | os.PathLike, out_path: str | os.PathLike, type: str = "f16",
                  progress: bool = True) -> Path:
    """Write the vision part of an LFM2-VL checkpoint (directory or hub id) as an mmproj GGUF file.

    `type` is the type of the weight matrices: f32, f16 (default), bf16 or q8_0, the types llama.cpp's
    converter offers. The file is written beside `out_path` under a temporary name and renamed into
    place when complete. Pair it with the text model `lfm2.gguf.export_gguf` writes from the same checkpoint.
    """
    wanted = MMPROJ_TYPES.get(str(type).lower())
    if wanted is None:
        raise ConfigError(f"unknown mmproj type {type!r}; choose one of {', '.join(MMPROJ_TYPES)}")
    src_dir = resolve_checkpoint(src)
    out = Path(out_path)
    if out.is_dir():
        raise ConfigError(f"{out}: is a directory; give the path of the mmproj .gguf file to write")
    config, raw = _vl_config(src_dir)
    _check_exportable(config, raw, src_dir)
    processor = ImageProcessor.from_dir(src_dir)
    for name in ("image_mean", "image_std"):
        values = getattr(processor, name)
        if not isinstance(values, (list, tuple)) or len(values) != 3:
            raise ConfigError(f"{src_dir}: the image processor's {name} is {values!r}, expected 3 numbers (RGB)")

    # Every source tensor present with the right shape, before anything is written. Checkpoints name
    # the tower `model.vision_tower.vision_model.*` (transformers 4, the released files) or without
    # `vision_model` (transformers 5): `sanitize` maps both to ours.
    table = tensor_table(src_dir)
    with torch.device("meta"):
        model = Lfm2VlForConditionalGeneration(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    renames = model.sanitize(list(table))
    stored = {renames.get(name, name): name for name in table if renames.get(name, name) is not None}
    plan = mmproj_plan(config)
    for _, ours in plan:
        if ours not in stored:
            raise CheckpointError(f"{src_dir}: missing tensor {ours!r}; the checkpoint does not match config.json")
        found = tuple(table[stored[ours]][1]["shape"])
        if found != expected[ours]:
            raise CheckpointError(f"{table[stored[ours]][0]}: tensor {stored[ours]!r} has shape {list(found)}, "
                                  f"expected {list(expected[ours])} from config.json")

    p = config.vision.patch_size
    w = gguf.GGUFWriter(path=None, arch=ARCH)
    w.add_type(gguf.GGUFType.MMPROJ)
    w.add_name(src_dir.name if Path(src).is_dir() else str(src).rstrip("/").split("/")[-1])
    w.add_size_label(gguf.size_label(sum(math.prod(expected[ours]) for _, ours in plan), 0, 0, 0))
    w.add_file_type(_FILE_TYPES[wanted])
    # The keys in the converter's order and value types (uint32 counts, float32 epsilon and means).
    w.add_bool("clip.has_vision_encoder", True)
    w.add_uint32("clip.vision.projection_dim", config.text.hidden_size)
    w.add_uint32("clip.vision.image_size", IMAGE_SIZE)
    w.add_uint32("clip.vision.patch_size", p)
    w.add_uint32("clip.vision.embedding_length", config.vision.hidden_size)
    w.add_uint32("clip.vision.feed_forward_length", config.vision.intermediate_size)
    w.add_uint32("clip.vision.block_count", config.vision.num_hidden_layers)
    w.add_uint32("clip.vision.attention.head_count", config.vision.num_attention_heads)
    w.add_array("clip.vision.image_mean", [float(x) for x in processor.image_mean])
    w.add_array("clip.vision.image_std", [float(x) for x in processor.image_std])
    w.add_string("clip.projector_type", PROJECTOR_TYPE)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", config.vision.layer_norm_eps)
    w.add_uint32("clip.vision.projector.scale_factor", config.downsample_factor)
    w.add_bool("clip.use_gelu", True)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tensors = []
    for gname, ours in plan:
        shape = expected[ours]
        if gname == _PATCH:
            shape = (shape[0], config.vision.num_channels, p, p)
        tensors.append((gname, shape, _tensor_type(gname, shape, wanted), ours))
    with ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(str(f), framework="pt"))
                   for f in {table[stored[ours]][0] for _, ours in plan}}

        def read(gname: str, ours: str) -> torch.Tensor:
            t = handles[table[stored[ours]][0]].get_tensor(stored[ours]).float()
            return _patch_to_gguf(t, p) if gname == _PATCH else t

        return write_gguf_file(w, out, tensors, read, progress, "mmproj file")


# -- reading ---------------------------------------------------------------------------------------


def _value(f: GGUFFile, key: str, kind: type, default: Any = ...) -> Any:
    if key not in f.metadata:
        if default is not ...:
            return default
        raise ConfigError(f"{f.path}: metadata key {key!r} is missing; llama.cpp's converter writes it in an "
                          "LFM2-VL mmproj file (re-convert it)")
    value = f.metadata[key]
    accepted = (int, float) if kind is float else kind
    if not isinstance(value, accepted) or (kind is not bool and isinstance(value, bool)):
        raise ConfigError(f"{f.path}: metadata key {key!r} is {value!r:.100}, expected {kind.__name__}")
    return value


def check_is_lfm2_mmproj(f: GGUFFile) -> None:
    """Refuse a file that is not an LFM2-VL mmproj: a text model, another architecture or projector."""
    arch = f.metadata.get("general.architecture")
    if arch in ARCHITECTURES:
        raise ConfigError(
            f"{f.path}: this is a text model GGUF (architecture {arch!r}), not an mmproj file; pass the mmproj "
            "file that holds the vision part (`lfm2 convert` writes mmproj-<name>.gguf beside the text model "
            "of an LFM2-VL checkpoint; llama.cpp's convert_hf_to_gguf.py writes one with --mmproj)"
        )
    if arch != ARCH:
        raise ConfigError(f"{f.path}: architecture {arch!r} (metadata key 'general.architecture') is not an mmproj "
                          f"file's ({ARCH!r}); pass the mmproj .gguf of an LFM2-VL model")
    kind = f.metadata.get("general.type", "mmproj")
    if kind != "mmproj":
        raise ConfigError(f"{f.path}: general.type is {kind!r}, not 'mmproj'")
    projector = f.metadata.get("clip.projector_type", f.metadata.get("clip.vision.projector_type"))
    if projector != PROJECTOR_TYPE:
        raise ConfigError(
            f"{f.path}: projector type {projector!r} (metadata key 'clip.projector_type') is not LFM2-VL's "
            f"({PROJECTOR_TYPE!r}): this mmproj belongs to another model family; pass the one converted from "
            "the same LFM2-VL checkpoint as the text model"
        )
    if not f.metadata.get("clip.has_vision_encoder", False):
        raise ConfigError(f"{f.path}: the mmproj file has no vision encoder (clip.has_vision_encoder is not true)")


def vl_config_from_mmproj(f: GGUFFile, text: ModelConfig, image_token_id: int) -> VlConfig:
    """The LFM2-VL config an mmproj file describes (metadata and tensor shapes), around `text`."""
    if "v.position_embd.weight" not in f.tensors or "mm.1.weight" not in f.tensors:
        missing = "v.position_embd.weight" if "v.position_embd.weight" not in f.tensors else "mm.1.weight"
        raise CheckpointError(f"{f.path}: tensor {missing!r} is missing; every LFM2-VL mmproj file has it")
    act = ("gelu_pytorch_tanh" if f.metadata.get("clip.use_gelu") else
           "silu" if f.metadata.get("clip.use_silu") else "quick_gelu")  # clip.cpp's choice among the three
    try:
        vision = VisionConfig(
            hidden_size=_value(f, "clip.vision.embedding_length", int),
            intermediate_size=_value(f, "clip.vision.feed_forward_length", int),
            num_hidden_layers=_value(f, "clip.vision.block_count", int),
            num_attention_heads=_value(f, "clip.vision.attention.head_count", int),
            patch_size=_value(f, "clip.vision.patch_size", int),
            num_patches=f.tensors["v.position_embd.weight"].shape[0],
            hidden_act=act,
            layer_norm_eps=float(_value(f, "clip.vision.attention.layer_norm_epsilon", float)),
        )
        return VlConfig(
            text=text, vision=vision, image_token_id=image_token_id, projector_hidden_act="gelu",
            projector_hidden_size=f.tensors["mm.1.weight"].shape[0], projector_bias=True,
            projector_use_layernorm="mm.input_norm.weight" in f.tensors,
            downsample_factor=_value(f, "clip.vision.projector.scale_factor", int, 2),
        )
    except ConfigError as e:
        raise ConfigError(f"{f.path}: the metadata describes an invalid vision model: {e}") from None


def image_processor_from_mmproj(f: GGUFFile, config: VlConfig) -> ImageProcessor:
    """The preprocessing llama.cpp applies with this file: its patch size, unshuffle factor, mean and std,
    and the token budget and tiling it hard-codes for LFM2-VL (`ImageProcessor`'s defaults)."""
    stats = {}
    for name in ("image_mean", "image_std"):
        values = f.metadata.get(f"clip.vision.{name}")
        if (not isinstance(values, list) or len(values) != 3
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
            raise ConfigError(f"{f.path}: metadata key 'clip.vision.{name}' is {values!r:.100}, expected 3 numbers")
        stats[name] = [float(v) for v in values]
    if any(v <= 0 for v in stats["image_std"]):
        raise ConfigError(f"{f.path}: metadata key 'clip.vision.image_std' is {stats['image_std']}, not positive")
    return ImageProcessor(downsample_factor=config.downsample_factor, encoder_patch_size=config.vision.patch_size,
                          **stats)


def processor_config(processor: ImageProcessor) -> dict[str, Any]:
    """A `processor_config.json` (transformers 5's layout) holding `processor`'s settings."""
    settings = {k: v for k, v in asdict(processor).items() if k not in ("image_token", "use_image_special_tokens")}
    return {"image_processor": {"image_processor_type": "Lfm2VlImageProcessorFast", **settings},
            "processor_class": "Lfm2VlProcessor"}


def _checked_tensors(f: GGUFFile, config: VlConfig) -> list[tuple[str, str]]:
    """The plan for this file, every tensor's presence, shape and type checked; nothing is read before."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Lfm2VlForConditionalGeneration(config).state_dict().items()}
    plan = mmproj_plan(config)
    for gname, ours in plan:
        if gname not in f.tensors:
            raise CheckpointError(f"{f.path}: tensor {gname!r} is missing; it holds our {ours!r}, which a model with "
                                  "this metadata has")
        want = shapes[ours]
        if gname == _PATCH:
            want = (want[0], config.vision.num_channels, config.vision.patch_size, config.vision.patch_size)
        info = f.tensors[gname]
        if info.shape != want:
            raise CheckpointError(f"{f.path}: tensor {gname!r} has shape {list(info.shape)}, expected {list(want)} "
                                  f"from the metadata (it holds our {ours!r})")
        check_type(f.path, info)
    known = {g for g, _ in plan}
    # A converter that drops the tower's last blocks (`vision_feature_layer` -2 ...) lowers block_count and
    # keeps their tensors; llama.cpp ignores them, and so do we.
    extra = [n for n in f.tensors if n not in known
             and not (n.startswith("v.blk.") and n.split(".")[2].isdigit()
                      and int(n.split(".")[2]) >= config.vision.num_hidden_layers)]
    if extra:
        more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
        raise CheckpointError(f"{f.path}: unexpected tensor(s) {', '.join(map(repr, extra[:5]))}{more}: not part "
                              "of an LFM2-VL vision tower and projector")
    return plan


def load_mmproj(path: str | os.PathLike | GGUFFile, language: torch.nn.Module, text: ModelConfig, tokenizer: Any,
                dtype: torch.dtype, device: torch.device | str = "cpu", text_path: str | os.PathLike | None = None,
                ) -> tuple[Lfm2VlForConditionalGeneration, ImageProcessor]:
    """The LFM2-VL model made of a GGUF language model (`language`, of config `text`, perhaps quantized)
    and an mmproj file's vision tower and projector (in `dtype`), and the file's preprocessing.

    The `<image>` token id comes from `tokenizer` (the text model's vocabulary). The file is checked
    first: an mmproj of LFM2-VL (not a text model, not another projector), projecting to the text
    model's width, every tensor present with its shape."""
    f = path if isinstance(path, GGUFFile) else GGUFFile(path)
    check_is_lfm2_mmproj(f)
    where = text_path or "the text model"
    width = _value(f, "clip.vision.projection_dim", int)
    if width != text.hidden_size:
        raise ConfigError(
            f"{f.path}: it projects images to width {width} (clip.vision.projection_dim) but {where} has hidden "
            f"size {text.hidden_size}: the two files come from different models; pass the mmproj converted from "
            "the same LFM2-VL checkpoint as the text model"
        )
    image_id = tokenizer.token_to_id(IMAGE_TOKEN) if tokenizer is not None else None
    if image_id is None:
        raise ConfigError(f"{where}: its vocabulary has no {IMAGE_TOKEN!r} token, so it is not an LFM2-VL language "
                          f"model; pass the text GGUF converted from the same LFM2-VL checkpoint as {f.path}")
    config = vl_config_from_mmproj(f, text, image_id)
    plan = _checked_tensors(f, config)
    processor = image_processor_from_mmproj(f, config)
    with torch.device("meta"):
        model = Lfm2VlForConditionalGeneration(config, language=language)
    state = {}
    for gname, ours in plan:
        t = f.tensor(gname)
        state[ours] = (_patch_to_ours(t) if gname == _PATCH else t).to(device=device, dtype=dtype)
    model.load_state_dict(state, strict=False, assign=True)
    left = [n for n, t in model.state_dict(keep_vars=True).items() if t.is_meta]
    if left:  # cannot happen after _checked_tensors; a guard against mapping bugs
        raise CheckpointError(f"{f.path}: internal mapping error (unset {left[:3]})")
    return model.eval(), processor


__all__ = ["MMPROJ_TABLE", "MMPROJ_TYPES", "check_is_lfm2_mmproj", "default_mmproj_path", "export_mmproj",
           "image_processor_from_mmproj", "load_mmproj", "mmproj_plan", "processor_config", "vl_config_from_mmproj"]
