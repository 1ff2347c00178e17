"""The recipe that builds lfm2's bundled tiny LFM2 from scratch, with our own pipeline.

    python -m lfm2.train.bundle --out runs/tiny --device cuda --install  # the full recipe (minutes on one GPU)
    python -m lfm2.train.bundle --out /tmp/t --quick       # a minutes-long smoke run of every step

Steps, each resumable (a finished step is skipped when the command is run again), numbered as the
recipe prints them:
1. tokenizer: a byte-level BPE with LFM2's special tokens, trained on the corpus (the Jargon File and
   WordNet glosses from Debian packages, `lfm2.train.corpus`) and on generated chat and tool
   conversations (`lfm2.train.synth`, training split only), with no merge across the character in
   front of a word (so a word copies into a tool call token for token);
2. data: the corpus packed into windows (with a held-out split), the conversations rendered
   with the chat template and masked to assistant tokens (twice: in the plain wordings the tokenizer
   saw, and in many richer ones);
3. pretraining on the corpus;
4. copying: rows of random tokens with one span repeated, loss on the repeat, until induction
   heads form (a tiny model pretrained for minutes cannot copy from its context, and calling an
   unseen tool is copying: its name from the tool list, the argument values from the request);
5.-9. supervised fine-tuning on the conversations packed into rows, with a few short corpus documents
   and copying rows mixed in so the model keeps some language modelling and its copying: first in
   the plain wordings (5), then in the rich ones (6), then over the rich stage's batches again with the
   learning rate restarted (7), then on new conversations whose requests are often random words around
   their content, with the loss on the choice of tool weighted up (8), then on new ones whose tool lists
   are longer and half of whose distractors differ from the right tool only in their subject (9) (steps
   3-9 with `lfm2.train.trainer`, so checkpoints resume after a kill);
10. evaluation: held-out corpus perplexity, the loss on repeated random spans (copying), and
   tool-call accuracy on generated prompts whose tools and phrasings the model never saw;
   written with the data and licence into a model card.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lfm2.files import atomic_write
from lfm2.train import tool_eval
from lfm2.train.synth import Variety, conversations, vocabulary

VAL_FRACTION = 0.02  # of corpus documents, held out for perplexity
# The held-out perplexity is over the whole held-out split (385 windows of 256 tokens), whatever the
# pretraining's batch size: the trainer's validation takes its first 8 batches, so it moves with it
# (the previous bundled model: 48.5 over the first 128 windows, 42.5 over all).
HELDOUT_ROWS = 64  # windows per evaluation batch
HELDOUT_SEED = 12345  # added to the recipe's seed: the seed of its held-out tool prompts


@dataclass
class BundleConfig:
    # The measurements in these comments were made with the pretraining of their time: 300 steps of
    # 16 x 256 tokens until 2026-11-26, when 16M tokens replaced it (see `pretrain_steps`).
    out: str
    vocab_size: int = 8192
    model: dict[str, Any] = field(default_factory=lambda: dict(
        hidden_size=256, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, intermediate_size=768,
        # Three attention layers of six: copying tool names and arguments out of the tool list
        # and the request is attention's job; the convolutions carry local context. Four of six (conv,
        # attention, conv, then three attention) with 900 + 300 fine-tuning steps (what fitted a session on
        # an AVX2-only CPU) measured worse: held-out strict calls 61% right tool / 48% right arguments,
        # unconstrained 35.5% / 19%, and induction formed later (copying loss 0.58 after the copying step,
        # against 0.26); confounded by the fewer steps, so not a verdict on the layout.
        layer_types=["conv", "full_attention", "conv", "full_attention", "conv", "full_attention"],
        max_position_embeddings=2048))
    sft_conversations: int = 60000
    # Corpus documents mixed into fine-tuning, against forgetting: this fraction of the rows, each cut to
    # sft_text_tokens. Documents train on every token and conversations on the assistant's few: 20% of the
    # rows at up to 768 tokens were 75% of the trained tokens and tool calls 8%; at 5% and 256 tokens (with
    # the copying rows below) documents are 18% and calls 23%, and held-out calls with the right arguments
    # rose from 41% to 60.5% (strict) and 7% to 15% (unconstrained); the corpus perplexity rose from 31 to 50.
    sft_text_fraction: float = 0.05
    sft_text_tokens: int = 256
    # Tools with made-up verbs in the fine-tuning conversations (not in the tokenizer's texts):
    # a verb no prior predicts is what teaches the model to read the name off the tool list.
    sft_made_up_verbs: float = 0.4
    # Made-up words of the fine-tuning conversations are real corpus words seen at least this often
    # (0: syllable strings). With syllables the model learned to copy those syllable tokens only, and
    # unseen tools named with real words ("humidity") were called 1.5% of the time.
    sft_word_min_count: int = 10
    # A second fine-tuning stage on the same conversations in many wordings (hundreds of request forms,
    # a dozen phrases per argument; `synth.Variety.rich_wording`): with the plain few, the model keys on
    # the template ("Could you find out the humidity" -> `find_out`). Fine-tuning on the rich wordings
    # from the start slowed the learning of copying values (36% of held-out value tokens right after
    # 1000 steps, against 77% with the plain wordings); after the plain stage, 400 steps lift held-out
    # calls with the right arguments (strict) from 27.5% to 41%.
    sft_rich_steps: int = 400
    sft_rich_lr: float = 3e-4
    # A third stage goes over the rich stage's batches again (the same seed draws the same rows, and after
    # sft_rich_steps new ones) for this many steps, its learning rate restarted at sft_repeat_lr (warmup, cosine
    # to a tenth). Measured on the 200 held-out prompts, against the model after the rich stage (strict calls:
    # right tool / right arguments; unconstrained; rich validation loss; corpus perplexity; copying loss):
    # before: 73.5% / 60.5%; 41% / 15%; 0.229; 50.5; 0.52. 300 steps: 73.5% / 68%; 36% / 17.5%; 0.216; 50.8;
    # 0.92. 600 steps: 75% / 70% (tool 7 prompts gained, 4 lost; arguments 22 gained, 3 lost); 41.5% / 21%;
    # 0.194; 48.5; 0.66. The 300 steps with associative-recall rows added, a quarter as many as the stage's
    # rows (random pairs "sep verb key", then a key among random tokens, the target its verb and key: the
    # shape of choosing a tool), gave 74% / 61%: the model had not learnt the recall (the verb right 27% of
    # the time, no better than guessing among the listed verbs; 1500 steps of such rows alone lifted that to
    # 48% only). Other conversations for these 600 steps instead (the rich wordings, new rows), measured on
    # 400 held-out prompts (seeds 12345 and 777; strict right tool / arguments; this stage as shipped: 296 /
    # 277): half the requests noisy (`sft_rich_noise` below) 276 / 254; lists of 2-5 tools (uniform, where the
    # stages draw 1-4, mostly 1-2) 288 / 254; both 280 / 261. Not adopted.
    sft_repeat_steps: int = 600
    sft_repeat_lr: float = 5e-4
    # Requests of the rich stage worded with random words around their content (`synth.Variety.noise`),
    # so that no template can be keyed on. Measured, not adopted: 0.3 (the rich stage rerun on the same
    # plain stage) gave held-out strict calls 71.5% right tool / 64% right arguments against 73.5% / 60.5%,
    # unconstrained 43% / 17% against 41% / 15%: within the spread of 200 prompts.
    sft_rich_noise: float = 0.0
    # Distractors with the right tool's verb and kinds of arguments (`synth.confusable`), in both stages,
    # so that only the subject or object tells them apart. Measured, not adopted: 0.5 with the noise above
    # and 1400 plain steps gave strict 58.5% / 51%, unconstrained 35% / 21.5% (worse at choosing the tool).
    sft_confusable: float = 0.0
    # Copying rows (as in the copying step) mixed into both fine-tuning stages, as many as this fraction
    # of their rows: fine-tuning on conversations alone lost the copying step's skill (loss on repeated
    # random spans 0.26 after copying, 5.4 after fine-tuning; chance is 9.0), and with it the copying of
    # words no training tool was named with ("show_nickname" -> `show_icyname`).
    sft_copy_fraction: float = 0.25
    # Conversations of up to this many exchanges (the same tool list, other tools called later):
    # the model learns to follow a conversation, and reads each long tool list for several calls.
    sft_exchanges: int = 3
    # Step 8, a fourth fine-tuning stage after the third: new conversations (their own seed) in the rich
    # wordings, robust_noise of the requests random words around their content (`synth.Variety.noise`) and
    # robust_prefix of all of them behind random words ("Chicken dandy! check the humidity in Paris":
    # `synth.Variety.prefix`), with the loss on the choice of tool counted robust_call_weight times
    # (`TrainConfig.call_weight`). Why: the model read a held-out request's capitalised first word as the
    # tool's verb ("Go ahead and lock a door": 19 of 42 right), and where no listed tool had it, it called
    # the last one listed. Measured from the model of the first seven steps (on a CPU; 400 held-out prompts,
    # seeds 12345 and 777, strict right tool / right arguments): before 311 / 302; this stage with
    # call_weight 1: 323 / 316; with 5: 327 / 318, "Go ahead and" 28 of 42 right, unconstrained (recipe's 200)
    # 67.5% / 56.5% -> 73.5% / 58.5%, corpus perplexity 25.7 -> 25.1. The weight is within noise of 1.
    # robust_lr 6e-4 (weight 5): 319 / 310, with a lower validation loss on these conversations (0.082 vs 0.086).
    robust_conversations: int = 30000
    robust_noise: float = 0.5
    robust_prefix: float = 0.4
    robust_call_weight: float = 5.0
    robust_steps: int = 500
    robust_lr: float = 3e-4
    # Step 9, a fifth fine-tuning stage: new conversations (their own seed) worded as step 8's, with its call
    # weight, but every tool list choice_tools[0] to choice_tools[1] tools long and choice_confusable of the
    # distractors sharing the right tool's verb and kinds of arguments (`synth.confusable`), so that only the
    # subject or object tells them apart. Why: after step 8 the model chose the right tool (strict, token by
    # token) for 78% of requests even worded as in training: a mask makes it commit to a name's first token,
    # usually the verb, before the part that says which tool it is. Choosing a strict call's tool by its whole
    # name (`lfm2.constrain`) lets that part decide (78% -> 84%), and this stage trains telling similar tools
    # apart by it (requests whose distractors all share the right tool's verb: 83.5% -> 99.5%). Measured from
    # step 8's model with `benchmarks/tool_choice.py` (on a CPU; 400 held-out prompts, seeds 12345 and 777;
    # right tool / right arguments, strict with whole names; in brackets token by token): before 368 / 358
    # (327 / 318); after this stage 392 / 382 (326 / 317); worded as in training 84% -> 94.5% right tool.
    # With confusable 0.0 or other step counts: not measured.
    choice_conversations: int = 30000
    choice_confusable: float = 0.5
    choice_tools: tuple[int, int] = (2, 5)
    choice_steps: int = 400
    choice_lr: float = 3e-4
    # Step 10, a sixth fine-tuning stage, for tools as people define them. Steps 5-9 draw every tool from
    # synth's one family (verb + subject, a few kinds of argument), and the model learned that family: on
    # hand-written requests over real-world tools (`lfm2.train.tool_eval`) it chose the right tool 35% of the
    # time and got the arguments right 5% (strict calls), and with no tools listed it opened a call for "Tell
    # me a joke.". This stage trains on `synth_wide`'s conversations (a catalogue of tool archetypes from
    # many domains, their names, parameter names and descriptions in many styles; requests that need no
    # tool, with tools listed or none), wide_keep of them step 9's kind so that it is not forgotten.
    # Off by default (wide_steps 0): measured and not adopted. Run from the shipped model on a CPU
    # (`benchmarks/bundle_step10.py`; the settings below chosen before measuring, the hand-written set being
    # a test set), 250 steps moved the hand-written figures little (strict right tool / arguments 35.4% / 5.5%
    # -> 33.5% / 9.1%; unconstrained 9.8% / 0% -> 23.2% / 1.2%) and cost the generator's held-out prompts a
    # lot (strict 97.5% / 94% -> 77% / 69%), and its replies to ordinary requests without tools, no longer
    # calls, were still poor ("You can I help you today?"). docs/benchmarks.md has the table.
    wide_conversations: int = 24000
    wide_keep: float = 0.25
    wide_calls: float = 0.6  # of synth_wide's conversations, tool calls; the rest need no tool
    wide_steps: int = 0
    wide_lr: float = 3e-4
    # Pretraining on 1000 x 64 rows of 256 tokens (16M tokens, 1.5 passes over the corpus) rather than
    # 300 x 16 (1.2M): measured on one GPU, the rest of the recipe as here (400 held-out prompts, seeds
    # 12345 and 777; strict right tool / right arguments; unconstrained on the first 200; corpus
    # perplexity over the first 128 held-out windows): 1.2M tokens 297 / 253, 46% / 35%, 49.7; 16M tokens
    # 311 / 302, 67.5% / 56.5%, 30.4. The copying step then forms induction at once (copying loss 0.22
    # after 200 of its steps, against 9.0 = chance), and the stages after it keep it (0.11 at the end,
    # against 1.75). 8 heads of 32 (4 KV heads) instead of 4 of 64, with the 1.2M tokens: 306 / 257,
    # 33% / 13%. On 2 CPU cores the 16M tokens take about 2 hours in float32 (1 with native bf16), which
    # makes the recipe a GPU one (`device`).
    pretrain_steps: int = 1000
    # Induction formed after ~500 steps of 32 rows x 96 tokens with the 1.2M pretraining tokens, within 200
    # with the 16M (copying loss 0.22 at step 200, 0.05 at 400): fewer steps would do, not yet measured.
    copy_steps: int = 1400
    copy_batch_size: int = 32
    copy_seq_len: int = 96
    sft_steps: int = 1100  # the first, plain-wording stage
    batch_size: int = 64  # pretraining rows
    seq_len: int = 256
    sft_batch_size: int = 12
    sft_seq_len: int = 768  # rows of packed conversations (each whole; the longest of 3000 measured: 727)
    eval_prompts: int = 200
    seed: int = 0
    corpus_limit: int = 0  # 0: the whole corpus
    device: str = "cpu"  # where the training steps run ("cuda": bfloat16 autocast); evaluation runs on the CPU

    @classmethod
    def quick(cls, out: str) -> BundleConfig:
        """Every step at toy scale, to check the recipe end to end in a few minutes."""
        return cls(out=out, vocab_size=600, sft_conversations=300, pretrain_steps=20, copy_steps=10, sft_steps=20,
                   sft_rich_steps=10, sft_repeat_steps=10, robust_steps=10, robust_conversations=300,
                   choice_steps=10, choice_conversations=300, wide_steps=10, wide_conversations=300,
                   batch_size=4, sft_batch_size=4, seq_len=64, copy_batch_size=4, copy_seq_len=32, sft_seq_len=1024,
                   eval_prompts=10, corpus_limit=200,
                   model=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                              intermediate_size=48, layer_types=["conv", "full_attention"],
                              max_position_embeddings=512))


def build(cfg: BundleConfig, docs: list[str] | None = None, data_only: bool = False) -> Path:
    """Run every step (skipping finished ones); `docs` replaces the Debian corpus (tests). `data_only`
    stops after the data step and returns the data directory: a CPU prepares it (minutes of Python),
    a GPU machine trains from it (`benchmarks/bundle_variants.py`)."""
    from lfm2.tokenizer import Tokenizer
    from lfm2.train.corpus import PACKAGES, documents
    from lfm2.train.data import prepare_chat, prepare_copy, prepare_text
    from lfm2.train.tokenizer import train_tokenizer
    from lfm2.train.trainer import TrainConfig, train

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "bundle_config.json", json.dumps(asdict(cfg), indent=2) + "\n")
    data = out / "data"
    # Each corpus or conversation split of step 2 is done once its validation file (written last) is there.
    missing = [name for name in ("val", *(f"{split}_val" for split, *_ in _sft_sets(cfg, None)))
               if not (data / f"{name}.json").is_file()]
    if docs is None:  # only the tokenizer and those files read the corpus (a GPU machine may lack apt)
        docs = documents() if missing else []
    if cfg.corpus_limit:
        docs = random.Random(cfg.seed).sample(docs, min(cfg.corpus_limit, len(docs)))
    if not (data / "tokenizer.json").is_file():
        # Plain conversations (no made-up verbs): the tokenizer, and with it every later step,
        # does not depend on how the fine-tuning data is varied.
        convs = conversations(cfg.sft_conversations, seed=cfg.seed, split="train")
        print(f"[1/11] tokenizer: {cfg.vocab_size} tokens from {len(docs)} documents and {len(convs)} conversations")
        train_tokenizer(_tokenizer_texts(docs, convs), cfg.vocab_size, data, words_alike=True)
    tok = Tokenizer.from_dir(data)
    if missing:
        print("[2/11] data: packing the corpus, rendering the conversations")
        if "val" in missing:
            prepare_text(docs, tok, data, val_fraction=VAL_FRACTION)
        words = vocabulary(docs, cfg.sft_word_min_count) if cfg.sft_word_min_count else None
        for split, n, seed, variety in _sft_sets(cfg, words):
            if f"{split}_val" not in missing:
                continue
            sft_convs = (wide_rows(cfg, n, seed, variety) if split == "sft_wide" else
                         conversations(n, seed=seed, split="train", exchanges=cfg.sft_exchanges, variety=variety))
            cut = len(sft_convs) * 95 // 100
            prepare_chat(_mixed(sft_convs[:cut], docs, cfg), tok, data, split, max_len=cfg.sft_seq_len,
                         drop_longer=True, max_text_len=cfg.sft_text_tokens)
            prepare_chat(sft_convs[cut:], tok, data, f"{split}_val", max_len=cfg.sft_seq_len, drop_longer=True)
    if not (data / "copy_val.json").is_file():  # random tokens: seconds to make, so need not travel with the data
        print("[2/11] data: copying rows")
        for name, rows, seed in (("copy", cfg.copy_steps * cfg.copy_batch_size, cfg.seed),
                                 ("copy_val", 8 * cfg.copy_batch_size, cfg.seed + 1)):
            prepare_copy(data, name, rows, cfg.copy_seq_len, ordinary_token_ids(cfg), seed, span=copy_spans(cfg))
    if data_only:
        return data
    print("[3/11] pretraining")
    common = dict(data_dir=str(data), batch_size=cfg.batch_size, seed=cfg.seed, eval_every=100, save_every=50,
                  device=cfg.device)
    pre = train(TrainConfig(out_dir=str(out / "pretrain"), model=cfg.model, seq_len=cfg.seq_len,
                            max_steps=cfg.pretrain_steps, lr=3e-3, min_lr=3e-4,
                            warmup_steps=max(1, cfg.pretrain_steps // 20), **common))
    print("[4/11] copying (induction heads)")
    copy = train(TrainConfig(**{**common, "batch_size": cfg.copy_batch_size}, out_dir=str(out / "copy"),
                             init_from=str(pre / "model"), train_split="copy", val_split="copy_val",
                             seq_len=cfg.copy_seq_len, max_steps=cfg.copy_steps, lr=1e-3, min_lr=1e-3,
                             warmup_steps=_warmup(cfg.copy_steps), weight_decay=0.0))

    def finetune(name: str, init: Path, split: str, steps: int, lr: float, warmup: int,
                 call_weight: float = 1.0) -> Path:
        """A fine-tuning stage from `init`'s model: rows packed with `split`'s conversations, cosine to lr / 10."""
        return train(TrainConfig(**{**common, "batch_size": cfg.sft_batch_size}, out_dir=str(out / name),
                                 init_from=str(init / "model"), train_split=split, val_split=f"{split}_val",
                                 seq_len=cfg.sft_seq_len, pack=True, max_steps=steps, lr=lr, min_lr=lr / 10,
                                 warmup_steps=warmup, call_weight=call_weight))

    print("[5/11] supervised fine-tuning")
    sft = finetune("sft", copy, "sft", cfg.sft_steps, 1e-3, max(1, cfg.sft_steps // 20))
    print("[6/11] supervised fine-tuning, rich wordings")
    rich = finetune("sft_rich", sft, "sft_rich", cfg.sft_rich_steps, cfg.sft_rich_lr, _warmup(cfg.sft_rich_steps))
    print("[7/11] supervised fine-tuning, rich wordings again")
    again = finetune("sft_repeat", rich, "sft_rich", cfg.sft_repeat_steps, cfg.sft_repeat_lr,
                     _warmup(cfg.sft_repeat_steps))
    print("[8/11] supervised fine-tuning, robust wordings")
    robust = finetune("sft_robust", again, "sft_robust", cfg.robust_steps, cfg.robust_lr, _warmup(cfg.robust_steps),
                      cfg.robust_call_weight)
    print("[9/11] supervised fine-tuning, choosing among similar tools")
    choice = finetune("sft_choice", robust, "sft_choice", cfg.choice_steps, cfg.choice_lr, _warmup(cfg.choice_steps),
                      cfg.robust_call_weight)
    last = choice
    if cfg.wide_steps:
        print("[10/11] supervised fine-tuning, tools as people define them")
        last = finetune("sft_wide", choice, "sft_wide", cfg.wide_steps, cfg.wide_lr, _warmup(cfg.wide_steps),
                        cfg.robust_call_weight)
    print("[11/11] evaluation")
    model_dir = last / "model"
    results = evaluate(model_dir, pre, copy, cfg)
    for where in (out, model_dir):  # the model directory is what `--install` ships: it says how it was made
        atomic_write(where / "eval.json", json.dumps(results, indent=2) + "\n")
    atomic_write(model_dir / "bundle_config.json", json.dumps(asdict(cfg), indent=2) + "\n")
    atomic_write(model_dir / "README.md", model_card(cfg, results, PACKAGES))
    atomic_write(model_dir / "generation_config.json", json.dumps(
        {"temperature": 0.3, "min_p": 0.15, "repetition_penalty": 1.05, "bos_token_id": tok.bos_id,
         "eos_token_id": sorted(tok.stop_ids), "pad_token_id": tok.pad_id}, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return model_dir


def _sft_sets(cfg: BundleConfig, words: tuple[str, ...] | None) -> list[tuple[str, int, int, Variety]]:
    """The fine-tuning conversation splits: (name, how many, seed, variety). The first two are the same
    conversations worded two ways; the third new ones, noisier; the fourth new ones again, with longer
    tool lists of similar tools; the fifth, where step 10 runs, mostly `synth_wide`'s (`wide_rows`)."""
    v = cfg.sft_made_up_verbs, words
    return [("sft", cfg.sft_conversations, cfg.seed, Variety(*v, False, 0.0, cfg.sft_confusable)),
            ("sft_rich", cfg.sft_conversations, cfg.seed, Variety(*v, True, cfg.sft_rich_noise, cfg.sft_confusable)),
            ("sft_robust", cfg.robust_conversations, cfg.seed + 7,
             Variety(*v, True, cfg.robust_noise, cfg.sft_confusable, cfg.robust_prefix)),
            ("sft_choice", cfg.choice_conversations, cfg.seed + 8,
             Variety(*v, True, cfg.robust_noise, cfg.choice_confusable, cfg.robust_prefix, tuple(cfg.choice_tools))),
            *([("sft_wide", cfg.wide_conversations, cfg.seed + 9,
                Variety(*v, True, cfg.robust_noise, cfg.choice_confusable, cfg.robust_prefix,
                        tuple(cfg.choice_tools)))] if cfg.wide_steps else [])]


