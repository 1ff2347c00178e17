"""Where a fused decode step's time goes (`lfm2.step`), part by part, on a GGUF file or checkpoint.

    python benchmarks/decode_step.py FILE [--context 64] [--threads 2]

`lfm2.load(FILE)` (the default path: the fused step where it fits), a prompt of `--context` random tokens
prefilled, then each part of one decode step timed on its own, 50 calls a round, best of 3 rounds:
the whole step as the engine calls it; the blocks' one C++ call (`decode_layers`); the blocks' linear layers'
matrix-vector products alone (the same kernels on the same weights, one call each; an MoE model's experts are
not among them); the final norm with the head; the
embedding; RoPE's factors; the cache's slot bookkeeping. The step minus its parts is what the Python around
them costs; the blocks' call minus their products is what the norms, convolutions, attention and element-wise
steps cost. The step rewrites the same cache slot each call, so every call does the same work.
"""

from __future__ import annotations

import argparse
import time

import torch

import lfm2
from lfm2 import kernels
from lfm2.models.lfm2 import rope, rope_factors


def best_ms(fn, calls: int = 50, rounds: int = 3) -> float:  # noqa: ANN001
    fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e3


def rewind(cache, n: int) -> None:  # noqa: ANN001
    """The cache back to n filled slots, as after the prefill."""
    cache.length = n
    cache.positions.fill_(n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path")
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    llm = lfm2.load(args.path)
    model, step = llm.model, getattr(llm.model, "decode_step", None)
    if type(step).__name__ != "FusedDecode":
        raise SystemExit(f"{args.path}: no fused decode step for this model ({type(step).__name__})")
    plan, ops, config = step.plan, kernels.ops(), model.config
    n = args.context
    ids = torch.randint(100, config.vocab_size - 1, (1, n + 1), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        cache = model.make_cache(2, n + 2).narrow(1)  # a masked view, as the engine passes it
        model(ids[:, :n], cache)
        token = ids[:, n:]

        def whole() -> None:  # back to n cached tokens first: each call decodes into the same slot
            rewind(cache, n)
            step(token, cache)

        x = model.model.embed_tokens(token)
        cos, sin = rope_factors(*rope(cache.positions[:, None], config.head_dim, config.rope_theta, x.dtype))
        state = []
        for i in range(len(model.model.layers)):
            state += [cache.conv[i]] if i in cache.conv else [cache.keys[i], cache.values[i]]
        valid = cache.valid[:, : n + 1]

        def blocks() -> None:
            ops.decode_layers(x, plan.weights, plan.ints, plan.reals, state, cos.view(1, -1), sin.view(1, -1), valid, n)

        products = []  # the kernel call each of the blocks' linear layers makes at decode
        for m in model.model.layers.modules():
            xm = torch.randn(1, getattr(m, "in_features", 1))
            if type(m).__name__ == "KQuantLinear":
                products.append(lambda m=m, xm=xm: ops.kgemv(xm, m.blocks, m.kernel_type, m.in_features))
            elif type(m).__name__ == "QuantLinear":
                products.append(lambda m=m, xm=xm: ops.qgemv(xm, m.qweight, m.scales, m.bits,
                                                             m.group_size or m.in_features, m._int8_activations,
                                                             m.x16))
            elif type(m).__name__ in ("Linear", "Router"):
                products.append(lambda m=m, xm=xm: ops.fgemv(xm, m.weight) if m.in_features >= 1024
                                else torch.nn.functional.linear(xm, m.weight))

        def gemvs() -> None:
            for product in products:
                product()

        h = torch.randn(1, 1, config.hidden_size)
        slot = torch.ones_like(token, dtype=torch.bool)
        parts = [
            ("the whole step", whole),
            ("the blocks' one call", blocks),
            (f"their {len(products)} matrix products alone", gemvs),
            ("final norm and head", lambda: model.lm_head(model.model.embedding_norm(h))),
            ("embedding", lambda: model.model.embed_tokens(token)),
            ("RoPE factors", lambda: rope_factors(*rope(cache.positions[:, None], config.head_dim,
                                                        config.rope_theta, torch.float32))),
            ("slot bookkeeping", lambda: (rewind(cache, n), cache.reserve(slot, all_real=True))),
        ]
        print(f"{args.path}, {n} cached tokens, {args.threads} threads, ms per call (best of 3 x 50):")
        for name, fn in parts:
            print(f"  {name:32s} {best_ms(fn):7.3f}")


if __name__ == "__main__":
    main()
