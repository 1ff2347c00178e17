"""Random-weight checkpoints of the released shapes, written tensor by tensor: what `lfm2 bench` measures.

Speed depends on shapes, not values, so the bench needs no download: it writes a checkpoint of a
preset's exact shapes (`lfm2.config.preset`) with seeded random weights and a tokenizer covering its
vocabulary. The big presets do not fit in memory as a model (LFM2-8B-A1B is 16.6 GB in bfloat16, 33
GB in float32; this project's machine has 24 GiB), so nothing here builds one: the tensor list comes
from a meta-device model, and each tensor is drawn from its own seeded generator when its turn comes
in `lfm2.shards.write_sharded`, written into a ~2 GB shard, and dropped. The same seed gives the same
files, whatever the shard size.

Two formats:
- bfloat16 (`kind=None`), as Hugging Face publishes the models: lfm2, transformers and `lfm2 convert`
  read it; `lfm2 quantize` makes the int8 / int4 checkpoints from it;
- `kind="int4"` (or "int8"): lfm2's quantized checkpoint (`lfm2.quant`'s format and config entry) with
  random packed weights, for a model whose bfloat16 files the disk cannot hold (LFM2-24B-A2B: 48 GB of
  bfloat16, 13.5 GB of int4).

Values follow PyTorch's default initialisation, so activations stay in range through the layers:
matrices uniform in +-1/sqrt(fan-in) (an embedding +-sqrt(3), unit variance), norm weights one, other
vectors zero. Quantized weights are uniform random codes with the scale that gives that spread.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import torch

from lfm2.config import ModelConfig
from lfm2.files import atomic_write
from lfm2.shards import SHARD_BYTES, write_sharded

WORDS = ("the quick brown fox jumps over a lazy dog while liquid models run fast on small devices and "
         "numbers like 12345 or 3.14159 appear in text").split()
# Standard deviation of a uniform random int4 code (-8..7) and int8 code (-127..127).
_CODE_STD = {4: math.sqrt((16**2 - 1) / 12), 8: math.sqrt((255**2 - 1) / 12)}


def write_random_checkpoint(config: ModelConfig, out: Path, kind: str | None = None, seed: int = 0,
                            shard_bytes: int = SHARD_BYTES, verbose: bool = False) -> Path:
    """Write a random checkpoint of `config` into `out`: bfloat16 shards, or `kind` ("int4"/"int8") packed.

    The tokenizer (a small trained BPE padded with plain added tokens to `vocab_size`) and the weights
    are written first, config.json last: a folder with config.json is complete (`is_complete`)."""
    from lfm2.models import build_model, cast_model
    from lfm2.quant import quantization_info, quantized_layout

    out.mkdir(parents=True, exist_ok=True)
    write_tokenizer(out, config.vocab_size)
    model = build_model(config, "meta")
    raw = config.to_dict()
    if kind is None:
        model.to(torch.bfloat16)  # every tensor, the MoE router too, as Hugging Face's files store it
        raw["torch_dtype"] = "bfloat16"
    else:  # as `lfm2 quantize` writes a bfloat16 checkpoint: the router and expert bias float32
        cast_model(model, torch.bfloat16)
        emb_kind = "int8" if kind == "int4" else kind
        quantized_layout(model, kind, 32, emb_kind, 32)
        raw["quantization"] = quantization_info(model)
    state = model.state_dict(keep_vars=True)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    specs = [(name, tuple(t.shape), t.dtype) for name, t in state.items()]
    layers = {name: _layer(model, name, tuple(t.shape)) for name, t in state.items()}

    def produce(name: str) -> torch.Tensor:
        t = state[name]
        return random_tensor(name, tuple(t.shape), t.dtype, *layers[name], seed)

    report = (lambda f: print(f"  wrote {out / f}", flush=True)) if verbose else None
    write_sharded(out, specs, produce, shard_bytes, progress=report)
    atomic_write(out / "config.json", json.dumps(raw, indent=2) + "\n")
    return out


def is_complete(out: Path) -> bool:
    """Whether `out` holds a finished checkpoint (config.json is written last)."""
    return (out / "config.json").is_file()


def random_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, fan_in: int, bits: int,
                  seed: int) -> torch.Tensor:
    """The tensor `name` of a random checkpoint, drawn from a generator seeded by `seed` and the name alone.

    `fan_in` is the input width of its matrix, `bits` the width of its layer's codes (0: a float tensor)."""
    g = torch.Generator().manual_seed(seed * 2**32 + zlib.crc32(name.encode()))
    leaf = name.rpartition(".")[2]
    if bits and leaf == "qweight":
        if bits == 4:  # two int4 codes per byte: every byte is valid
            return torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
        return torch.randint(-127, 128, shape, dtype=torch.int8, generator=g)
    if bits and leaf == "scales":  # codes of std _CODE_STD times this scale: the float weights' spread
        return torch.full(shape, _bound(name, fan_in) / math.sqrt(3) / _CODE_STD[bits], dtype=dtype)
    if len(shape) == 1:
        return torch.ones(shape, dtype=dtype) if name.endswith("norm.weight") else torch.zeros(shape, dtype=dtype)
    b = _bound(name, fan_in)
    return torch.empty(shape, dtype=dtype).uniform_(-b, b, generator=g)


def write_tokenizer(out: Path, vocab_size: int) -> None:
    """A small BPE trained on a few words, padded with added tokens `<tN>` to `vocab_size` ids."""
    from tokenizers import Tokenizer as HFTokenizer

    from lfm2.train.tokenizer import train_tokenizer

    corpus = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(40)) for i in range(200)]
    train_tokenizer(corpus, vocab_size=min(1000, vocab_size), out_dir=out)
    tok = HFTokenizer.from_file(str(out / "tokenizer.json"))
    tok.add_tokens([f"<t{i}>" for i in range(tok.get_vocab_size(), vocab_size)])
    atomic_write(out / "tokenizer.json", tok.to_str(pretty=True))


def _layer(model: torch.nn.Module, name: str, shape: tuple[int, ...]) -> tuple[int, int]:
    """(input width of the matrix a tensor belongs to, its layer's code bits or 0 for float)."""
    prefix, _, leaf = name.rpartition(".")
    if leaf in ("qweight", "scales"):
        layer = model.get_submodule(prefix)
        return layer.in_features, layer.bits
    return (math.prod(shape[1:]) if len(shape) > 1 else shape[0]), 0


def _bound(name: str, fan_in: int) -> float:
    return math.sqrt(3) if "embed_tokens" in name else 1 / math.sqrt(fan_in)
