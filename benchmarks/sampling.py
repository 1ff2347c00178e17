"""What choosing a token costs a decode step, and the engine's tokens/s with the model card's sampling.

    python benchmarks/sampling.py [--gguf FILE] [--tokens 48] [--rounds 3]

Part 1, no model: `lfm2.sampling.sample_next` on one row of LFM2's 65,536 logits (random, scale 3) with a
300-token history: greedy; the model card's settings (temperature 0.3, min_p 0.15, repetition_penalty
1.05); those with top_p 0.95, as OpenAI clients often send; and with top_k 50 and top_p 0.9. Then the draw
alone, `lfm2.sampling.draw` against `torch.multinomial` (what sample_next drew with before) on the same
probabilities.

Part 2, with `--gguf`: `lfm2.load(FILE)` (the default path: the compiled decode step), then the engine
generating `--tokens` tokens after a 16-token prompt, greedy, with the model card's sampling and with top_p
0.95 added, in alternation: the time a token takes in all, and the part spent in the model's step. The
rest is the engine around the step, sampling included: what `lfm2 chat` and `lfm2 serve` pay on top of
`lfm2 bench`, which decodes greedily as llama-bench does.
"""

from __future__ import annotations

import argparse
import time

import torch

from lfm2.sampling import SamplingParams, TokenHistory, draw, make_generator, sample_next

VOCAB = 65_536
CARD = {"temperature": 0.3, "min_p": 0.15, "repetition_penalty": 1.05}


def per_call_us(fn, reps: int = 300) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1e6


def sampling_table() -> None:
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(0)) * 3
    history = TokenHistory(torch.randint(0, VOCAB, (1, 300), generator=torch.Generator().manual_seed(1)), VOCAB)
    generator = make_generator(0)
    settings = {"greedy": {"temperature": 0.0}, "model card": CARD, "card + top_p 0.95": {**CARD, "top_p": 0.95},
                "card + top_k 50 + top_p 0.9": {**CARD, "top_k": 50, "top_p": 0.9}}
    print(f"torch threads {torch.get_num_threads()}, vocabulary {VOCAB}")
    print("| sample_next | us per token |\n|---|---|")
    for name, values in settings.items():
        params = SamplingParams(**values)
        print(f"| {name} | {per_call_us(lambda p=params: sample_next(logits, p, generator, history)):.0f} |")
    probs = (logits / 0.3).softmax(dim=-1)
    print("\n| draw from 65,536 probabilities | us |\n|---|---|")
    print(f"| lfm2.sampling.draw | {per_call_us(lambda: draw(probs, generator)):.0f} |")
    print(f"| torch.multinomial | {per_call_us(lambda: torch.multinomial(probs, 1, generator=generator)):.0f} |")


def engine_table(path: str, tokens: int, rounds: int) -> None:
    import lfm2

    llm = lfm2.load(path)
    llm.prefix_cache.max_bytes = 0
    step = llm.model.decode_step
    spent = [0.0]

    def timed(*args, **kwargs):
        start = time.perf_counter()
        out = step(*args, **kwargs)
        spent[0] += time.perf_counter() - start
        return out

    llm.model.decode_step = timed
    prompt = torch.randint(100, 60_000, (16,), generator=torch.Generator().manual_seed(0)).tolist()
    modes = {"greedy": llm.sampling_params(temperature=0, repetition_penalty=1.0, min_p=0.0),
             "model card": llm.sampling_params(**CARD, seed=0),
             "card + top_p 0.95": llm.sampling_params(**CARD, top_p=0.95, seed=0)}

    def run(params, n: int) -> tuple[float, float]:
        spent[0] = 0.0
        start = time.perf_counter()
        for _ in llm.engine(1, len(prompt) + n).generate([prompt], params, n, ignore_eos=True):
            pass
        return time.perf_counter() - start, spent[0]

    run(modes["greedy"], 4)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in modes}
    for r in range(rounds):
        for name in modes if r % 2 == 0 else reversed(modes):
            t1, s1 = run(modes[name], 1)  # the prompt and the first token, taken off below
            t, s = run(modes[name], tokens + 1)
            results[name].append(((t - t1) / tokens * 1e3, (s - s1) / tokens * 1e3))
    print(f"\n{path}: {tokens} tokens after a 16-token prompt, {rounds} rounds alternated")
    print("| sampling | ms per token, each round | of which the step | the rest |\n|---|---|---|---|")
    for name, rows in results.items():
        total = sorted(t for t, _ in rows)[len(rows) // 2]
        inner = sorted(s for _, s in rows)[len(rows) // 2]
        rounds_text = " / ".join(f"{t:.2f}" for t, _ in rows)
        print(f"| {name} | {rounds_text} | {inner:.2f} | {total - inner:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", help="also time the engine on this file")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sampling_table()
    if args.gguf:
        engine_table(args.gguf, args.tokens, args.rounds)


if __name__ == "__main__":
    main()
