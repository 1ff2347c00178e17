"""What strict tool calls cost: greedy chat with and without the constraint, and building its masks.

    python benchmarks/constrain.py [--prompts 20] [--threads 2]

1. The bundled model answers held-out tool prompts (each with its own tool list, so every prompt's
   masks are built afresh: the worst case), unconstrained and strict, interleaved per prompt; the
   table gives seconds per prompt, tokens per second and the ratio strict / unconstrained.
2. Mask building on a 65,536-token vocabulary (LFM2's size; the bundled tokenizer's tokens plus
   pairs of them, since no real LFM2 tokenizer is on this machine): the first pass over one call of
   four tools, with a string's plain tokens taken as a block (what `TokenVocabulary.allowed` does)
   against walking the whole trie in every state.
"""

from __future__ import annotations

import argparse
import random
import time
import warnings

import torch

import lfm2
from lfm2.constrain import TokenVocabulary, ToolCallConstraint
from lfm2.train.bundle import HELDOUT_SEED, heldout_prompts


def chat_rows(llm: lfm2.LLM, prompts: int) -> None:
    held = heldout_prompts(prompts, HELDOUT_SEED)
    secs = {False: 0.0, True: 0.0}
    tokens = {False: 0, True: 0}
    for conv in held:
        for strict in (False, True):
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                llm.chat(conv["messages"][:1], tools=conv["tools"], temperature=0, max_new_tokens=96,
                         strict_tools=strict)
            secs[strict] += time.perf_counter() - start
            tokens[strict] += llm.last_stats[0].completion_tokens
    print(f"bundled model, {prompts} held-out prompts, greedy")
    print(f"{'mode':<14}{'s/prompt':>10}{'tokens/s':>10}")
    for strict in (False, True):
        print(f"{'strict' if strict else 'unconstrained':<14}{secs[strict] / prompts:>10.3f}"
              f"{tokens[strict] / secs[strict]:>10.1f}")
    print(f"strict / unconstrained, s/prompt: {secs[True] / secs[False]:.2f}x\n")


def mask_rows(llm: lfm2.LLM) -> None:
    base = [b for b in llm.tokenizer.token_bytes() if b]
    rng = random.Random(0)
    vocab = [None] * 20 + base
    while len(vocab) < 65536:
        vocab.append((rng.choice(base) + rng.choice(base))[:12])
    tools = [{"type": "function", "function": {"name": f"tool_{i}", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "n": {"type": "integer"}, "note": {"type": "string"}}, "required": ["city"]}}}
        for i in range(4)]
    text = b"[tool_2(city='Paris', n=3, note='hello'), tool_1(note='x', city='y')]"
    print("mask building, 65,536-token vocabulary, first pass over one call")
    print(f"{'walk':<26}{'seconds':>9}{'states':>8}")
    times = {}
    for name, shortcut in (("plain tokens as a block", True), ("whole trie every state", False)):
        v = TokenVocabulary(vocab, 1, 2, len(vocab))
        grammar = v.grammar(tools)
        if not shortcut:
            grammar.loop_bytes = lambda state: None  # the walk without the shortcut
        c = ToolCallConstraint(grammar, v)
        c.advance(1)
        start = time.perf_counter()
        for byte in text:
            c.mask()
            c.state = grammar.step(c.state, byte)
        times[name] = time.perf_counter() - start
        print(f"{name:<26}{times[name]:>9.2f}{len(grammar.masks):>8}")
    print(f"whole trie / block: {times['whole trie every state'] / times['plain tokens as a block']:.1f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    llm = lfm2.load()
    chat_rows(llm, args.prompts)
    mask_rows(llm)


if __name__ == "__main__":
    main()
