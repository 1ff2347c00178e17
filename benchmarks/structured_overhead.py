"""What structured output costs: decode tokens/s with and without a JSON schema, and the time to
the first token with a large schema, on the LFM2-350M shape quantized to int4 (random weights).

The tokenizer is the 65,536-entry byte-level BPE of `benchmarks/grammar_engines.py` (LFM2's
pipeline, trained here on the Python standard library): real LFM2 files cannot be downloaded on
this machine, and a grammar's cost depends on the vocabulary's size and shape, not on the weights.
Decoding is greedy, so the constrained reply is the same every run; the unconstrained run decodes
exactly as many tokens (`ignore_eos`), and the two alternate, `--rounds` times each. Both go through
`LLM.generate`, as a user's call does.

The schemas are not those of the tests (`tests/data/json_schemas.json`): a list of 24 order lines
(pattern, ranges, enum, bounded strings) for decode, and a generated schema of 600 properties with
$defs for the time to first token (prefix cache off, so that each request prefills).

Run: python benchmarks/structured_overhead.py [--rounds 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

ORDER_LINES = {
    "type": "array", "minItems": 24, "maxItems": 24,
    "items": {"type": "object", "additionalProperties": False, "required": ["sku", "qty", "unit", "note"],
              "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{4}$"},
                             "qty": {"type": "integer", "minimum": 1, "maximum": 500},
                             "unit": {"enum": ["box", "pallet", "piece"]},
                             "note": {"type": "string", "maxLength": 16}}},
}


def large_schema(n: int = 600) -> dict:
    """An object of `n` typed properties sharing $defs: about the size of a big form or API schema."""
    defs = {"money": {"type": "number", "minimum": 0}, "code": {"type": "string", "pattern": "^[a-z]{3}[0-9]{2}$"},
            "flag": {"type": "boolean"}, "level": {"enum": ["low", "mid", "high"]}}
    kinds = list(defs)
    props = {f"field_{i}": {"$ref": f"#/$defs/{kinds[i % len(kinds)]}"} for i in range(n)}
    return {"$defs": defs, "type": "object", "properties": props, "required": list(props)[: n // 3],
            "additionalProperties": False}


def checkpoint(out: Path) -> Path:
    """A random LFM2-350M checkpoint with the 65,536-token tokenizer (written once)."""
    if (out / "model.safetensors").is_file():
        return out
    from grammar_engines import train_tokenizer

    from lfm2.config import preset
    from lfm2.models import build_model
    from lfm2.weights import save_checkpoint

    out.mkdir(parents=True, exist_ok=True)
    train_tokenizer(out / "tokenizer.json")
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|startoftext|>",
                                                           "eos_token": "<|im_end|>", "pad_token": "<|pad|>"}))
    torch.manual_seed(0)
    save_checkpoint(build_model(preset("LFM2-350M"), device="cpu"), out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "lfm2-structured-bench")
    args = ap.parse_args()
    import lfm2
    from lfm2 import structured
    from lfm2.prefix_cache import PrefixCache

    llm = lfm2.load(checkpoint(args.out), quantize="int4")
    prompt = "Write the order as JSON:"
    t0 = time.perf_counter()
    structured.grammar_tokenizer(llm.tokenizer, llm.config.vocab_size, sorted(llm.tokenizer.stop_ids))
    tokenizer_s = time.perf_counter() - t0
    llm.generate(prompt, max_new_tokens=8, temperature=0)  # warm-up
    free, held = [], []
    for _ in range(args.rounds):
        text = llm.generate(prompt, json_schema=ORDER_LINES, temperature=0, max_new_tokens=1500)
        stats = llm.last_stats[0]
        n = stats.completion_tokens
        held.append(stats.decode_tokens_per_s)
        json.loads(text)
        llm.generate(prompt, temperature=0, max_new_tokens=n, ignore_eos=True)
        free.append(llm.last_stats[0].decode_tokens_per_s)
    big = large_schema()
    llm.prefix_cache = PrefixCache(0)  # every request prefills its prompt: no answer from a stored one
    ttft_free, ttft_big = [], []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        llm.generate(prompt, max_new_tokens=1, temperature=0)
        ttft_free.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        llm.generate(prompt, json_schema=big, max_new_tokens=1, temperature=0)
        ttft_big.append(time.perf_counter() - t0)
    f, h = statistics.median(free), statistics.median(held)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; LFM2-350M shape, int4, random weights, vocabulary "
          f"{llm.config.vocab_size}; {args.rounds} rounds, medians")
    print(f"decode, {n} tokens: free {f:.1f} tok/s, with the schema {h:.1f} tok/s: {h / f:.2f}x "
          f"(free {[round(x, 1) for x in free]}, schema {[round(x, 1) for x in held]})")
    print(f"time to first token, {len(json.dumps(big)) // 1024} KiB schema ({len(big['properties'])} properties): "
          f"{statistics.median(ttft_big) * 1e3:.0f} ms against {statistics.median(ttft_free) * 1e3:.0f} ms free")
    print(f"once per tokenizer (the grammar engine's view of the vocabulary): {tokenizer_s * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
