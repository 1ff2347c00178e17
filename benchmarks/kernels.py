"""The quantized-matmul kernels against float32 PyTorch, on the weight matrices of one decode step.

    python benchmarks/kernels.py [--preset LFM2-350M] [--threads 2] [--reps 7] [--rows] [--attention]
    python benchmarks/kernels.py --kquants [--preset LFM2-350M] [--threads 2]
    python benchmarks/kernels.py --q4-tiles [--preset LFM2-8B-A1B] [--threads 2]

For each weight shape of the preset (every matrix a token goes through: conv or attention
projections, the feed-forward, the 65536-row output head; only the chosen experts of an MoE),
as many distinct random matrices as one decode step reads, so that no engine is timed on
matrices it left in the cache. Engines, timed in interleaved repetitions (a noisy machine
hurts them alike), the median reported:
- fp32: `F.linear` on the float32 weight;
- int8 / int4: our GEMV with int8 activations (what `QuantLinear` runs at decode);
- int8 w-only / int4 w-only: our GEMV with float activations (`int8_activations=False`);
- fallback int8 / int4: `QuantLinear` with `LFM2_NO_KERNELS=1`, the pure-PyTorch path
  (dequantize tiles with torch ops, then matmul) that runs without a compiler.
Each cell is microseconds per call, and in brackets GB/s of the engine's own weight bytes
(float32, or quantized values plus float16 scales). `--rows` adds a sweep over the number of
input rows, GEMV against dequantize + GEMM, which sets `lfm2.quant.GEMV_MAX_ROWS`, and the
prefill case (512 rows) against float32. `--attention` times one decode step's attention (every
attention layer, its query groups against caches of 128 to 4096 filled slots): PyTorch's SDPA
against lfm2's decode attention kernel (`lfm2/kernels/attention.cpp`), in GB/s of cache read.
`--kquants` times the step's matrices as GGUF K-quants (`lfm2/kernels/kquant.cpp`, random blocks on
huge pages, as a loaded file's are): `kgemv` on Q4_K in the file's layout, on Q4_K in 16-row tiles
(what a load makes of Q4_K matrices wherever the SIMD code runs) and on Q6_K; then the same on one matrix per
shape called as often (in cache: the kernels' own speed), and `kgemm` at 512 rows. `--q4-tiles` does the
same for int4 / Q4_0 (`qgemv`, `qgemm`): the file's layout against the 16-row tiles a load makes of it on
AVX-512 VNNI CPUs (`lfm2/kernels/q4_tiles.h`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from lfm2 import kernels
from lfm2.config import preset
from lfm2.quant import GEMV_MAX_ROWS, QuantLinear


def step_shapes(name: str) -> list[tuple[str, int, int, int]]:
    """(label, out, in, matrices per decode step) for one token through the preset."""
    c = preset(name)
    d, kv = c.hidden_size, c.num_key_value_heads * c.head_dim
    n_conv = c.layer_types.count("conv")
    n_attn = c.num_hidden_layers - n_conv
    n_dense = c.num_dense_layers if c.is_moe else c.num_hidden_layers
    shapes = [
        ("conv.in_proj", 3 * d, d, n_conv),
        ("conv.out_proj, q, o", d, d, n_conv + 2 * n_attn),
        ("k_proj, v_proj", kv, d, 2 * n_attn),
        ("w1, w3", c.intermediate_size, d, 2 * n_dense),
        ("w2", d, c.intermediate_size, n_dense),
    ]
    if c.is_moe:
        n_moe = (c.num_hidden_layers - c.num_dense_layers) * c.num_experts_per_tok
        shapes += [("expert w1, w3", c.moe_intermediate_size, d, 2 * n_moe),
                   ("expert w2", d, c.moe_intermediate_size, n_moe)]
    return [*shapes, ("lm_head", c.vocab_size, d, 1)]


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_step(name: str, reps: int) -> None:
    ops = kernels.ops()
    engines = ["fp32", "int8", "int8 w-only", "int4", "int4 w-only", "fallback int8", "fallback int4"]
    if ops is None:
        print(f"(no C++ kernels: {kernels.build_error() or 'disabled'}; only fp32 and the fallback)")
        engines = [e for e in engines if e == "fp32" or e.startswith("fallback")]
    rows = []
    totals = {e: [0.0] * reps for e in engines}
    total_bytes = dict.fromkeys(engines, 0)
    for label, N, K, count in step_shapes(name):
        torch.manual_seed(0)
        weights = [torch.randn(N, K) * 0.02 for _ in range(count)]
        layers = {kind: [QuantLinear.from_linear(_linear(w), kind, 32) for w in weights] for kind in ("int8", "int4")}
        x = torch.randn(1, K)

        def run(engine: str, weights=weights, layers=layers, x=x) -> float:
            if engine == "fp32":
                return timed(lambda: [F.linear(x, w) for w in weights])
            kind = engine.split()[-1] if engine.startswith("fallback") else engine.split()[0]
            qs = layers[kind]
            if engine.startswith("fallback"):
                with _no_kernels():
                    return timed(lambda: [q(x) for q in qs])
            act = "w-only" not in engine
            return timed(lambda: [ops.qgemv(x, q.qweight, q.scales, q.bits, 32, act) for q in qs])

        nbytes = {e: count * (N * K * 4 if e == "fp32" else _qbytes(layers[e.split()[-1] if "fallback" in e
                                                                           else e.split()[0]][0]))
                  for e in engines}
        for e in engines:
            run(e)  # warm up: page in the weights, build the kernels, size the allocator
        times = {e: [] for e in engines}
        for r in range(reps):
            for e in engines:
                t = run(e)
                times[e].append(t)
                totals[e][r] += t
        cells = []
        for e in engines:
            t = statistics.median(times[e])
            cells.append(f"{t / count * 1e6:8.0f} ({nbytes[e] / t / 1e9:4.1f})")
            total_bytes[e] += nbytes[e]
        rows.append((f"{label} {N}x{K} x{count}", cells))
        del weights, layers
    step = []
    for e in engines:
        t = statistics.median(totals[e])
        step.append(f"{t * 1e3:7.2f}ms ({total_bytes[e] / t / 1e9:4.1f})")
    build = "none" if ops is None else "AVX2" if ops.simd() else "portable C++"
    _print_table(f"{name}, one decode step, batch 1, {torch.get_num_threads()} thread(s), kernels: {build}; "
                 "us per call (GB/s of weight bytes)", engines, rows, ("whole step", step))
    base = statistics.median(totals["fp32"])
    print("speed-up over fp32 per step: " + ", ".join(
        f"{e} {base / statistics.median(totals[e]):.2f}x" for e in engines if e != "fp32"))


def bench_rows(reps: int) -> None:
    """GEMV against dequantize + float GEMM as the number of input rows grows; prefill against fp32."""
    ops = kernels.ops()
    if ops is None:
        print("(no C++ kernels: the row sweep compares nothing)")
        return
    torch.manual_seed(0)
    shapes = [(4608, 1024), (1024, 4608)]
    header = ["M"] + [f"{kind} {N}x{K} gemv/qgemm/tiled/fp32" for kind in ("int8", "int4") for N, K in shapes]
    print("\nus per call by number of input rows (GEMV | int8 GEMM (AVX-512 VNNI only) | dequantize + GEMM | "
          f"fp32 F.linear); lfm2 switches from the GEMV at M > {GEMV_MAX_ROWS}")
    print(" | ".join(header))
    for M in (1, 2, 4, 6, 8, 12, 16, 32, 64, 512):
        cells = [str(M)] + [_row_case(ops, kind, N, K, M, reps) for kind in ("int8", "int4") for N, K in shapes]
        print(" | ".join(cells))


def _row_case(ops, kind: str, N: int, K: int, M: int, reps: int) -> str:
    """'gemv/qgemm/tiled/fp32' microseconds for M rows through one (N, K) matrix (no GEMV past 64 rows)."""
    w = torch.randn(N, K) * 0.02
    q = QuantLinear.from_linear(_linear(w), kind, 32)
    x = torch.randn(M, K)
    fns = {"tiled": lambda: q._tiled_matmul(x), "fp32": lambda: F.linear(x, w)}
    if kernels.has_int8_gemm():
        fns = {"qgemm": lambda: ops.qgemm(x, q.qweight, q.scales, q.bits, 32), **fns}
    if M <= 64:
        fns = {"gemv": lambda: ops.qgemv(x, q.qweight, q.scales, q.bits, 32, True), **fns}
    for f in fns.values():
        f()
    ts: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, f in fns.items():
            ts[name].append(timed(f))
    return "/".join(f"{statistics.median(ts[n]) * 1e6:.0f}" if n in ts else "-"
                    for n in ("gemv", "qgemm", "tiled", "fp32"))


@contextmanager
def _no_kernels() -> Iterator[None]:
    """`LFM2_NO_KERNELS=1` for the duration: the layers take their pure-PyTorch path."""
    old = os.environ.get(kernels.DISABLE_ENV)
    os.environ[kernels.DISABLE_ENV] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ[kernels.DISABLE_ENV]
        else:
            os.environ[kernels.DISABLE_ENV] = old


def _linear(w: torch.Tensor) -> torch.nn.Linear:
    layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    layer.weight = torch.nn.Parameter(w, requires_grad=False)
    return layer


def _qbytes(q: QuantLinear) -> int:
    return q.qweight.numel() * q.qweight.element_size() + q.scales.numel() * 2


def _print_table(title: str, engines: list[str], rows: list[tuple[str, list[str]]],
                 total: tuple[str, list[str]]) -> None:
    width = max(len(r[0]) for r in [*rows, total])
    cell = max(len(c) for _, cs in [*rows, total] for c in cs)
    print(title)
    print(f"{'shape':<{width}} | " + " | ".join(f"{e:>{cell}}" for e in engines))
    for label, cells in [*rows, total]:
        print(f"{label:<{width}} | " + " | ".join(f"{c:>{cell}}" for c in cells))


def bench_attention(name: str, reps: int) -> None:
    """A decode step's attention layers: SDPA against lfm2's kernel, as the cache fills."""
    ops = kernels.ops()
    if ops is None:
        print("(no C++ kernels: no decode attention kernel to compare)")
        return
    c = preset(name)
    n_attn = c.layer_types.count("full_attention")
    kv, groups, hd = c.num_key_value_heads, c.num_attention_heads // c.num_key_value_heads, c.head_dim
    print(f"\n{name}, decode attention of one step ({n_attn} layers, {kv} KV heads x {groups} query rows x "
          f"{hd}), {torch.get_num_threads()} thread(s): us per step (GB/s of K and V read)")
    print("filled slots | SDPA | lfm2 kernel | SDPA / kernel")
    torch.manual_seed(0)
    for S in (128, 512, 1024, 4096):
        # the filled slots of a cache with room to spare, one per layer
        kvs = [(torch.randn(1, kv, S + 64, hd)[:, :, :S], torch.randn(1, kv, S + 64, hd)[:, :, :S])
               for _ in range(n_attn)]
        q = torch.randn(1, kv, groups, hd)

        def sdpa(q=q, kvs=kvs) -> None:
            for k, v in kvs:
                F.scaled_dot_product_attention(q, k, v)

        def kernel(q=q, kvs=kvs) -> None:
            for k, v in kvs:
                ops.decode_attention(q, k, v, hd**-0.5)

        fns = {"sdpa": sdpa, "kernel": kernel}
        ts: dict[str, list[float]] = {n: [] for n in fns}
        for f in fns.values():
            f()
        for _ in range(reps * 5):
            for n, f in fns.items():
                ts[n].append(timed(f))
        med = {n: statistics.median(t) for n, t in ts.items()}
        gb = n_attn * 2 * kv * S * hd * 4 / 1e9
        print(f"{S} | {med['sdpa'] * 1e6:.0f} ({gb / med['sdpa']:.1f}) | {med['kernel'] * 1e6:.0f} "
              f"({gb / med['kernel']:.1f}) | {med['sdpa'] / med['kernel']:.2f}x")


def _k_blocks(N: int, K: int, qtype: int, seed: int) -> torch.Tensor:
    """Random blocks of a GGUF K-quant type (N, bytes per row) with sane float16 super-block scales, on huge pages."""
    from lfm2.kquant import row_bytes
    from lfm2.weights import huge_page_buffer

    g = torch.Generator().manual_seed(seed)
    size = row_bytes(qtype, K) // (K // 256)
    raw = torch.randint(0, 256, (N * K // 256, size), dtype=torch.uint8, generator=g)
    scale = torch.tensor([0.002], dtype=torch.float16).view(torch.uint8)
    for off in ((208,) if qtype == 14 else (0, 2)):  # Q6_K: d at 208; Q4_K: d, dmin at 0, 2
        raw[:, off : off + 2] = scale
    out = huge_page_buffer(raw.numel())[: raw.numel()]
    out.copy_(raw.view(-1))
    return out.view(N, -1)


def _step_tables(name: str, reps: int, what: str, shapes: list[tuple[str, int, int, int]], engines: list[str],
                 make: Callable[[str, int, int, int], tuple],
                 gemv: Callable[[str, torch.Tensor, tuple], object]) -> None:
    """One decode step's matrices through each engine's GEMV, batch 1: distinct matrices (from memory), then one
    matrix per shape called as often (in cache). make(engine, N, K, seed) builds a matrix (a tuple of tensors),
    gemv(engine, x, matrix) multiplies; GB/s counts the matrix's bytes."""
    for cached in (False, True):
        rows, totals, total_bytes = [], {e: [0.0] * reps for e in engines}, dict.fromkeys(engines, 0)
        for i, (label, N, K, count) in enumerate(shapes):
            mats = {e: [make(e, N, K, 100 * i + j) for j in range(1 if cached else count)] for e in engines}
            mats = {e: ms * count if cached else ms for e, ms in mats.items()}
            x = torch.randn(1, K)

            def run(e: str, mats=mats, x=x) -> float:
                return timed(lambda: [gemv(e, x, m) for m in mats[e]])

            for e in engines:
                run(e)
            times = {e: [] for e in engines}
            for r in range(reps):
                for e in engines:
                    times[e].append(run(e))
                    totals[e][r] += times[e][-1]
            cells = []
            for e in engines:
                t, nbytes = statistics.median(times[e]), count * sum(m.nbytes for m in mats[e][0])
                cells.append(f"{t / count * 1e6:8.0f} ({nbytes / t / 1e9:4.1f})")
                total_bytes[e] += nbytes
            rows.append((f"{label} {N}x{K} x{count}", cells))
        med = {e: statistics.median(totals[e]) for e in engines}
        step = [f"{med[e] * 1e3:7.2f}ms ({total_bytes[e] / med[e] / 1e9:4.1f})" for e in engines]
        where = "one matrix per shape, in cache" if cached else "distinct matrices, from memory"
        _print_table(f"\n{name}, {what}, batch 1, {torch.get_num_threads()} thread(s), {where}; us per call "
                     "(GB/s of weight bytes)", engines, rows, ("whole step", step))


