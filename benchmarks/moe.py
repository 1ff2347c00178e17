"""The MoE block at decode: the grouped expert kernel against the per-expert Python loop it replaced.

    python benchmarks/moe.py [--preset LFM2-8B-A1B] [--kind int4] [--threads 2] [--reps 5] [--rows 1 4]

The model is built in this process, not read from a file: on the meta device, then every linear
layer becomes a `QuantLinear` of random packed values (and the embedding a random int8
`QuantEmbedding`), so an 8B-A1B model costs its quantized size in memory (about 5 GB at int4) and
no float32 copy or checkpoint is ever written. Random routers choose experts about uniformly, as
trained ones are balanced to.

Engines, interleaved in each repetition (a noisy machine hurts both alike), medians reported:
- loop: `SparseMoeBlock.forward` as it was before issue #30 (torch.unique, .tolist(), and per
  chosen expert torch.where, three QuantLinear calls and an index_add);
- grouped: the block as it is (`lfm2/kernels/moe.cpp` at decode).
Timed: one decode step of only the MoE blocks (each block on its own random input rows), and
whole-model decode steps (eager, a KV cache, teacher-forced tokens after a 32-token prefill).

`--gguf PATH` also writes the model (int4 only) as a Q4_0 GGUF file, byte for byte the same blocks
(Q8_0 embedding, as `lfm2 convert` writes Q4_0 files), times the whole-model decode again on the
model lfm2 loads from that file, and with `--llama-bench BIN` runs llama.cpp's llama-bench on it:
`-p 0 -n 32 -t THREADS -r 1`, the decode speed of one sequence, in rounds alternating with lfm2's two
engines on the model lfm2 loads from the file. The file is 4.7 GB for 8B-A1B; delete it after.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np
import torch

import lfm2
from lfm2 import kernels
from lfm2.config import ModelConfig, preset
from lfm2.models import build_model
from lfm2.models.lfm2 import is_plain_linear
from lfm2.models.lfm2_moe import SparseMoeBlock
from lfm2.quant import KINDS, QuantEmbedding, QuantLinear, TiedQuantHead


def loop_forward(self: SparseMoeBlock, x: torch.Tensor) -> torch.Tensor:
    """The block's forward before issue #30: a Python loop over the experts that got tokens."""
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    chosen, weights = self.route(x)
    out = torch.zeros_like(x)
    for e in torch.unique(chosen).tolist():
        token, slot = torch.where(chosen == e)
        out.index_add_(0, token, self.experts[e](x[token]) * weights[token, slot, None].to(x.dtype))
    return out.view(shape)


