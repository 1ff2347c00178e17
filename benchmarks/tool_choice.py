"""How well models choose tools: unconstrained, strict token by token, and strict with whole names.

    python benchmarks/tool_choice.py [MODEL ...] [--prompts 200] [--threads 2]

For each model (default: the bundled one), greedy first replies to generated tool prompts in three
ways: unconstrained; strict calls with the tool chosen token by token (`LLM.whole_tool_names = False`,
what a grammar-constrained decoder does); strict with each tool chosen by its whole name's probability
(the default, `lfm2.constrain.choose_tool_names`). Two sets: the held-out prompts (unseen tools and
phrasings; `--prompts` for each of the seeds 12345 and 777, the first being the recipe's), as many
requests worded as in training (rich wordings, made-up words from the corpus, seed 4242), and as
many again whose distractors all share the right tool's verb and kinds of arguments ("same verb":
`synth.confusable`, seed 4343), where a name's first token says nothing and the choice falls on the
subject. Figures are right tool / right tool and arguments, and seconds per held-out prompt (what
scoring the names costs).
"""

from __future__ import annotations

import argparse
import random
import time

import torch

import lfm2
from lfm2.train.bundle import heldout_prompts, tool_call_results
from lfm2.train.corpus import documents
from lfm2.train.synth import Variety, tool_conversation, vocabulary

SEEDS = (12345, 777)
MODES = {"unconstrained": (False, True), "strict, token by token": (True, False), "strict, whole names": (True, True)}


def in_training_wording(n: int, seed: int, confusable: float, words: tuple[str, ...]) -> list[dict]:
    rng = random.Random(seed)
    return [tool_conversation(rng, "train", variety=Variety(0.4, words, True, confusable=confusable))
            for _ in range(n)]


def score(llm: lfm2.LLM, convs: list[dict], strict: bool, whole: bool) -> tuple[list[tuple[bool, bool]], float]:
    """Each reply's (right tool, right arguments), and the seconds per prompt."""
    start = time.perf_counter()
    results = tool_call_results(llm, convs, strict, whole)
    return results, (time.perf_counter() - start) / len(convs)


def fraction(rows: list[tuple[bool, bool]]) -> str:
    if not rows:
        return "-"
    return f"{sum(t for t, _ in rows)}/{sum(a for _, a in rows)} of {len(rows)}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", default=[None], help="model directories (default: the bundled model)")
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    held = [c for seed in SEEDS for c in heldout_prompts(args.prompts, seed)]
    words = vocabulary(documents(), 10)
    trained = in_training_wording(args.prompts, 4242, 0.0, words)
    same_verb = in_training_wording(args.prompts, 4343, 1.0, words)
    head = (f"{'model':24s} {'mode':24s} {'held-out':>16s} {'recipe 200':>14s} {'as trained':>16s} "
            f"{'same verb':>16s} {'s/prompt':>9s}")
    print(head)
    print("-" * len(head))
    for path in args.models:
        llm = lfm2.load(path)
        name = "bundled" if path is None else str(path)[-24:]
        for mode, (strict, whole) in MODES.items():
            h, secs = score(llm, held, strict, whole)
            t, _ = score(llm, trained, strict, whole)
            v, _ = score(llm, same_verb, strict, whole)
            print(f"{name:24s} {mode:24s} {fraction(h):>16s} {fraction(h[:args.prompts]):>14s} {fraction(t):>16s} "
                  f"{fraction(v):>16s} {secs:>9.3f}", flush=True)


if __name__ == "__main__":
    main()
