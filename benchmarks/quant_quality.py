"""Quality of the quantized formats: perplexity and top-1 agreement with float32, bundled model.

    python benchmarks/quant_quality.py [--text chat|corpus] [--sequences 200]

Text (`--text`):
- chat (default): conversations from `lfm2.train.synth`'s held-out split (tools and phrasings the
  model never saw), rendered with the model's chat template; perplexity over the assistant tokens,
  the ones the model was trained to produce;
- corpus: the pretraining corpus's validation split (the Jargon File and WordNet glosses that
  `lfm2.train.data.is_validation` holds out, as the bundle recipe does), windows of 256 tokens,
  every token. The shipped chat model has forgotten much of this text during fine-tuning.
Each format is the bundled model quantized at load time. Sequences run through the cache in
chunks of 16 tokens, so quantized layers use their decode kernel (the GEMV, int8 activations by
default), the path generation spends its time in. Top-1 agreement is the fraction of scored
positions whose argmax equals float32's.
"""

from __future__ import annotations

import argparse
import math

import torch

import lfm2

CHUNK = 16  # = lfm2.quant.GEMV_MAX_ROWS: the largest input the GEMV kernel takes

FORMATS = [  # (label, quantize, group size, int8 activations)
    ("float32", None, None, None),
    ("int8, group 32 (default: int8 activations in the GEMV)", "int8", 32, True),
    ("int8, group 32, weight-only GEMV", "int8", 32, False),
    ("int8, per channel", "int8", None, True),
    ("int4, group 32 (embedding/head int8)", "int4", 32, True),
    ("int4, group 64", "int4", 64, True),
    ("int4, group 128", "int4", 128, True),
]


def sequences(tokenizer, kind: str, n: int) -> list[tuple[list[int], list[int]]]:
    """(ids, 0/1 mask of the tokens to score) per held-out sequence."""
    if kind == "chat":
        from lfm2.train.data import assistant_mask
        from lfm2.train.synth import conversations

        convs = conversations(n, seed=424242, split="heldout", tool_fraction=0.5)
        return [assistant_mask(tokenizer, c["messages"], c.get("tools")) for c in convs]
    from lfm2.train.corpus import documents
    from lfm2.train.data import is_validation

    eot = tokenizer.token_to_id("<|endoftext|>")
    ids: list[int] = []
    for doc in documents():
        if doc.strip() and is_validation(doc, 0.02):
            ids.extend(tokenizer.encode(doc) + [eot])
            if len(ids) >= n * 257:
                break
    return [(ids[i : i + 257], [1] * 257) for i in range(0, len(ids) - 256, 257)][:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", choices=["chat", "corpus"], default="chat")
    ap.add_argument("--sequences", type=int, default=200)
    ap.add_argument("--model", default=None, help="default: the bundled model")
    args = ap.parse_args()
    base = lfm2.load(args.model)
    data = sequences(base.tokenizer, args.text, args.sequences)
    reference, rows = None, []
    for label, kind, group, int8_act in FORMATS:
        llm = base if kind is None else lfm2.load(args.model, quantize=kind, group_size=group)
        for m in llm.model.modules():
            if int8_act is not None and hasattr(m, "int8_activations"):
                m.int8_activations = int8_act
        nll, count, argmaxes = 0.0, 0, []
        with torch.no_grad():
            for ids, mask in data:
                x, y = torch.tensor([ids[:-1]]), torch.tensor(ids[1:])
                keep = torch.tensor(mask[1:], dtype=torch.bool)
                cache = llm.model.make_cache(1, len(ids))
                logits = torch.cat([llm.model(c, cache) for c in x.split(CHUNK, dim=1)], dim=1)[0].float()
                nll += float(torch.nn.functional.cross_entropy(logits[keep], y[keep], reduction="sum"))
                count += int(keep.sum())
                argmaxes.append(logits[keep].argmax(-1))
        top = torch.cat(argmaxes)
        reference = top if reference is None else reference
        rows.append((label, math.exp(nll / count), float((top == reference).float().mean())))
    print(f"\n{args.model or 'bundled lfm2-tiny'}: {args.text} text, {len(data)} held-out sequences, "
          f"{count} scored tokens\n")
    print("| format | perplexity | vs float32 | top-1 agreement with float32 |")
    print("|---|---|---|---|")
    for label, ppl, agree in rows:
        print(f"| {label} | {ppl:.3f} | {ppl / rows[0][1] - 1:+.2%} | {agree:.1%} |")


if __name__ == "__main__":
    main()