def wide_rows(cfg: BundleConfig, n: int, seed: int, variety: Variety) -> list[dict]:
    """Step 10's conversations: `synth_wide`'s, with `cfg.wide_keep` of them step 9's kind, shuffled."""
    from lfm2.train.synth_wide import wide_conversations

    keep = round(n * cfg.wide_keep)
    rows = wide_conversations(n - keep, seed=seed, calls=cfg.wide_calls)
    rows += conversations(keep, seed=seed, split="train", exchanges=cfg.sft_exchanges, variety=variety)
    random.Random(seed).shuffle(rows)
    return rows


def _warmup(steps: int) -> int:
    """Warmup of a stage that starts from a trained model: a tenth of its steps, at most 20."""
    return max(1, min(20, steps // 10))


def ordinary_token_ids(cfg: BundleConfig) -> tuple[int, int]:
    """The [low, high) ids of merged tokens (no special tokens, no bare bytes): what copying rows draw."""
    from lfm2.train.tokenizer import SPECIAL_TOKENS

    return len(SPECIAL_TOKENS) + 256, cfg.vocab_size


def copy_spans(cfg: BundleConfig) -> tuple[int, int]:
    """Lengths of the repeated spans in the copying rows: 8 to 40 tokens, as far as a row has room."""
    half = (cfg.copy_seq_len + 1) // 2
    return min(8, half), min(40, half)


def _mixed(convs: list[dict], docs: list[str], cfg: BundleConfig) -> list[dict]:
    """Conversations with corpus documents (training split only) shuffled in as `{"text": ...}` rows,
    and `cfg.sft_copy_fraction` as many rows again of copying rows (`data.copy_rows`) as `{"ids", "mask"}`."""
    from lfm2.train.data import copy_rows, is_validation

    rng = random.Random(cfg.seed + 1)
    train_docs = [d for d in docs if d.strip() and not is_validation(d, VAL_FRACTION)]
    n = round(len(convs) * cfg.sft_text_fraction / (1 - cfg.sft_text_fraction))
    rows = convs + [{"text": rng.choice(train_docs)} for _ in range(n)]
    rng.shuffle(rows)
    if cfg.sft_copy_fraction:
        ids, mask = copy_rows(round(len(rows) * cfg.sft_copy_fraction), cfg.copy_seq_len, ordinary_token_ids(cfg),
                              cfg.seed + 2, copy_spans(cfg))
        rows += [{"ids": i, "mask": m} for i, m in zip(ids.tolist(), mask.tolist(), strict=True)]
        random.Random(cfg.seed + 3).shuffle(rows)
    return rows


def _tokenizer_texts(docs: list[str], convs: list[dict]) -> list[str]:
    from lfm2.chat_template import DEFAULT_CHAT_TEMPLATE, render_chat_template
    from lfm2.tools import prepare_messages

    rendered = [render_chat_template(DEFAULT_CHAT_TEMPLATE, prepare_messages(c["messages"], True),
                                     tools=c.get("tools"), bos_token="") for c in convs]
    return docs + rendered


def evaluate(model_dir: Path, pretrain_dir: Path, copy_dir: Path, cfg: BundleConfig) -> dict[str, Any]:
    """Held-out perplexity of the corpus, copying, and tool-call accuracy on unseen tools and phrasings."""
    import lfm2
    from lfm2.train.data import TokenFile
    from lfm2.train.trainer import TrainConfig
    from lfm2.train.trainer import evaluate as validation_loss

    copy_val_losses = _val_losses(copy_dir)
    llm, pretrained = lfm2.load(model_dir), lfm2.load(pretrain_dir / "model").model
    # The pretrained and the shipped (fine-tuned) model on the same held-out text: fine-tuning can make it forget.
    data = Path(cfg.out) / "data"
    val = TokenFile.open(data, "val")
    held_text = TrainConfig(out_dir=str(cfg.out), data_dir=str(data), seq_len=cfg.seq_len, batch_size=HELDOUT_ROWS,
                            eval_batches=math.ceil(val.num_examples(cfg.seq_len, False) / HELDOUT_ROWS))
    pad = llm.tokenizer.pad_id or 0
    final_loss = validation_loss(llm.model, val, held_text, pad)["val_loss"]
    pretrain_loss = validation_loss(pretrained, val, held_text, pad)["val_loss"]
    # Copying: the loss on the second copy of a random span, before the copying step and now.
    copy_cfg = TrainConfig(out_dir=str(cfg.out), data_dir=str(data), seq_len=cfg.copy_seq_len,
                           batch_size=cfg.copy_batch_size)
    copy_val = TokenFile.open(data, "copy_val")
    low, high = ordinary_token_ids(cfg)  # the copying rows' tokens: uniform over these is chance
    copy_loss = validation_loss(llm.model, copy_val, copy_cfg, pad)["val_loss"]
    pretrain_copy_loss = validation_loss(pretrained, copy_val, copy_cfg, pad)["val_loss"]
    held = heldout_prompts(cfg.eval_prompts, cfg.seed + HELDOUT_SEED)
    scores = {strict: tool_call_scores(llm, held, strict) for strict in (False, True)}
    by_token = tool_call_scores(llm, held, True, whole_names=False)
    # Requests written apart from `synth` (benchmarks/data/tool_eval.json, in a clone of the repository):
    # whether the model calls tools as people define and ask for them. A test set: no step is tuned on it.
    independent = tool_eval.evaluate(llm) if tool_eval.DEFAULT_PATH.is_file() else {}
    return {**independent, "heldout_corpus_loss": final_loss, "heldout_corpus_perplexity": math.exp(final_loss),
            "pretrain_heldout_corpus_loss": pretrain_loss,
            "pretrain_heldout_corpus_perplexity": math.exp(pretrain_loss),
            "copy_loss": copy_loss, "pretrain_copy_loss": pretrain_copy_loss,
            "copy_step_loss": copy_val_losses[-1] if copy_val_losses else None,
            "copy_chance_loss": math.log(high - low),
            "tool_prompts": len(held), "right_tool": scores[False][0], "right_tool_and_arguments": scores[False][1],
            "strict_right_tool": scores[True][0], "strict_right_tool_and_arguments": scores[True][1],
            "strict_token_right_tool": by_token[0], "strict_token_right_tool_and_arguments": by_token[1]}


def _val_losses(run_dir: Path) -> list[float]:
    """The validation losses a training run logged, in step order."""
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [m["val_loss"] for m in rows if "val_loss" in m]


def heldout_prompts(n: int, seed: int) -> list[dict]:
    """`n` generated tool-use prompts whose tools and phrasings training never saw, each calling a tool."""
    return conversations(n, seed=seed, split="heldout", tool_fraction=1.0)


def tool_call_scores(llm: Any, convs: list[dict], strict: bool, whole_names: bool = True) -> tuple[float, float]:
    """Greedy first replies to `convs`: the fraction calling the expected tool, and with exactly the
    expected arguments (see `tool_call_results`)."""
    results = tool_call_results(llm, convs, strict, whole_names)
    return sum(t for t, _ in results) / len(convs), sum(a for _, a in results) / len(convs)


def tool_call_results(llm: Any, convs: list[dict], strict: bool, whole_names: bool = True) -> list[tuple[bool, bool]]:
    """Greedy first replies to `convs`, each as (calls the expected tool, with exactly the expected
    arguments); `strict` constrains the calls to the listed schemas (`lfm2.constrain`), choosing each tool
    by its whole name unless `whole_names` is False (then token by token); see `tool_eval.first_calls`."""
    kind = ("strict" if whole_names else "strict, token by token") if strict else "unconstrained"
    requests = [(conv["messages"][:1], conv["tools"]) for conv in convs]
    results = []
    for calls, conv in zip(tool_eval.first_calls(llm, requests, strict, whole_names, f"tool-call eval ({kind})"),
                           convs, strict=True):
        expected = conv["expected"]
        tool = bool(calls) and calls[0]["function"]["name"] == expected["name"]
        results.append((tool, tool and json.loads(calls[0]["function"]["arguments"]) == expected["arguments"]))
    return results


def _confusable_line(cfg: BundleConfig) -> str:
    """The model card's line on confusable distractors, if the recipe used them."""
    if not cfg.sft_confusable:
        return ""
    return (f"{cfg.sft_confusable:.0%} of the distractor tools share the right tool's verb and kinds of arguments, "
            "so that only the subject or object tells them apart.\n")


def _noise_words(cfg: BundleConfig) -> str:
    """The model card's words on noisy requests, if the recipe used them."""
    if not cfg.sft_rich_noise:
        return ""
    return f"; {cfg.sft_rich_noise:.0%} of the requests random words around the subject and the values"


def model_card(cfg: BundleConfig, results: dict[str, Any], packages: dict[str, str]) -> str:
    lo, hi = copy_spans(cfg)
    data_lines = "\n".join(f"- `{name}` (Debian): {licence}" for name, licence in packages.items())
    device_flag = "" if cfg.device == "cpu" else f" --device {cfg.device}"
    where = ("on the CPU, under bfloat16 autocast where it multiplies bf16 natively" if cfg.device == "cpu"
             else f"on one GPU (`{cfg.device}`), under bfloat16 autocast with float32 weights")
    return f"""# lfm2-tiny

A tiny LFM2-architecture model (gated short convolutions + grouped-query attention) trained from
scratch by lfm2's own pipeline, bundled so that lfm2 works out of the box without a network.
It is a demonstration model: it chats in simple English and calls tools in LFM2's format; it
knows almost nothing about the world.

## Data and licences
{data_lines}
- Chat and tool-use conversations generated by `lfm2.train.synth` (our own code).

## Tokenizer
A byte-level BPE of {cfg.vocab_size} tokens with LFM2's special tokens, split regex and file layout,
trained so that no merge joins a word to the character in front of it: a word is the same tokens
after a space (in a request), a quote (in a call's arguments) or an underscore (in a tool name),
which is what lets so small a model copy a word it has never seen into a tool call.

## Training
`python -m lfm2.train.bundle --out DIR{device_flag}` ({cfg.pretrain_steps} pretraining steps of {cfg.batch_size} x
{cfg.seq_len} tokens, {cfg.copy_steps} copying steps of {cfg.copy_batch_size} x {cfg.copy_seq_len} random tokens, then
{cfg.sft_steps} supervised fine-tuning steps of {cfg.sft_batch_size} rows of {cfg.sft_seq_len} tokens packed
with whole conversations of up to {cfg.sft_exchanges} exchanges, {cfg.sft_text_fraction:.0%} of the rows' documents
from the corpus (cut to {cfg.sft_text_tokens} tokens), and copying rows like those of the copying step, as many as
{cfg.sft_copy_fraction:.0%} of the rows, so that fine-tuning keeps that skill; {where}). The conversations'
tools are built from parts, many made up (subjects, parameter names, values, and {cfg.sft_made_up_verbs:.0%} of the
verbs), so that the model learns to copy from the tool list and the request rather than to memorise; the
made-up words are real words of the corpus (seen at least {cfg.sft_word_min_count} times, the held-out tools' words
excluded), so that copying is learned for any word rather than for a closed set of syllables.
{_confusable_line(cfg)}A second stage of {cfg.sft_rich_steps} steps fine-tunes on the same conversations in many
wordings (hundreds of request forms, a dozen phrases per kind of argument, none of them the held-out
ones{_noise_words(cfg)}), and a third of {cfg.sft_repeat_steps} steps draws that stage's batches again (the same
seed: its first {cfg.sft_rich_steps} repeat it) with the learning rate restarted at {cfg.sft_repeat_lr:g}. A fourth
of {cfg.robust_steps} steps fine-tunes on {cfg.robust_conversations} new conversations:
{cfg.robust_noise:.0%} of their requests are random words around the subject and the values,
{cfg.robust_prefix:.0%} stand behind random words ("Chicken dandy! check the humidity in Paris"), and the loss
on the choice of tool (a call's first tokens) counts {cfg.robust_call_weight:g} times over. A fifth of
{cfg.choice_steps} steps fine-tunes on {cfg.choice_conversations} new conversations worded the same way, whose
tool lists have {cfg.choice_tools[0]} to {cfg.choice_tools[1]} tools and {cfg.choice_confusable:.0%} of whose
distractors share the right tool's verb and kinds of arguments, so that only the subject or object tells them
apart.{_wide_line(cfg)}
Config: `bundle_config.json`.

## Measured quality
- Held-out corpus perplexity: {results['heldout_corpus_perplexity']:.1f} (the shipped model),
  {results['pretrain_heldout_corpus_perplexity']:.1f} (the pretraining checkpoint, before fine-tuning)
- Copying from the context (loss on the second copy of a random {lo}-{hi}-token span, nats; chance
  {results['copy_chance_loss']:.1f}): {results['pretrain_copy_loss']:.2f} after pretraining,
  {results['copy_step_loss']:.2f} after the copying step, {results['copy_loss']:.2f} shipped
{_independent_lines(results)}- Tool calls on {results['tool_prompts']} held-out prompts of the training generator
  (`lfm2.train.synth`'s templates with tools and phrasings that training never used; they measure how well
  the model learned that generator's family of tools and requests, not tool use in general), greedy:
  - with strict tool calls (`strict_tools=True`: every token of a call kept valid against the listed
    schemas, and each call's tool chosen by its whole name's probability, `lfm2.constrain`): right tool
    {results['strict_right_tool']:.1%}, right tool and arguments {results['strict_right_tool_and_arguments']:.1%}
  - strict, with the tool chosen token by token (`LLM.whole_tool_names = False`, as grammar-constrained
    decoding elsewhere does): right tool {results['strict_token_right_tool']:.1%}, right tool and arguments
    {results['strict_token_right_tool_and_arguments']:.1%}
  - unconstrained: right tool {results['right_tool']:.1%}, right tool and arguments
    {results['right_tool_and_arguments']:.1%}

## Limitations
A 7M-parameter model: it answers the kinds of questions its conversations contain (greetings,
capitals, colours, small sums, tool use) and little else, and its sums are often wrong; fine-tuned
on conversations of up to {cfg.sft_exchanges} exchanges, it may lose its way in longer ones. It calls the tools
of its training data (weather, calculator, unit conversion) reliably. Tools as people define them and requests
as they write them are another matter: on the hand-written requests above it rarely gets a call fully right.
Treat it as a demonstration of the format and the runtime, not as a tool-calling assistant.
"""


def _wide_line(cfg: BundleConfig) -> str:
    if not cfg.wide_steps:
        return ""
    return (f" A sixth of {cfg.wide_steps} steps fine-tunes on {cfg.wide_conversations} conversations of which\n"
            f"{1 - cfg.wide_keep:.0%} come from `lfm2.train.synth_wide`: tools from a catalogue of real-world kinds\n"
            "(finance, travel, messaging, smart home, ...) named and parametrised in many styles, and requests that\n"
            "need no tool, with tools listed or none; the rest are the fifth stage's kind.")


def _independent_lines(results: dict[str, Any]) -> str:
    """The card's lines for the hand-written evaluation (`lfm2.train.tool_eval`), where it was run."""
    if "independent_tool_prompts" not in results:
        return ""
    r = results
    return (f"- Tool calls on {r['independent_tool_prompts']} hand-written requests over "
            f"{r['independent_tools']} tools\n"
            "  of many domains (`benchmarks/data/tool_eval.json`, written apart from the training data and never\n"
            "  used to train or tune; `python -m lfm2.train.tool_eval`), greedy: with strict tool calls right tool\n"
            f"  {r['independent_strict_right_tool']:.1%}, right tool and arguments "
            f"{r['independent_strict_right_tool_and_arguments']:.1%}; unconstrained right tool\n"
            f"  {r['independent_right_tool']:.1%}, right tool and arguments "
            f"{r['independent_right_tool_and_arguments']:.1%}\n")


def main() -> None:
    ap = argparse.ArgumentParser(description="Build lfm2's bundled tiny model from scratch.")
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="toy scale, to check the recipe in minutes")
    ap.add_argument("--device", default="cpu", help="where to train: cpu (default) or cuda (bfloat16 autocast)")
    ap.add_argument("--install", action="store_true", help="copy the result into lfm2/bundled/ (the default model)")
    ap.add_argument("--data-only", action="store_true", help="stop after the tokenizer and the data files")
    args = ap.parse_args()
    cfg = BundleConfig.quick(args.out) if args.quick else BundleConfig(out=args.out)
    cfg.device = args.device
    if args.data_only:
        print(f"data files in {build(cfg, data_only=True)}")
        return
    model_dir = build(cfg)
    if args.install:
        install(model_dir)


def install(model_dir: Path) -> Path:
    """Copy a built model into the package as the default model, replacing the old one atomically."""
    import shutil

    from lfm2.bundled import default_model_path

    target = default_model_path()
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(model_dir, tmp)
    old = target.with_name(f".{target.name}.old")
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    print(f"installed {model_dir} as {target}")
    return target


if __name__ == "__main__":
    main()