def _prefill_table(name: str, reps: int, what: str, shapes: list[tuple[str, int, int, int]],
                   make: Callable[[int, int, int], tuple[tuple, tuple]],
                   gemm: Callable[[torch.Tensor, tuple, bool], object]) -> None:
    """The prefill product at 512 rows on each shape: make(N, K, seed) -> (file layout, 16-row tiles)."""
    print(f"\n{name}, {what} at 512 rows (prefill): ms per call, file layout / 16-row tiles")
    for i, (label, N, K, _) in enumerate(shapes):
        plain, tiled = make(N, K, i)
        x = torch.randn(512, K)
        ts: dict[str, list[float]] = {"rows": [], "tiles": []}
        for _ in range(reps):
            ts["rows"].append(timed(lambda: gemm(x, plain, False)))  # noqa: B023
            ts["tiles"].append(timed(lambda: gemm(x, tiled, True)))  # noqa: B023
        a, b = statistics.median(ts["rows"]), statistics.median(ts["tiles"])
        print(f"{label} {N}x{K}: {a * 1e3:.1f} / {b * 1e3:.1f} ({a / b:.2f}x)")


def bench_kquants(name: str, reps: int) -> None:
    """kgemv on Q4_K (file layout, 16-row tiles) and Q6_K, over one decode step's matrices; in cache; kgemm."""
    from lfm2.kquant import Q4_K_X16

    ops = kernels.ops()
    if ops is None or not kernels.has_int8_gemm():
        print("(--kquants needs the C++ kernels' SIMD code (AVX2): the Q4_K tiles exist only there)")
        return
    types = {"q4_k rows": (12, 12), "q4_k tiles": (12, Q4_K_X16), "q6_k rows": (14, 14)}  # (file type, kernel's)

    def make(e: str, N: int, K: int, seed: int) -> tuple:
        blocks = _k_blocks(N, K, types[e][0], seed)
        if types[e][1] == Q4_K_X16:
            ops.kpack_(blocks, 12, K)
        return (blocks,)

    shapes = [(label, N, K, count) for label, N, K, count in step_shapes(name) if K % 256 == 0]
    _step_tables(name, reps, "kgemv", shapes, list(types), make,
                 lambda e, x, m: ops.kgemv(x, m[0], types[e][1], x.shape[-1]))

    def make_pair(N: int, K: int, seed: int) -> tuple[tuple, tuple]:
        plain = _k_blocks(N, K, 12, seed)
        tiled = plain.clone()
        ops.kpack_(tiled, 12, K)
        return (plain,), (tiled,)

    _prefill_table(name, reps, "kgemm, Q4_K", shapes, make_pair,
                   lambda x, m, tiles: ops.kgemm(x, m[0], Q4_K_X16 if tiles else 12, x.shape[-1]))


