"""Run the recipe's step 10 (`BundleConfig.wide_*`) from the shipped model, on a CPU, and measure it.

    python benchmarks/bundle_step10.py --out runs/step10 [--threads 2] [--steps 250]

The full recipe (`python -m lfm2.train.bundle`) builds every step from scratch; this script starts
from the bundled model (steps 1-9) instead, with the data step 10 would get (`bundle.wide_rows`, mixed
with corpus text and copying rows as every fine-tuning stage is), so that a machine without a GPU can
add the step in about ten minutes (two cores, nothing else running). The recipe has the step off
(`wide_steps` 0): docs/benchmarks.md says what it measured. It prints and writes (`OUT/eval.json`) the
figures the model card quotes: held-out corpus perplexity, copying loss, the recipe's held-out tool
prompts, and the hand-written tool-call set (`lfm2.train.tool_eval`), which is only measured, never tuned on.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import torch

import lfm2
from lfm2.bundled import default_model_path
from lfm2.files import atomic_write
from lfm2.tokenizer import Tokenizer
from lfm2.train import tool_eval
from lfm2.train.bundle import (
    HELDOUT_ROWS,
    HELDOUT_SEED,
    VAL_FRACTION,
    BundleConfig,
    _mixed,
    _sft_sets,
    _warmup,
    copy_spans,
    heldout_prompts,
    ordinary_token_ids,
    tool_call_scores,
    wide_rows,
)
from lfm2.train.corpus import documents
from lfm2.train.data import TokenFile, prepare_chat, prepare_copy, prepare_text
from lfm2.train.synth import vocabulary
from lfm2.train.trainer import TrainConfig, evaluate, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=250, help="steps of step 10 (the recipe has it off: wide_steps 0)")
    ap.add_argument("--calls", type=float, default=None, help="wide_calls: of synth_wide's conversations, tool calls")
    ap.add_argument("--keep", type=float, default=None, help="wide_keep: of all, step 9's kind")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = default_model_path()
    raw = json.loads((base / "bundle_config.json").read_text())
    # The shipped model's own config (steps 1-9), with this version's step 10 fields at their defaults.
    cfg = BundleConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    cfg.out = args.out
    cfg.wide_steps = args.steps
    cfg.wide_calls = cfg.wide_calls if args.calls is None else args.calls
    cfg.wide_keep = cfg.wide_keep if args.keep is None else args.keep
    out, data = Path(args.out), Path(args.out) / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(base / name, data / name)
    tok = Tokenizer.from_dir(data)
    if not (data / "sft_wide_val.json").is_file():
        docs = documents()
        prepare_text(docs, tok, data, val_fraction=VAL_FRACTION)
        split, n, seed, variety = next(s for s in _sft_sets(cfg, vocabulary(docs, cfg.sft_word_min_count))
                                       if s[0] == "sft_wide")
        rows = wide_rows(cfg, n, seed, variety)
        cut = len(rows) * 95 // 100
        prepare_chat(_mixed(rows[:cut], docs, cfg), tok, data, split, max_len=cfg.sft_seq_len, drop_longer=True,
                     max_text_len=cfg.sft_text_tokens)
        prepare_chat(rows[cut:], tok, data, f"{split}_val", max_len=cfg.sft_seq_len, drop_longer=True)
        prepare_copy(data, "copy_val", 8 * cfg.copy_batch_size, cfg.copy_seq_len, ordinary_token_ids(cfg),
                     cfg.seed + 1, span=copy_spans(cfg))
    run = train(TrainConfig(data_dir=str(data), batch_size=cfg.sft_batch_size, seed=cfg.seed, eval_every=100,
                            save_every=50, device="cpu", out_dir=str(out / "sft_wide"), init_from=str(base),
                            train_split="sft_wide", val_split="sft_wide_val", seq_len=cfg.sft_seq_len, pack=True,
                            max_steps=cfg.wide_steps, lr=cfg.wide_lr, min_lr=cfg.wide_lr / 10,
                            warmup_steps=_warmup(cfg.wide_steps), call_weight=cfg.robust_call_weight))
    model_dir = run / "model"
    llm = lfm2.load(model_dir)
    pad = llm.tokenizer.pad_id or 0
    val = TokenFile.open(data, "val")
    text = TrainConfig(out_dir=str(out), data_dir=str(data), seq_len=cfg.seq_len, batch_size=HELDOUT_ROWS,
                       eval_batches=math.ceil(val.num_examples(cfg.seq_len, False) / HELDOUT_ROWS))
    copy = TrainConfig(out_dir=str(out), data_dir=str(data), seq_len=cfg.copy_seq_len, batch_size=cfg.copy_batch_size)
    loss = evaluate(llm.model, val, text, pad)["val_loss"]
    results = {"heldout_corpus_loss": loss, "heldout_corpus_perplexity": math.exp(loss),
               "copy_loss": evaluate(llm.model, TokenFile.open(data, "copy_val"), copy, pad)["val_loss"]}
    held = heldout_prompts(cfg.eval_prompts, cfg.seed + HELDOUT_SEED)
    for prefix, strict, whole in (("", False, True), ("strict_", True, True), ("strict_token_", True, False)):
        tool, arguments = tool_call_scores(llm, held, strict, whole)
        results[f"{prefix}right_tool"], results[f"{prefix}right_tool_and_arguments"] = tool, arguments
    results.update(tool_eval.evaluate(llm))
    atomic_write(out / "eval.json", json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
