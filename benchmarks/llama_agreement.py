"""Teacher-forced top-1 agreement with llama.cpp on llama.cpp's own quantized files (issue #30's agreement item).

    PYTHONPATH=.:PATH/llama_cpp_python LLAMA_CPP_LIB_PATH=PATH/llama.cpp/build/bin \\
        python benchmarks/llama_agreement.py [--source MODEL-F32.gguf] [--sequences 4] [--length 256]

Each type (Q8_0, Q4_0, Q4_K_M by default) is made from the F32 source by llama.cpp's own quantizer
(`llama_model_quantize`, its default mixture of types for that file type, as users get files). On random token
sequences (BOS, then ordinary tokens), the top-1 token at every position is compared between llama.cpp and:
- lfm2 native, prefill: `lfm2.load(FILE)` (the file's format in lfm2's kernels), one forward over the sequence;
- lfm2 native, decode: the same model a token at a time through its cache (the decode kernels);
- lfm2 dequantized: `lfm2.load(FILE, quantize="none")`, float32.

Without `--source`, the source is `tests/test_gguf.py`'s `wide_f32` fixture made again here (a byte-level BPE
trained on the tests' corpus; a random model 256 wide, 4 layers, an untied head so that predictions depend on
the context): random weights, which nothing was tuned on. Needs the `llama_cpp` module (llama-cpp-python;
its Python package can run against an existing llama.cpp build through `LLAMA_CPP_LIB_PATH`).
"""

from __future__ import annotations

import argparse
import ctypes
import tempfile
from pathlib import Path

import numpy as np
import torch

import lfm2
from lfm2.gguf import GGUFFile, export_gguf


def wide_fixture(out: Path) -> Path:
    """tests/test_gguf.py's `wide_f32`: the tests' chat tokenizer and an untied random model 256 wide, as F32."""
    from lfm2.tokenizer import Tokenizer
    from lfm2.train.tokenizer import train_tokenizer
    from tests.conftest import CORPUS, tiny_config, write_checkpoint

    train_tokenizer(CORPUS, vocab_size=600, out_dir=out)
    cfg = tiny_config(vocab_size=Tokenizer.from_dir(out).vocab_size, hidden_size=256, intermediate_size=256,
                      tie_word_embeddings=False, max_position_embeddings=512)
    write_checkpoint(out, cfg, seed=4)
    return export_gguf(out, out / "model-f32.gguf", "f32", progress=False)


def sequence(vocab: int, n: int, seed: int) -> list[int]:
    """BOS, then random ordinary tokens (ids past the 14 special tokens), as tests/test_gguf.py's `_sequence`."""
    g = torch.Generator().manual_seed(seed)
    return [1] + torch.randint(14, vocab, (n - 1,), generator=g).tolist()


def top1_prefill(llm, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return llm.model(torch.tensor([ids]))[0].argmax(-1)


def top1_decode(llm, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        cache = llm.model.make_cache(1, len(ids))
        return torch.cat([llm.model(torch.tensor([[t]]), cache)[0] for t in ids]).argmax(-1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", type=Path, help="an F32 or F16 GGUF file (default: the tests' wide fixture)")
    p.add_argument("--types", nargs="+", default=["Q8_0", "Q4_0", "Q4_K_M"], help="llama.cpp file types")
    p.add_argument("--sequences", type=int, default=4)
    p.add_argument("--length", type=int, default=256)
    args = p.parse_args()
    import llama_cpp

    with tempfile.TemporaryDirectory() as tmp:
        source = args.source or wide_fixture(Path(tmp) / "wide")
        print(f"source {source}; {args.sequences} sequences x {args.length} positions")
        print("| file | lfm2 native, prefill | lfm2 native, decode | lfm2 dequantized to float32 |")
        print("|---|---|---|---|")
        for ftype in args.types:
            out = Path(tmp) / f"{ftype}.gguf"
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
            params.nthread = 2
            if llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params)) != 0:
                raise SystemExit(f"llama.cpp could not quantize {source} to {ftype}")
            theirs_llm = llama_cpp.Llama(model_path=str(out), n_ctx=args.length, logits_all=True, verbose=False,
                                         n_threads=1, n_threads_batch=1, seed=0)
            native, dequantized = lfm2.load(out), lfm2.load(out, quantize="none")
            vocab = GGUFFile(out).tensors["token_embd.weight"].shape[0]
            hits, total = np.zeros(3), 0
            for seed in range(args.sequences):
                ids = sequence(vocab, args.length, seed)
                theirs_llm.reset()
                theirs_llm.eval(ids)
                theirs = torch.from_numpy(np.array(theirs_llm.scores[: len(ids)]).argmax(-1))
                for i, top1 in enumerate((top1_prefill(native, ids), top1_decode(native, ids),
                                          top1_prefill(dequantized, ids))):
                    hits[i] += (top1 == theirs).sum().item()
                total += len(ids)
            print(f"| {ftype} | " + " | ".join(f"{100 * h / total:.1f}%" for h in hits) + " |", flush=True)


if __name__ == "__main__":
    main()