class _RandomBytes:
    """Pseudo-random bytes for packed weights, fast: slices of one random pool at moving offsets.

    Drawing 5 GB with torch.randint takes minutes on 2 cores; copying from a 64 MiB pool takes
    seconds, and each layer still gets its own memory (no engine is timed on cached weights)."""

    def __init__(self, g: torch.Generator, size: int = 64 * 2**20) -> None:
        self.pool = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=g)
        self.g, self.offset = g, 0

    def take(self, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        n = shape[0] * shape[1]
        out = torch.empty(n, dtype=torch.uint8)
        for i in range(0, n, self.pool.numel()):
            chunk = min(self.pool.numel(), n - i)
            start = int(torch.randint(0, self.pool.numel() - chunk + 1, (1,), generator=self.g))
            out[i : i + chunk] = self.pool[start : start + chunk]
        return out.view(dtype).reshape(shape)


def _random_packed(n: int, k: int, bits: int, rnd: _RandomBytes) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (qweight, scales) of an (n, k) layer whose weights have a standard deviation of about 1 / sqrt(k)."""
    if bits == 4:
        q, std = rnd.take((n, k // 2), torch.uint8), 4.6  # nibbles 0..15: values -8..7
    else:
        q, std = rnd.take((n, k), torch.int8), 73.9
    scales = (torch.rand(n, k // 32, generator=rnd.g) + 0.5) / (std * k**0.5)
    return q, scales.to(torch.float16)


def random_quantized_model(name: str | ModelConfig, kind: str, seed: int = 0) -> torch.nn.Module:
    """A model of preset `name` (or of a config) with random `kind` (group 32) linear layers and an int8
    embedding, built without float32 weights: meta first, then each layer filled with random packed values."""
    config = preset(name) if isinstance(name, str) else name
    model = build_model(config, device="meta")
    rnd = _RandomBytes(torch.Generator().manual_seed(seed))
    bits = KINDS[kind]
    for mname, m in list(model.named_modules()):
        if is_plain_linear(m) and mname != "lm_head":
            parent, _, attr = mname.rpartition(".")
            setattr(model.get_submodule(parent), attr,
                    QuantLinear.from_packed(*_random_packed(m.out_features, m.in_features, bits, rnd)))
    q, s = _random_packed(config.vocab_size, config.hidden_size, 8, rnd)
    model.model.embed_tokens = QuantEmbedding.from_packed(q, (s.float() * config.hidden_size**0.5).half())
    model.lm_head = TiedQuantHead(model.model.embed_tokens)
    # The float rest (norms, conv kernels, routers, expert biases) is still on the meta device: made here, and
    # only it. (`to_empty` would remake every tensor, the random layers above too: until 2026-12-06 every
    # quantized weight of these models came out zero, every token took the same experts, and each MoE figure
    # measured on them was of that degenerate model; docs/benchmarks.md says which.)
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            for table in (m._parameters, m._buffers):
                for name, t in table.items():
                    if t is None or not t.is_meta:
                        continue
                    new = torch.empty_like(t, device="cpu")
                    if name == "weight" and isinstance(m, torch.nn.Linear):  # the routers
                        new.normal_(0, config.hidden_size**-0.5)
                    elif name == "weight" and isinstance(m, torch.nn.Conv1d):
                        new.normal_(0, 0.3)
                    elif name == "weight":  # norms
                        new.fill_(1.0)
                    else:  # expert biases
                        new.zero_()
                    is_param = isinstance(t, torch.nn.Parameter)
                    table[name] = torch.nn.Parameter(new, requires_grad=False) if is_param else new
    return model.eval()


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def time_moe_blocks(model: torch.nn.Module, rows: int, reps: int) -> dict[str, float]:
    """ms per decode step of only the MoE blocks, each on its own random (rows, 1, d) input."""
    blocks = [m for m in model.modules() if isinstance(m, SparseMoeBlock)]
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(rows, 1, model.config.hidden_size, generator=g) for _ in blocks]
    engines = {"loop": loop_forward, "grouped": SparseMoeBlock.forward}
    times: dict[str, list[float]] = {k: [] for k in engines}
    with torch.inference_mode():
        for _ in range(reps + 1):  # the first round warms up
            for label, fwd in engines.items():
                t = time.perf_counter()
                for block, x in zip(blocks, xs, strict=True):
                    fwd(block, x)
                times[label].append(time.perf_counter() - t)
    return {k: median_ms(v[1:]) for k, v in times.items()}


def time_decode(model: torch.nn.Module, rows: int, steps: int, reps: int) -> dict[str, float]:
    """ms per whole-model decode step (rows tokens each), after a 32-token prefill, loop against grouped."""
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(3, model.config.vocab_size, (rows, 32), generator=g)
    tokens = torch.randint(3, model.config.vocab_size, (rows, steps), generator=g)
    engines = {"loop": loop_forward, "grouped": SparseMoeBlock.forward}
    times: dict[str, list[float]] = {k: [] for k in engines}
    original = SparseMoeBlock.forward
    try:
        with torch.inference_mode():
            for _ in range(reps + 1):
                for label, fwd in engines.items():
                    SparseMoeBlock.forward = fwd
                    cache = model.make_cache(batch_size=rows, max_len=32 + steps)
                    model(prompt, cache, last_only=True)
                    t = time.perf_counter()
                    for i in range(steps):
                        model(tokens[:, i : i + 1], cache)
                    times[label].append((time.perf_counter() - t) / steps)
    finally:
        SparseMoeBlock.forward = original
    return {k: median_ms(v[1:]) for k, v in times.items()}


def gguf_blocks(layer: QuantLinear) -> np.ndarray:
    """A group-32 QuantLinear's weight as GGUF Q4_0 / Q8_0 bytes (N, blocks * (2 + 16 or 32)): the
    layout of `lfm2.quant`, with each block's float16 scale put back in front of its values."""
    n, nb = layer.scales.shape
    scales = layer.scales.contiguous().view(torch.uint8).reshape(n, nb, 2)
    return torch.cat([scales, layer.qweight.view(torch.uint8).reshape(n, nb, -1)], dim=-1).reshape(n, -1).numpy()


def _stacked_blocks(owners: list[QuantLinear]) -> np.ndarray:
    return np.stack([gguf_blocks(m) for m in owners]) if len(owners) > 1 else gguf_blocks(owners[0])


def write_gguf(model: torch.nn.Module, out: Path) -> Path:
    """The random int4 model as a Q4_0 GGUF file llama.cpp runs, with a byte-level BPE vocabulary
    trained here (as `lfm2.bench.random_checkpoint` makes one). Uses lfm2.gguf's own name table and
    metadata writer, so the file is what `lfm2 convert --type q4_0` would write for these weights."""
    from lfm2.files import atomic_path
    from lfm2.gguf import GGUF_ARCH, GGMLType, _gguf_shape, _tensor_type, _vocab_metadata, _write_metadata, tensor_plan
    from lfm2.random_checkpoint import write_tokenizer

    config = model.config
    with tempfile.TemporaryDirectory() as tok_dir:
        write_tokenizer(Path(tok_dir), config.vocab_size)
        tokens, types, special = _vocab_metadata(Path(tok_dir), config.vocab_size)
    w = gguf.GGUFWriter(path=None, arch=GGUF_ARCH[config.model_type])
    _write_metadata(w, config, "random-" + config.model_type, GGMLType.Q4_0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("lfm2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    special.add_to_gguf(w, quiet=True)
    state = model.state_dict()
    entries = []
    for gname, ours in tensor_plan(config):
        owners = [model.get_submodule(name.rpartition(".")[0]) for name in ours]
        if isinstance(owners[0], QuantLinear):
            shape = _gguf_shape(gname, [(m.out_features, m.in_features) for m in owners])
            ttype = GGMLType.Q4_0 if owners[0].bits == 4 else GGMLType.Q8_0
            if ttype != _tensor_type(gname, shape, GGMLType.Q4_0) or owners[0].group_size != 32:
                raise SystemExit(f"{gname}: {owners[0].format_repr()} is not what a Q4_0 file holds there")
            # made when written, not here: the stacked bytes of every tensor at once would be a
            # second copy of the model (an LFM2-24B-A2B's 13.5 GB, more than this machine has left)
            data = functools.partial(_stacked_blocks, owners)
            nbytes = sum(m.qweight.numel() + 2 * m.scales.numel() for m in owners)
        else:
            t = torch.stack([state[n] for n in ours]) if len(ours) > 1 else state[ours[0]]
            t = t.squeeze(1) if gname.endswith(".shortconv.conv.weight") else t  # (d, 1, L) -> (d, L)
            shape, ttype, data = tuple(t.shape), GGMLType.F32, t.float().contiguous().numpy()
            nbytes = data.nbytes
        entries.append(data)
        w.add_tensor_info(gname, shape, np.dtype(np.float32), nbytes, ttype)
    with atomic_path(out) as tmp:
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for data in entries:
            w.write_tensor_data(data() if callable(data) else data)
        w.close()
    return out


def llama_bench(binary: str, path: Path, threads: int) -> float:
    """llama-bench's decode speed on the file: tokens/s of 32 new tokens, one sequence, one run."""
    cmd = [binary, "-m", str(path), "-p", "0", "-n", "32", "-t", str(threads), "-r", "1", "-o", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(json.loads(out)[0]["avg_ts"])


def compare_on_random_model(args: argparse.Namespace) -> None:
    """The tables: MoE blocks alone and whole decode steps, loop against grouped; writes --gguf if asked."""
    t = time.perf_counter()
    model = random_quantized_model(args.preset, args.kind)
    c = model.config
    n_moe = c.num_hidden_layers - c.num_dense_layers
    expert_mb = 3 * c.hidden_size * c.moe_intermediate_size * (KINDS[args.kind] / 8 + 2 / 32) / 1e6
    print(f"{args.preset} {args.kind}: built in {time.perf_counter() - t:.0f} s; {n_moe} MoE blocks of "
          f"{c.num_experts} experts, top-{c.num_experts_per_tok}, {expert_mb:.1f} MB per expert; "
          f"{args.threads} threads, medians of {args.reps}")
    print("\n| rows | what | loop ms | grouped ms | speedup | grouped GB/s of experts |")
    print("|---:|---|---:|---:|---:|---:|")
    for rows in args.rows:
        moe = time_moe_blocks(model, rows, args.reps)
        # Expert bytes one step reads: the distinct experts chosen, at most rows * k per block.
        expected = c.num_experts * (1 - (1 - c.num_experts_per_tok / c.num_experts) ** rows)
        gbs = n_moe * expected * expert_mb / moe["grouped"]
        print(f"| {rows} | MoE blocks only | {moe['loop']:.1f} | {moe['grouped']:.1f} | "
              f"{moe['loop'] / moe['grouped']:.2f}x | {gbs:.1f} |")
        step = time_decode(model, rows, args.steps, args.reps)
        print(f"| {rows} | whole decode step | {step['loop']:.1f} | {step['grouped']:.1f} | "
              f"{step['loop'] / step['grouped']:.2f}x | tok/s: {rows * 1e3 / step['loop']:.1f} -> "
              f"{rows * 1e3 / step['grouped']:.1f} |", flush=True)
    if args.gguf is not None and not args.gguf.is_file():
        if args.kind != "int4":
            raise SystemExit("--gguf writes int4 models as Q4_0 files; use --kind int4")
        write_gguf(model, args.gguf)


def compare_on_gguf(args: argparse.Namespace) -> None:
    """Decode tok/s of the --gguf file's model in lfm2 (both engines) and in llama-bench, alternating."""
    loaded = lfm2.load(args.gguf, quantize="int4").model
    # Rounds alternate lfm2's two engines and llama-bench, so that a neighbour's load hurts all alike.
    times: dict[str, list[float]] = {"loop": [], "grouped": [], "llama.cpp": []}
    for _ in range(args.reps):
        for label, ms in time_decode(loaded, 1, args.steps, 1).items():
            times[label].append(1e3 / ms)
        if args.llama_bench:
            times["llama.cpp"].append(llama_bench(args.llama_bench, args.gguf, args.threads))
    print(f"\ndecode tok/s, 1 row, of the model in {args.gguf} (lfm2 loads it with quantize='int4'), "
          f"medians of {args.reps} alternating rounds:")
    print(" | ".join(f"{k}: {statistics.median(v):.1f} (runs {', '.join(f'{x:.1f}' for x in v)})"
                     for k, v in times.items() if v))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="LFM2-8B-A1B")
    p.add_argument("--kind", default="int4", choices=list(KINDS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--steps", type=int, default=8, help="decode steps per whole-model repetition")
    p.add_argument("--rows", type=int, nargs="*", default=[1, 4],
                   help="batch rows (tokens per decode step); none: only the --gguf comparison")
    p.add_argument("--gguf", type=Path, help="also write the model as a Q4_0 GGUF file here (int4) and time it")
    p.add_argument("--llama-bench", help="llama.cpp's llama-bench binary, run on the --gguf file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if kernels.ops() is None:
        raise SystemExit(f"the kernels are not available: {kernels.build_error() or 'disabled'}")
    if args.rows or args.gguf is None or not args.gguf.is_file():
        compare_on_random_model(args)
    if args.gguf is not None:
        compare_on_gguf(args)


if __name__ == "__main__":
    main()