def _q4_matrix(N: int, K: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random int4 values (groups of 32) with float16 scales, on huge pages as a loaded file's are."""
    from lfm2.weights import huge_page_buffer

    g = torch.Generator().manual_seed(seed)
    q = huge_page_buffer(N * K // 2)[: N * K // 2].view(N, K // 2)
    q.copy_(torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=g))
    return q, (torch.rand(N, K // 32, generator=g) * 0.01).half()


def bench_q4_tiles(name: str, reps: int) -> None:
    """qgemv on int4 / Q4_0 in the file's layout and in 16-row tiles, over one decode step's matrices (an MoE's
    chosen experts among them); in cache; qgemm at 512 rows from either layout."""
    ops = kernels.ops()
    if ops is None or not kernels.has_vnni():
        print("(--q4-tiles needs the C++ kernels on a CPU with AVX-512 VNNI: the int4 tiles exist only there)")
        return

    def make(e: str, N: int, K: int, seed: int) -> tuple:
        q, s = _q4_matrix(N, K, seed)
        if e == "q4_0 tiles":
            ops.qpack_(q, s)
        return q, s

    shapes = [(label, N, K, count) for label, N, K, count in step_shapes(name) if label != "lm_head"]
    _step_tables(name, reps, "qgemv, int4 (the head is int8 in Q4_0 files: left out)", shapes,
                 ["q4_0 rows", "q4_0 tiles"], make,
                 lambda e, x, m: ops.qgemv(x, m[0], m[1], 4, 32, True, e == "q4_0 tiles"))

    def make_pair(N: int, K: int, seed: int) -> tuple[tuple, tuple]:
        q, s = _q4_matrix(N, K, seed)
        tq, ts = q.clone(), s.clone()
        ops.qpack_(tq, ts)
        return (q, s), (tq, ts)

    _prefill_table(name, reps, "qgemm, Q4_0", shapes, make_pair,
                   lambda x, m, tiles: ops.qgemm(x, m[0], m[1], 4, 32, tiles))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="LFM2-350M")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--rows", action="store_true", help="also sweep the number of input rows")
    parser.add_argument("--attention", action="store_true", help="also time the decode attention")
    parser.add_argument("--kquants", action="store_true", help="only the K-quant kernels (Q4_K rows and tiles, Q6_K)")
    parser.add_argument("--q4-tiles", action="store_true", help="only the int4 / Q4_0 kernels (rows and 16-row tiles)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with torch.no_grad():
        if args.kquants:
            bench_kquants(args.preset, args.reps)
            return
        if args.q4_tiles:
            bench_q4_tiles(args.preset, args.reps)
            return
        bench_step(args.preset, args.reps)
        if args.rows:
            bench_rows(args.reps)
        if args.attention:
            bench_attention(args.preset, args.reps)


if __name__ == "__main__":
    main()
