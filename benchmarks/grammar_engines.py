"""Choose a grammar engine for structured output by measurement: llguidance, xgrammar, outlines-core.

For each engine and each schema of `tests/data/json_schemas.json` it records
- whether the engine accepts the schema (coverage), and what it says about keywords it cannot
  enforce (`UNSUPPORTED` below: a silent acceptance means a looser grammar than asked for);
- the time to compile the schema against the tokenizer's vocabulary;
- the time to compute one token mask over the whole vocabulary, along random walks: at each step a
  token is drawn at random among the allowed ones (the worst case a temperature-1 random model
  gives), for up to `--steps` tokens; and whether every finished walk's text validates (`jsonschema`).

The tokenizer is a 65,536-entry byte-level BPE with LFM2's pipeline (`lfm2.bpe`), trained here on
the Python standard library's sources, so the vocabulary has LFM2's size and byte-level shape;
real LFM2 weights and tokenizer files cannot be downloaded on this machine.

Run: python benchmarks/grammar_engines.py [--steps 200] [--walks 3]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import jsonschema
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT / "tests" / "data" / "json_schemas.json"
SPECIALS = ["<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|fim_pre|>", "<|fim_mid|>", "<|fim_suf|>", "<|im_start|>",
            "<|im_end|>", "<|tool_list_start|>", "<|tool_list_end|>", "<|tool_call_start|>", "<|tool_call_end|>",
            "<|tool_response_start|>", "<|tool_response_end|>"]
EOS = 7  # <|im_end|>: what ends a chat reply
UNSUPPORTED = {
    "uniqueItems": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
    "not": {"type": "object", "properties": {"a": {"not": {"type": "string"}}}, "required": ["a"]},
    "if_then_else": {"type": "object", "properties": {"a": {"type": "integer"}}, "if": {"required": ["a"]},
                     "then": {"required": ["b"]}},
    "dependentRequired": {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "string"}},
                          "dependentRequired": {"a": ["b"]}},
    "contains": {"type": "array", "items": {"type": "integer"}, "contains": {"const": 3}},
    "multipleOf": {"type": "integer", "multipleOf": 7},
}


def train_tokenizer(path: Path) -> None:
    from tokenizers import pre_tokenizers, trainers

    from lfm2.bpe import build_tokenizer

    files = sorted(glob.glob(f"{os.path.dirname(os.__file__)}/**/*.py", recursive=True))[:4000]
    tok = build_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=65536, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((Path(f).read_text(errors="ignore") for f in files), trainer)
    tok.save(str(path))


class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer_json: str, vocab: int) -> None:
        import llguidance
        import llguidance.torch as lt

        self.llg, self.lt = llguidance, lt
        self.tok = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab, eos_token=EOS)
        self.vocab = vocab

    def compile(self, schema: dict):
        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        err = self.llg.LLMatcher.validate_grammar(grammar, self.tok)
        if err:
            raise ValueError(err)
        return grammar

    def matcher(self, compiled):
        m = self.llg.LLMatcher(self.tok, compiled)
        bits = self.lt.allocate_token_bitmask(1, self.vocab)
        return m, bits

    def mask(self, state) -> np.ndarray:
        m, bits = state
        self.lt.fill_next_token_bitmask(m, bits, 0)
        return unpack(bits[0], self.vocab)

    def consume(self, state, token: int) -> bool:
        m, _ = state
        m.consume_token(token)
        return m.is_stopped()


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer_json: str, vocab: int) -> None:
        import xgrammar as xgr
        from tokenizers import Tokenizer

        self.xgr = xgr
        tok = Tokenizer.from_str(tokenizer_json)
        from transformers import PreTrainedTokenizerFast

        hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>")
        info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=[EOS])
        self.compiler = xgr.GrammarCompiler(info, max_threads=1)
        self.vocab = vocab

    def compile(self, schema: dict):
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=True)

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled), self.xgr.allocate_token_bitmask(1, self.vocab)

    def mask(self, state) -> np.ndarray:
        m, bits = state
        m.fill_next_token_bitmask(bits)
        return unpack(bits[0], self.vocab)

    def consume(self, state, token: int) -> bool:
        m, _ = state
        if not m.accept_token(token):
            raise RuntimeError("token refused")
        return m.is_terminated()


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tokenizer_json: str, vocab: int) -> None:
        import outlines_core as oc
        from tokenizers import Tokenizer

        self.oc = oc
        tok = Tokenizer.from_str(tokenizer_json)
        table = {}
        for text, i in tok.get_vocab().items():
            if text in SPECIALS:
                continue
            table.setdefault(text, []).append(i)
        self.vocabulary = oc.Vocabulary(EOS, table)
        self.vocab = vocab

    def compile(self, schema: dict):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        return self.oc.Index(regex, self.vocabulary)

    def matcher(self, compiled):
        return self.oc.Guide(compiled), torch.zeros(1, (self.vocab + 31) // 32, dtype=torch.int32)

    def mask(self, state) -> np.ndarray:
        guide, bits = state
        guide.write_mask_into(bits.data_ptr(), bits.numel(), bits.element_size())
        return unpack(bits[0], self.vocab)

    def consume(self, state, token: int) -> bool:
        guide, _ = state
        guide.advance(token)
        return guide.is_finished()


def unpack(bits: torch.Tensor, vocab: int) -> np.ndarray:
    words = bits.numpy().view(np.uint32)
    return np.unpackbits(words.view(np.uint8), bitorder="little")[:vocab].astype(bool)


def walk(engine, compiled, decode, rng: np.random.Generator, steps: int) -> tuple[list[float], str | None]:
    """One random walk; the mask times and the text when the grammar finished (else None)."""
    state = engine.matcher(compiled)
    times, ids = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        allowed = engine.mask(state)
        times.append(time.perf_counter() - t0)
        choices = np.flatnonzero(allowed)
        if len(choices) == 0:
            return times, None
        token = int(rng.choice(choices))
        if token == EOS:
            return times, decode(ids)
        ids.append(token)
        if engine.consume(state, token):
            return times, decode(ids)
    return times, None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--walks", type=int, default=3)
    ap.add_argument("--engines", default="llguidance,xgrammar,outlines-core")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from tokenizers import Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokenizer.json"
        train_tokenizer(path)
        tokenizer_json = path.read_text()
    hf = Tokenizer.from_str(tokenizer_json)
    vocab = hf.get_vocab_size()
    schemas = json.loads(SCHEMAS.read_text())
    engines = {"llguidance": LLGuidance, "xgrammar": XGrammar, "outlines-core": OutlinesCore}
    print(f"# {platform.processor() or platform.machine()}, vocabulary {vocab}, {len(schemas)} schemas, "
          f"{args.walks} walks x <= {args.steps} tokens")
    for name in args.engines.split(","):
        t0 = time.perf_counter()
        engine = engines[name](tokenizer_json, vocab)
        setup = time.perf_counter() - t0
        compiled, failed, compile_s, mask_s, finished, invalid = 0, [], [], [], 0, []
        rng = np.random.default_rng(0)
        for key, schema in schemas.items():
            t0 = time.perf_counter()
            try:
                grammar = engine.compile(schema)
            except Exception as exc:
                failed.append(f"{key}: {str(exc).splitlines()[0][:100]}")
                continue
            compile_s.append(time.perf_counter() - t0)
            compiled += 1
            for _ in range(args.walks):
                try:
                    times, text = walk(engine, grammar, hf.decode, rng, args.steps)
                except Exception as exc:
                    invalid.append(f"{key}: {type(exc).__name__}: {exc}"[:120])
                    continue
                mask_s.extend(times)
                if text is not None:
                    finished += 1
                    try:
                        jsonschema.validate(json.loads(text), schema)
                    except Exception as exc:
                        invalid.append(f"{key}: {text[:60]!r}: {str(exc).splitlines()[0][:60]}")
        rejects = []
        for key, schema in UNSUPPORTED.items():
            try:
                engine.compile(schema)
                rejects.append(f"{key}: accepted")
            except Exception:
                rejects.append(f"{key}: rejected")
        ms = sorted(t * 1e3 for t in mask_s)
        print(f"\n## {name}\nsetup {setup:.2f} s; schemas compiled {compiled}/{len(schemas)}; "
              f"compile median {statistics.median(compile_s) * 1e3:.1f} ms, max {max(compile_s) * 1e3:.1f} ms")
        if ms:
            print(f"mask per token: mean {statistics.mean(ms):.3f} ms, p50 {ms[len(ms) // 2]:.3f} ms, "
                  f"p99 {ms[int(len(ms) * 0.99)]:.3f} ms over {len(ms)} masks")
        print(f"walks finished {finished}, invalid outputs {len(invalid)}")
        for line in failed + invalid:
            print("  -", line)
        print("  unsupported keywords:", "; ".join(rejects))


if __name__ == "__main__":
    main()
