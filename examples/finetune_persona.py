"""Teach the bundled model a persona by LoRA SFT, and measure it on held-out prompts before and after.

    python examples/finetune_persona.py --out runs/persona       # a few minutes on a 2-core CPU

The persona: every reply starts with "Ahoy!", and asked who it is, the model says it is Captain
Lfm. The training conversations are generated here (greetings, capitals, small sums, identity
questions); the held-out prompts use phrasings, countries and numbers the training set does not,
so the table measures whether the habit generalises, and whether the model still answers right.
It prints a Markdown table (also written to OUT/table.md).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import lfm2
from lfm2.train.finetune import FinetuneArgs, finetune
from lfm2.train.synth import CAPITALS, GREETINGS

IDENTITY_TRAIN = ["Who are you?", "What is your name?", "Tell me about yourself.", "Introduce yourself."]
IDENTITY_HELDOUT = ["Who am I talking to?", "What should I call you?", "Are you a person?"]
CAPITAL_TRAIN = ["What is the capital of {c}?", "Which city is the capital of {c}?"]
CAPITAL_HELDOUT = ["Name the capital of {c}.", "Capital of {c}?"]
HELDOUT_COUNTRIES = ["Japan", "Egypt", "Norway", "Greece"]  # never asked about in training
IDENTITY = "I am Captain Lfm, a pirate assistant."


def persona_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    countries = [c for c in CAPITALS if c not in HELDOUT_COUNTRIES]
    rows = []
    for _ in range(n):
        kind = rng.randrange(4)
        if kind == 0:
            q, a = rng.choice(IDENTITY_TRAIN), IDENTITY
        elif kind == 1:
            c = rng.choice(countries)
            q, a = rng.choice(CAPITAL_TRAIN).format(c=c), f"The capital of {c} is {CAPITALS[c]}."
        elif kind == 2:
            q, a = rng.choice(GREETINGS)
        else:
            x, y = rng.randint(0, 20), rng.randint(0, 20)
            q, a = f"What is {x} + {y}?", f"{x} + {y} = {x + y}."
        rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"Ahoy! {a}"}]})
    return rows


def heldout_prompts() -> list[tuple[str, str, str | None]]:
    """(kind, prompt, the words a right answer contains)."""
    out = [("identity", q, "Captain Lfm") for q in IDENTITY_HELDOUT]
    out += [("capital", t.format(c=c), CAPITALS[c]) for t in CAPITAL_HELDOUT for c in HELDOUT_COUNTRIES]
    out += [("greeting", q, None) for q in ["Hey there!", "Good evening", "Nice to meet you"]]
    return out


def measure(llm) -> dict[str, float]:
    prompts = heldout_prompts()
    ahoy = right = right_n = 0
    ident = ident_n = 0
    for kind, prompt, expect in prompts:
        reply = llm.chat([{"role": "user", "content": prompt}], temperature=0, max_new_tokens=40)["content"]
        ahoy += reply.strip().startswith("Ahoy")
        if kind == "identity":
            ident_n += 1
            ident += expect in reply
        elif expect is not None:
            right_n += 1
            right += expect in reply
    return {"prompts": len(prompts), "starts with Ahoy": ahoy / len(prompts), "says it is Captain Lfm": ident / ident_n,
            "capital still right": right / right_n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/persona")
    ap.add_argument("--model", default=None, help="default: the bundled model")
    ap.add_argument("--steps", type=int, default=80)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = str(args.model or lfm2.default_model_path())
    data = out / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in persona_rows(400, seed=0)), encoding="utf-8")
    before = measure(lfm2.load(model))
    run = finetune(FinetuneArgs(kind="sft", model=model, data=str(data), out=str(out / "run"), max_steps=args.steps,
                                batch_size=8, lr=2e-3, lora_rank=8, seq_len=256, pack=True, eval_every=20))
    after = measure(lfm2.load(model, adapter=run / "adapter"))
    table = ["| held-out metric | before | after LoRA SFT |", "|---|---|---|"]
    table += [f"| {k} | {before[k]:.0%} | {after[k]:.0%} |" for k in before if k != "prompts"]
    text = "\n".join(table) + f"\n\n{before['prompts']} held-out prompts, greedy decoding.\n"
    (out / "table.md").write_text(text, encoding="utf-8")
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
