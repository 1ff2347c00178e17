"""Shared fixtures: small random-weight LFM2 checkpoints written to disk in Hugging Face layout."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from lfm2.config import ModelConfig
from lfm2.models import build_model
from lfm2.weights import save_checkpoint

torch.set_num_threads(min(2, os.cpu_count() or 1))

# Real chat templates and configs, beside the project (../shared/reference); tests that read them
# skip where it is absent, and the run fails if it is present and one of them skipped anyway.
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
_reference_skips: list[str] = []


def reference_file(*parts: str) -> Path:
    """A file under ../shared/reference, or a skip naming it when the reference is not there."""
    path = REFERENCE.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"reference file {path} is not present (the shared/ folder beside the project)")
    return path


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and "reference" in report.keywords and REFERENCE.is_dir():
        _reference_skips.append(f"{report.nodeid}: {report.longrepr[-1] if report.longrepr else ''}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A reference test that skips while the reference is present checks nothing: fail the run."""
    if _reference_skips:
        print(f"\n{len(_reference_skips)} reference test(s) skipped although {REFERENCE} is present:", file=sys.stderr)
        for line in _reference_skips:
            print(f"  {line}", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def tiny_config(**overrides) -> ModelConfig:
    """A small dense config; every architectural feature, tiny widths."""
    base = dict(
        vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=96, layer_types=["conv", "full_attention", "conv", "full_attention"],
        max_position_embeddings=256,
    )
    return ModelConfig(**{**base, **overrides})


def random_model(config: ModelConfig, seed: int = 0):
    """A random model whose every weight matters: norms and expert biases are randomised too.

    The blocks' output projections are scaled up so that the prediction depends on the
    context, not only on the current token (docs/testing.md).
    """
    torch.manual_seed(seed)
    model = build_model(config, device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith(("out_proj.weight", "w2.weight")):
                p.mul_(4.0)
            elif name.endswith("conv.conv.weight"):
                p.copy_(torch.randn_like(p) * 0.5)
        for name, b in model.named_buffers():
            if name.endswith("expert_bias"):
                b.copy_(torch.randn_like(b) * 0.5)
    return model.eval()


@torch.inference_mode()
def solo_decode(model, prompt, params, max_new_tokens, stop_ids=frozenset(), ignore_eos=False) -> list[int]:
    """The plainest decode loop, one prompt and no engine: the reference `lfm2.engine` is held to.
    A stop id ends it and is not returned."""
    from lfm2.sampling import TokenHistory, make_generator, sample_next

    cache = model.make_cache(1, len(prompt) + max_new_tokens)
    logits = model(torch.tensor([list(prompt)]), cache, last_only=True)[:, -1]
    generator = None if params.greedy else make_generator(params.seed)
    history = TokenHistory(torch.tensor([list(prompt)]), model.config.vocab_size) if params.needs_history else None
    out: list[int] = []
    while len(out) < max_new_tokens:
        token = sample_next(logits, params, generator, history)
        if not ignore_eos and int(token) in stop_ids:
            break
        out.append(int(token))
        if history is not None:
            history.update(token)
        logits = model(token[:, None], cache)[:, -1]
    return out


def engine_decode(model, prompts, params, max_new_tokens, stop_ids=frozenset(), ignore_eos=False) -> list[list[int]]:
    """Every prompt's tokens from one `lfm2.engine.Engine` run (rows decoded together), no prefix cache."""
    from lfm2.engine import Engine

    engine = Engine(model, max_batch=len(prompts), max_queue=0,
                    max_len=max(len(p) for p in prompts) + max_new_tokens)
    rows: list[list[int]] = [[] for _ in prompts]
    for row, token in engine.generate(prompts, params, max_new_tokens, stop_ids, ignore_eos):
        rows[row].append(token)
    return rows


def write_gguf_tensor(path: Path, data, raw_dtype) -> Path:
    """A GGUF file holding one tensor "t" of already-encoded blocks (`data`: uint8 rows, or a numpy array of
    `raw_dtype`), written by the reference `gguf` package."""
    import gguf

    w = gguf.GGUFWriter(path, arch="lfm2")
    w.add_tensor("t", data, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_checkpoint(path: Path, config: ModelConfig, seed: int = 0) -> Path:
    save_checkpoint(random_model(config, seed), path)
    return path


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    return write_checkpoint(tmp_path / "tiny", tiny_config())


CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, how are you today? I am fine, thank you.",
    "What is the weather like in Paris? It is sunny and warm.",
    "Numbers: 12345, 3.14159, and 2026 are all numbers.",
    "今天天气很好，我们去公园散步吧。",
    "مرحبا بك في عالم الذكاء الاصطناعي",
    "Emoji time 😀🎉🚀 and more emoji 👍🏽",
    "Liquid foundation models run fast on small devices.",
    "def add(a, b):\n    return a + b\n",
    "Привет, как дела? Всё хорошо.",
] * 20


@pytest.fixture(scope="session")
def chat_checkpoint(tmp_path_factory) -> Path:
    """A random model with a real byte-level BPE tokenizer (trained here) and an untied head.

    The untied head makes greedy output depend on the context (a tied random model repeats its
    input token), so token-level comparisons with transformers mean something.
    """
    from lfm2.train.tokenizer import train_tokenizer

    path = tmp_path_factory.mktemp("chat")
    train_tokenizer(CORPUS, vocab_size=600, out_dir=path)
    from lfm2.tokenizer import Tokenizer

    vocab = Tokenizer.from_dir(path).vocab_size
    cfg = tiny_config(vocab_size=vocab, tie_word_embeddings=False, max_position_embeddings=512)
    return write_checkpoint(path, cfg, seed=3)


@pytest.fixture(scope="module")
def ops():
    """`torch.ops.lfm2_quant` (the C++ kernels), or a skip saying why they are not here."""
    from lfm2 import kernels

    loaded = kernels.ops()
    if loaded is None:
        pytest.skip(f"the C++ kernels are not available here: {kernels.build_error() or 'disabled'}")
    return loaded
