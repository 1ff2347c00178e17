"""GGUF: our writer and reader against each other, against the source checkpoint, and against llama.cpp.

Round trips start from the session's `chat_checkpoint` (random weights, untied head, a trained
byte-level BPE) and from a tied MoE checkpoint whose embedding is padded beyond the tokenizer.
The llama.cpp tests run where `llama-cpp-python` is installed (the `llama` extra) and skip
elsewhere; they use untied random models, whose predictions depend on the context (see
docs/testing.md), and assert that the reference output is diverse.
"""

from __future__ import annotations

import ctypes
import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import lfm2
from lfm2.config import ModelConfig
from lfm2.convert import add_convert_parser, convert
from lfm2.errors import CheckpointError, ConfigError, TokenizerError
from lfm2.gguf import NAME_TABLE, READ_TYPES, GGUFFile, export_gguf, import_gguf, tensor_plan
from lfm2.tokenizer import Tokenizer
from tests.conftest import CORPUS, tiny_config, write_checkpoint, write_gguf_tensor

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
TEXTS = sorted(set(CORPUS)) + [
    "  leading spaces, trailing tabs\t\t\nand\r\nnewlines\n\n\n",
    "I'M sure it'S THEIR'S; we've 'd 'll 1234567 3.14",
    "<|startoftext|><|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "混合 text with 日本語, עברית and émojis 🤖🧪",
]
PROMPT = "Hello, how are you today? The quick brown fox"


def _logits(llm, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return llm.model(torch.tensor([ids]))[0]


def _sequence(vocab: int, n: int, seed: int = 0) -> list[int]:
    """BOS, then random ordinary tokens (ids past the 14 special tokens)."""
    g = torch.Generator().manual_seed(seed)
    return [1] + torch.randint(14, vocab, (n - 1,), generator=g).tolist()


@pytest.fixture(scope="module")
def dense(chat_checkpoint):
    return lfm2.load(chat_checkpoint)


@pytest.fixture(scope="module")
def dense_gguf(chat_checkpoint, tmp_path_factory):
    """The chat checkpoint written in every type `export_gguf` offers."""
    out = tmp_path_factory.mktemp("gguf")
    return {t: export_gguf(chat_checkpoint, out / f"model-{t}.gguf", t, progress=False)
            for t in ("f32", "f16", "bf16", "q8_0", "q4_0")}


def _with_tokenizer(path: Path, source: Path, config: ModelConfig, seed: int) -> Path:
    write_checkpoint(path, config, seed=seed)
    for name in TOKENIZER_FILES:
        shutil.copy(source / name, path / name)
    return path


@pytest.fixture(scope="module")
def moe_checkpoint(chat_checkpoint, tmp_path_factory):
    """A tied MoE model (one dense block, then experts) whose vocabulary is padded past the tokenizer's."""
    vocab = Tokenizer.from_dir(chat_checkpoint).vocab_size + 3
    cfg = tiny_config(model_type="lfm2_moe", vocab_size=vocab, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=32, num_dense_layers=1, max_position_embeddings=512)
    return _with_tokenizer(tmp_path_factory.mktemp("moe"), chat_checkpoint, cfg, seed=5)


# -- round trips -------------------------------------------------------------------------------------


def test_f32_round_trip_dense_identical(dense, dense_gguf):
    loaded = lfm2.load(dense_gguf["f32"])
    assert loaded.config == dense.config
    state, ref = loaded.model.state_dict(), dense.model.state_dict()
    assert state.keys() == ref.keys()
    for name in ref:
        assert torch.equal(state[name], ref[name]), name
    ids = _sequence(dense.config.vocab_size, 64)
    assert torch.equal(_logits(loaded, ids), _logits(dense, ids))


def test_f32_round_trip_moe_identical(moe_checkpoint, tmp_path):
    ref = lfm2.load(moe_checkpoint)
    path = export_gguf(moe_checkpoint, tmp_path / "moe.gguf", "f32", progress=False)
    f = GGUFFile(path)
    assert f.metadata["general.architecture"] == "lfm2moe"
    assert f.tensors["blk.1.ffn_gate_exps.weight"].shape == (4, 32, 64)  # (E, moe ff, d)
    assert "output.weight" not in f.tensors  # tied
    assert f.metadata["tokenizer.ggml.token_type"][-3:] == [int(gguf.TokenType.UNUSED)] * 3  # padded ids
    loaded = lfm2.load(path)
    assert loaded.config == ref.config
    for name, t in ref.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], t), name
    ids = _sequence(ref.config.vocab_size - 3, 64)
    assert torch.equal(_logits(loaded, ids), _logits(ref, ids))


@pytest.mark.parametrize("kind, dtype, bound", [("f16", torch.float16, 0.01), ("bf16", torch.bfloat16, 0.05)])
def test_half_precision_round_trip(dense, dense_gguf, kind, dtype, bound):
    """Weight matrices equal the originals rounded to the half type; norms and the conv kernel stay F32.

    So the logits are exactly those of the rounded model, and within float16 (bfloat16) precision
    of the original: measured max |diff| 0.0021 (F16) and 0.023 (BF16) for logits of magnitude 2.8.
    """
    loaded = lfm2.load(dense_gguf[kind])
    rounded = lfm2.load(dense.path)
    with torch.no_grad():
        for name, p in rounded.model.named_parameters():
            if p.ndim >= 2 and not name.endswith("conv.conv.weight"):
                p.copy_(p.to(dtype).float())
    for name, p in rounded.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], p), name
    ids = _sequence(dense.config.vocab_size, 64)
    assert torch.equal(_logits(loaded, ids), _logits(rounded, ids))
    diff = (_logits(loaded, ids) - _logits(dense, ids)).abs().max().item()
    assert 0 < diff <= bound


# The largest error a correct reader can show, per block of 32 values, as a fraction of the block's
# largest magnitude: Q8_0 rounds to steps of absmax/127 (half a step, plus the float16 rounding of
# the step itself); Q4_0 uses steps of absmax/8 and clips the top level, so up to a whole step.
MAX_ERROR = {"q8_0": 0.6 / 127, "q4_0": 1.1 / 8}


@pytest.mark.parametrize("kind, logit_bound, agree", [("q8_0", 0.1, 0.95), ("q4_0", 1.0, 0.6)])
def test_quantized_round_trip(dense, dense_gguf, kind, logit_bound, agree):
    """Every dequantized weight is within the quantization error of the original, and the logits
    stay close: measured max |diff| 0.047 (Q8_0) and 0.48 (Q4_0) for logits of magnitude 2.8,
    top-1 agreement 98% and 73% over 64 positions."""
    loaded = lfm2.load(dense_gguf[kind], quantize="none")  # the dequantizing reader
    ref = dense.model.state_dict()
    for name, q in loaded.model.state_dict().items():
        w = ref[name]
        if w.ndim < 2 or name.endswith("conv.conv.weight"):
            assert torch.equal(q, w), name  # kept F32
            continue
        # Our Q4_0 files keep the embedding and the output head Q8_0, as llama-quantize keeps them finer.
        head = name in ("model.embed_tokens.weight", "lm_head.weight")
        bound = MAX_ERROR["q8_0" if head else kind]
        blocks = w.reshape(-1, 32)
        err = (q.reshape(-1, 32) - blocks).abs().amax(1)
        assert (err <= blocks.abs().amax(1) * bound).all(), name
        assert (err > 0).any(), name
    ids = _sequence(dense.config.vocab_size, 64)
    a, b = _logits(loaded, ids), _logits(dense, ids)
    assert (a - b).abs().max().item() <= logit_bound
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() >= agree


def test_file_layout_matches_llama_cpp_converter(dense_gguf, dense):
    """Metadata and tensor types as llama.cpp's convert_hf_to_gguf.py writes them for LFM2."""
    f = GGUFFile(dense_gguf["q8_0"])
    m, cfg = f.metadata, dense.config
    assert m["general.architecture"] == "lfm2"
    assert m["lfm2.attention.head_count_kv"] == [0, 2, 0, 2]  # 0 marks the conv blocks
    assert m["lfm2.block_count"] == 4 and m["lfm2.embedding_length"] == 64
    assert m["lfm2.feed_forward_length"] == cfg.intermediate_size
    assert m["lfm2.shortconv.l_cache"] == 3 and m["lfm2.context_length"] == 512
    assert m["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert (m["tokenizer.ggml.model"], m["tokenizer.ggml.pre"]) == ("gpt2", "lfm2")
    assert m["tokenizer.ggml.add_bos_token"] is True and m["tokenizer.ggml.bos_token_id"] == 1
    assert m["tokenizer.ggml.eos_token_id"] == dense.tokenizer.eos_id
    assert m["tokenizer.chat_template"] == dense.tokenizer.chat_template
    types = {name: t.type for name, t in f.tensors.items()}
    assert types["blk.0.shortconv.conv.weight"] == gguf.GGMLQuantizationType.F32
    assert f.tensors["blk.0.shortconv.conv.weight"].shape == (64, 3)  # squeezed (d, 1, L) -> (d, L)
    assert types["blk.1.attn_q_norm.weight"] == types["token_embd_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert types["blk.1.attn_q.weight"] == types["output.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert set(f.tensors) == {g for g, _ in tensor_plan(cfg)}


def test_name_table_covers_every_parameter(moe_checkpoint, chat_checkpoint):
    for ckpt in (chat_checkpoint, moe_checkpoint):
        cfg = ModelConfig.from_json(ckpt / "config.json")
        ours = [n for _, names in tensor_plan(cfg) for n in names]
        expected = set(lfm2.load(ckpt).model.state_dict()) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
        assert sorted(ours) == sorted(expected)
    assert len({g for g, _, _ in NAME_TABLE}) == len(NAME_TABLE)


def _gguf_with(src: Path, dst: Path, tensors: dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]] | None = None,
               drop: tuple[str, ...] = (), metadata: dict | None = None, drop_keys: tuple[str, ...] = (),
               extra: dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]] | None = None) -> Path:
    """A copy of a GGUF file with tensors replaced (name -> (data, type)), dropped or added (`extra`),
    or metadata changed or dropped."""
    r = gguf.GGUFReader(src)
    metadata = dict(metadata or {})
    arch = metadata.pop("general.architecture", r.fields["general.architecture"].contents())
    w = gguf.GGUFWriter(dst, arch=arch)
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop_keys:
            continue
        vtype = f.types[0]
        w.add_key_value(key, metadata.get(key, f.contents()), vtype,
                        sub_type=f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
    for t in r.tensors:
        if t.name in drop:
            continue
        data, qtype = (tensors or {}).get(t.name, (t.data, t.tensor_type))
        w.add_tensor(t.name, np.ascontiguousarray(data), raw_dtype=qtype)
    for name, (data, qtype) in (extra or {}).items():
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_every_listed_type_is_read(dense_gguf, dense, tmp_path):
    """Q4_1, Q5_0, Q5_1 (which gguf-py can write) dequantize to within half a step of the original;
    the K-quants (gguf-py cannot write them) are random blocks read back as `gguf.quants` decodes
    them, shape and order intact. Numerical agreement of every type with llama.cpp's own
    dequantization is tested below, where llama-cpp-python is installed."""
    T = gguf.GGMLQuantizationType
    ref = dense.model.state_dict()
    # Largest error per block of 32, from the block's values: half a step for the min/max types
    # (Q4_1, Q5_1), a step of absmax/16 (top level clipped) for Q5_0; F16/BF16 round to 11/8 bits.
    writable = {
        T.Q4_1: lambda b: (b.amax(1) - b.amin(1)) / 15 * 0.55,
        T.Q5_1: lambda b: (b.amax(1) - b.amin(1)) / 31 * 0.55,
        T.Q5_0: lambda b: b.abs().amax(1) / 16 * 1.05,
        T.F16: lambda b: b.abs().amax(1) * 2**-11,
        T.BF16: lambda b: b.abs().amax(1) * 2**-8,
    }
    names = {"blk.0.ffn_up.weight": "model.layers.0.feed_forward.w3.weight",
             "blk.1.attn_v.weight": "model.layers.1.self_attn.v_proj.weight",
             "blk.2.shortconv.in_proj.weight": "model.layers.2.conv.in_proj.weight"}
    for qtype, max_error in writable.items():
        replaced = {g: (gguf.quants.quantize(ref[o].numpy(), qtype), qtype) for g, o in names.items()}
        loaded = lfm2.load(_gguf_with(dense_gguf["f32"], tmp_path / f"{qtype.name}.gguf", replaced))
        for g, o in names.items():
            w, q = ref[o].reshape(-1, 32), loaded.model.state_dict()[o].reshape(-1, 32)
            err = (q - w).abs().amax(1)
            assert (err <= max_error(w)).all() and (err > 0).any(), (qtype.name, g)
    rng = np.random.default_rng(0)
    # Byte offsets of the float16 scales in each K-quant block, set to sane values (random bytes could be NaN).
    scales = {T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}
    for qtype, offsets in scales.items():
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, size=(96 * 256 // block, size), dtype=np.uint8)
        for off in offsets:
            raw[:, off : off + 2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
        data = raw.reshape(96, 256 // block * size)  # a (96, 256) tensor as raw bytes
        got = GGUFFile(write_gguf_tensor(tmp_path / f"{qtype.name}.gguf", data, qtype)).tensor("t")
        assert got.shape == (96, 256) and got.dtype == torch.float32
        assert torch.equal(got, torch.from_numpy(gguf.quants.dequantize(data, qtype)))
        assert got.isfinite().all() and got.std() > 0
    assert {*writable, *scales, T.F32, T.Q8_0, T.Q4_0} == set(READ_TYPES)


def test_gguf_to_hf_to_load_identical(dense_gguf, dense, tmp_path):
    from safetensors import safe_open

    ids = _sequence(dense.config.vocab_size, 24)
    for kind, dtype in (("f16", None), ("q8_0", None), ("f16", torch.float16)):
        out = import_gguf(dense_gguf[kind], tmp_path / f"{kind}-{dtype}", dtype=dtype, progress=False)
        with safe_open(str(out / "model.safetensors"), framework="pt") as f:
            assert f.get_tensor("model.layers.0.feed_forward.w1.weight").dtype == (dtype or torch.float32)
        via_hf, direct = lfm2.load(out, dtype=dtype), lfm2.load(dense_gguf[kind], dtype=dtype, quantize="none")
        assert torch.equal(_logits(via_hf, ids), _logits(direct, ids)), kind
        assert via_hf.config == direct.config
        assert via_hf.tokenizer.chat_template == dense.tokenizer.chat_template
        assert via_hf.tokenizer.special_tokens == dense.tokenizer.special_tokens
        for text in TEXTS:
            assert via_hf.tokenizer.encode(text, True) == dense.tokenizer.encode(text, True)


def test_tokenizer_round_trip(dense, dense_gguf, moe_checkpoint, tmp_path):
    """The GGUF vocabulary, rebuilt, encodes exactly as the source tokenizer.json (with and without
    BOS), decodes the same, and keeps the special tokens, stop ids and chat template."""
    moe_path = export_gguf(moe_checkpoint, tmp_path / "moe.gguf", "q8_0", progress=False)
    src = dense.tokenizer
    for path in (dense_gguf["f16"], moe_path):
        tok = lfm2.load(path).tokenizer
        for text in TEXTS:
            for special in (False, True):
                ids = src.encode(text, add_special_tokens=special)
                assert tok.encode(text, add_special_tokens=special) == ids, (text, special)
                assert tok.decode(ids) == src.decode(ids)
                assert tok.decode(ids, skip_special_tokens=True) == src.decode(ids, skip_special_tokens=True)
        assert tok.special_tokens == {k: v for k, v in src.special_tokens.items()}
        assert tok.stop_ids == src.stop_ids and tok.bos_id == src.bos_id == 1
        assert tok.vocab_size == src.vocab_size  # the MoE file's padding ids are placeholders, not tokens
        assert tok.chat_template == src.chat_template
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
        assert tok.apply_chat_template(messages, add_generation_prompt=True) == src.apply_chat_template(
            messages, add_generation_prompt=True
        )
    assert src.encode(TEXTS[-1]) != src.encode(TEXTS[-1], add_special_tokens=True)  # the BOS check means something


def test_pre_token_in_vocabulary_is_taken_whole():
    """llama.cpp's `lfm2` pre-tokenizer sets ignore_merges: a pre-token found in the vocabulary is one
    token even when the merges cannot build it. (Trained vocabularies rarely show the difference,
    so it is tested on a vocabulary made for it.)"""
    from tokenizers import pre_tokenizers

    from lfm2.gguf import build_vocab_tokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = ["<|startoftext|>", *alphabet, "he", "Ġhello", "hello"]
    types = [int(gguf.TokenType.CONTROL)] + [int(gguf.TokenType.NORMAL)] * (len(tokens) - 1)
    tok = build_vocab_tokenizer(tokens, types, ["h e"], "<|startoftext|>", None, True, False, "test")
    ids = tok.encode("hello hello", add_special_tokens=True).ids
    assert [tokens[i] for i in ids] == ["<|startoftext|>", "hello", "Ġhello"]
    assert [tokens[i] for i in tok.encode("help", add_special_tokens=False).ids] == ["he", "l", "p"]


def test_loaded_gguf_generates(dense_gguf, dense):
    llm = lfm2.load(dense_gguf["q8_0"])
    assert llm.generate(PROMPT, max_new_tokens=6, temperature=0) == dense.generate(
        PROMPT, max_new_tokens=6, temperature=0
    )


def test_generation_defaults_travel_in_gguf(chat_checkpoint, tmp_path):
    ckpt = shutil.copytree(chat_checkpoint, tmp_path / "ckpt")
    (ckpt / "generation_config.json").write_text(json.dumps({"temperature": 0.7, "top_k": 40, "min_p": 0.05}))
    path = export_gguf(ckpt, tmp_path / "m.gguf", "f16", progress=False)
    params = lfm2.load(path).sampling_params()
    assert (params.temperature, params.top_k, params.min_p) == (pytest.approx(0.7), 40, pytest.approx(0.05))
    back = lfm2.load(import_gguf(path, tmp_path / "hf", progress=False)).sampling_params()
    assert (back.temperature, back.top_k) == (pytest.approx(0.7), 40)


# -- writing: atomicity, refusals, the command --------------------------------------------------------


def test_interrupted_export_leaves_no_file(chat_checkpoint, tmp_path, monkeypatch):
    import lfm2.gguf as lg

    out = tmp_path / "out" / "model.gguf"
    out.parent.mkdir()
    out.write_bytes(b"the previous file")
    calls = {"n": 0}
    encode = lg._encode

    def failing(t, ttype):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return encode(t, ttype)

    monkeypatch.setattr(lg, "_encode", failing)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(chat_checkpoint, out, "q8_0", progress=False)
    assert calls["n"] == 5
    assert out.read_bytes() == b"the previous file"
    assert [p.name for p in out.parent.iterdir()] == ["model.gguf"]  # no temporary file left behind


def test_export_refuses_what_llama_cpp_cannot_run(moe_checkpoint, chat_checkpoint, tmp_path):
    ckpt = shutil.copytree(moe_checkpoint, tmp_path / "moe")
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "routed_scaling_factor": 2.5}))
    with pytest.raises(ConfigError, match=r"config\.json.*routed_scaling_factor is 2\.5.*never scales"):
        export_gguf(ckpt, tmp_path / "x.gguf", progress=False)
    bare = tmp_path / "bare"
    write_checkpoint(bare, tiny_config())
    with pytest.raises(TokenizerError, match=r"bare/tokenizer\.json: not found"):
        export_gguf(bare, tmp_path / "x.gguf", progress=False)
    # A GPT-2 style tokenizer (byte-level regex, merges applied to every word) does not split like
    # LFM2's, which llama.cpp assumes for pre-tokenizer 'lfm2': refused, not silently mis-tokenized.
    other = shutil.copytree(chat_checkpoint, tmp_path / "gpt2tok")
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(TokenizerError, match=r"gpt2tok/tokenizer\.json: this tokenizer does not encode like LFM2's"):
        export_gguf(other, tmp_path / "x.gguf", progress=False)
    assert not (tmp_path / "x.gguf").exists()
    with pytest.raises(ConfigError, match="unknown GGUF type 'q5_k'"):
        export_gguf(chat_checkpoint, tmp_path / "x.gguf", "q5_k", progress=False)


def test_convert_command(chat_checkpoint, tmp_path, dense):
    import argparse

    parser = argparse.ArgumentParser(prog="lfm2")
    add_convert_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "m.gguf"
    args = parser.parse_args(["convert", str(chat_checkpoint), "--to", "gguf", "--type", "q8_0", "-o", str(out), "-q"])
    args.func(args)
    assert GGUFFile(out).metadata["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    args = parser.parse_args(["convert", str(out), "--to", "hf", "--type", "bf16", "-o", str(tmp_path / "hf"), "-q"])
    args.func(args)
    assert lfm2.load(tmp_path / "hf", dtype="float32").config == dense.config
    with pytest.raises(ConfigError, match="q4_0.*cannot be written to a Hugging Face checkpoint"):
        convert(out, "hf", tmp_path / "hf2", "q4_0")
    with pytest.raises(SystemExit):
        parser.parse_args(["convert", str(out), "--to", "onnx", "-o", "x"])


# -- reading: every defect is one clear error ---------------------------------------------------------


def test_unknown_architecture(dense_gguf, tmp_path):
    path = _gguf_with(dense_gguf["f32"], tmp_path / "llama.gguf", metadata={"general.architecture": "llama"})
    with pytest.raises(ConfigError, match=r"llama\.gguf: architecture 'llama' \(metadata key 'general.architecture'\) "
                                          r"is not supported; lfm2 reads .*'lfm2' and 'lfm2moe'"):
        lfm2.load(path)


def test_truncated_tensor_data(dense_gguf, tmp_path):
    src = dense_gguf["q8_0"]
    last = max(GGUFFile(src).tensors.values(), key=lambda t: t.offset)
    data = src.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: last.offset + last.nbytes - 100])
    with pytest.raises(CheckpointError, match=rf"cut\.gguf: tensor '{last.name}' \(Q8_0 \[\d+, \d+\]\) needs bytes "
                                              r"\d+\.\.\d+ but the file has only \d+ bytes: the file is truncated"):
        lfm2.load(tmp_path / "cut.gguf")
    (tmp_path / "head.gguf").write_bytes(data[:3000])  # cut inside the metadata
    with pytest.raises(CheckpointError, match=r"head\.gguf: the file ends at byte 3000 while reading .* is truncated"):
        lfm2.load(tmp_path / "head.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(CheckpointError, match=r"junk\.gguf: not a GGUF file \(it starts with b'PK"):
        lfm2.load(tmp_path / "junk.gguf")


def test_a_vocabulary_cut_short_or_not_utf8_is_named(dense_gguf, tmp_path):
    """The tokens array, read in one loop (`_Cursor.strings`): a file cut anywhere inside it, or a token that is
    not UTF-8, is a clear error naming the key, never a short vocabulary."""
    data = dense_gguf["q8_0"].read_bytes()
    key = data.index(b"tokenizer.ggml.tokens") + len(b"tokenizer.ggml.tokens")
    first = key + 4 + 4 + 8  # the value type, the element type, the count: then the first token's length
    for cut in (first + 3, first + 8 + 1, first + 5000, first + 5001):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=r"cut\.gguf: the file ends at byte \d+ while reading the value of "
                                                  r"metadata key 'tokenizer\.ggml\.tokens'.* is truncated"):
            GGUFFile(tmp_path / "cut.gguf")
    bad = bytearray(data)
    bad[first + 8] = 0xFF  # the first token's first byte
    (tmp_path / "bad.gguf").write_bytes(bytes(bad))
    with pytest.raises(CheckpointError, match=r"bad\.gguf: .*'tokenizer\.ggml\.tokens'.*string 0 at byte \d+ is not "
                                              r"valid UTF-8"):
        GGUFFile(tmp_path / "bad.gguf")
    field = gguf.GGUFReader(dense_gguf["q8_0"]).fields["tokenizer.ggml.tokens"]  # gguf-py's reader as the reference
    tokens = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
    assert len(tokens) > 100 and GGUFFile(dense_gguf["q8_0"]).metadata["tokenizer.ggml.tokens"] == tokens


def test_missing_tensor(dense_gguf, tmp_path):
    path = _gguf_with(dense_gguf["f16"], tmp_path / "m.gguf", drop=("blk.2.shortconv.conv.weight",))
    with pytest.raises(CheckpointError, match=r"m\.gguf: tensor 'blk\.2\.shortconv\.conv\.weight' is missing; it holds "
                                              r"our 'model\.layers\.2\.conv\.conv\.weight'"):
        lfm2.load(path)


def test_misshapen_and_unexpected_tensors(dense_gguf, tmp_path):
    bad = {"blk.0.ffn_norm.weight": (np.ones(32, np.float32), gguf.GGMLQuantizationType.F32)}
    with pytest.raises(CheckpointError, match=r"tensor 'blk\.0\.ffn_norm\.weight' has shape \[32\], expected \[64\]"):
        lfm2.load(_gguf_with(dense_gguf["f32"], tmp_path / "s.gguf", bad))
    f = GGUFFile(dense_gguf["f32"])
    extra = {"blk.9.ffn_up.weight": (f.tensor("blk.0.ffn_up.weight").numpy(), gguf.GGMLQuantizationType.F32)}
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\) 'blk\.9\.ffn_up\.weight'"):
        lfm2.load(_gguf_with(dense_gguf["f32"], tmp_path / "x.gguf", extra=extra))


def test_unsupported_quantization_type(dense_gguf, tmp_path):
    # IQ4_NL is a real GGML type (blocks of 32 values in 18 bytes, like Q4_0) that lfm2 cannot dequantize.
    f = GGUFFile(dense_gguf["q4_0"])
    assert f.tensors["blk.0.ffn_up.weight"].type == gguf.GGMLQuantizationType.Q4_0
    raw = f.raw("blk.0.ffn_up.weight").reshape(96, -1)
    path = _gguf_with(dense_gguf["q4_0"], tmp_path / "iq.gguf",
                      {"blk.0.ffn_up.weight": (raw, gguf.GGMLQuantizationType.IQ4_NL)})
    with pytest.raises(CheckpointError, match=r"iq\.gguf: tensor 'blk\.0\.ffn_up\.weight' is stored as IQ4_NL "
                                              r"\(GGML type id 20\), which lfm2 cannot dequantize; it reads F32, F16"):
        lfm2.load(path)
    # A type id no GGML version defines: patch the tensor table in place.
    made_up = shutil.copy(dense_gguf["f32"], tmp_path / "made_up.gguf")
    r = gguf.GGUFReader(made_up, mode="r+")
    victim = next(t for t in r.tensors if t.name == "blk.1.attn_k.weight")
    victim.field.parts[4][0] = 99
    r.data.flush()
    del r
    with pytest.raises(CheckpointError, match=r"made_up\.gguf: tensor 'blk\.1\.attn_k\.weight' has GGML type id 99, "
                                              r"which is no known GGML type"):
        lfm2.load(made_up)


def test_missing_metadata_key(dense_gguf, tmp_path):
    path = _gguf_with(dense_gguf["f32"], tmp_path / "k.gguf", drop_keys=("lfm2.shortconv.l_cache",))
    with pytest.raises(ConfigError, match=r"k\.gguf: metadata key 'lfm2\.shortconv\.l_cache' is missing"):
        lfm2.load(path)


# -- llama.cpp ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp")


def _llama(llama_cpp, path: Path, n_ctx: int = 512):
    # One thread: llama.cpp threads spin while waiting, which stalls on a shared 2-core machine.
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=1,
                           n_threads_batch=1, seed=0)


def _llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def test_llama_cpp_f16_greedy_equals_ours(llama_cpp, dense_gguf, dense):
    """llama.cpp runs our F16 file: same prompt tokens, and the same 32 greedy tokens as ours."""
    path = dense_gguf["f16"]
    llm, ours = _llama(llama_cpp, path), lfm2.load(path)
    prompt = ours.tokenizer.encode(PROMPT, add_special_tokens=True)
    assert llm.tokenize(PROMPT.encode(), add_bos=True, special=True) == prompt
    messages = [{"role": "user", "content": "Hi <3 ¿qué tal? 你好"}]
    chat = ours.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert llm.tokenize(chat.encode(), add_bos=False, special=True) == ours.tokenizer.encode(chat)
    reference = []
    llm.reset()
    llm.eval(prompt)
    for _ in range(32):
        reference.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([reference[-1]])
    assert len(set(reference)) >= 16  # the fixture's predictions depend on the context (measured: 31 distinct)
    ids = list(prompt)
    for _ in range(32):
        ids.append(int(_logits(ours, ids)[-1].argmax()))
    assert ids[len(prompt) :] == reference


def test_llama_cpp_q8_0_teacher_forced_agreement(llama_cpp, dense_gguf, dense):
    """Top-1 agreement on a teacher-forced sequence of 256 positions: measured 97.3% (the original
    unquantized model: 96.5%); the rest are near-ties, as llama.cpp quantizes activations to 8 bits
    inside its Q8_0 matmuls."""
    path = dense_gguf["q8_0"]
    ids = _sequence(dense.config.vocab_size, 256)
    theirs = _llama_logits(_llama(llama_cpp, path), ids)
    ours = _logits(lfm2.load(path, quantize="none"), ids).numpy()
    assert len(set(theirs.argmax(-1).tolist())) >= 64
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.95


def test_llama_cpp_runs_our_moe_file(llama_cpp, moe_checkpoint, tmp_path):
    """The stacked experts, router, expert bias and MoE metadata mean to llama.cpp what they mean to us.
    (The model is tied, so only logits are compared; measured max |diff| 0.013 at logit scale 55.)"""
    path = export_gguf(moe_checkpoint, tmp_path / "moe.gguf", "f32", progress=False)
    ours_llm = lfm2.load(path)
    ids = _sequence(ours_llm.config.vocab_size - 3, 96)
    theirs = _llama_logits(_llama(llama_cpp, path), ids)
    ours = _logits(ours_llm, ids).numpy()
    assert np.abs(ours - theirs).max() <= 1e-3 * np.abs(theirs).max()


@pytest.fixture(scope="module")
def wide_f32(chat_checkpoint, tmp_path_factory):
    """An untied model 256 wide, so that llama-quantize can use the K-quants (rows of 256 values)."""
    vocab = Tokenizer.from_dir(chat_checkpoint).vocab_size
    cfg = tiny_config(vocab_size=vocab, hidden_size=256, intermediate_size=256, tie_word_embeddings=False,
                      max_position_embeddings=512)
    ckpt = _with_tokenizer(tmp_path_factory.mktemp("wide"), chat_checkpoint, cfg, seed=4)
    return export_gguf(ckpt, ckpt / "model-f32.gguf", "f32", progress=False)


@pytest.mark.parametrize("ftype, qtype", [
    ("Q4_0", "Q4_0"), ("Q4_1", "Q4_1"), ("Q5_0", "Q5_0"), ("Q5_1", "Q5_1"), ("Q8_0", "Q8_0"),
    ("Q2_K", "Q2_K"), ("Q3_K_M", "Q3_K"), ("Q4_K_M", "Q4_K"), ("Q5_K_M", "Q5_K"), ("Q6_K", "Q6_K"),
])
def test_llama_cpp_quantized_files_read_alike(llama_cpp, wide_f32, tmp_path, ftype, qtype):
    """Files quantized by llama.cpp itself: our dequantization gives llama.cpp's logits.

    Measured over 128 positions, max |ours - llama.cpp| 0.04-0.08 for logits of magnitude 2.5,
    while the original unquantized model differs from llama.cpp by up to 1.84 (Q2_K); top-1
    agreement 93-100%."""
    out = tmp_path / f"{ftype}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = 2
    params.pure = True  # every matrix in this type, no mixture
    assert llama_cpp.llama_model_quantize(str(wide_f32).encode(), str(out).encode(), ctypes.byref(params)) == 0
    f = GGUFFile(out)
    assert {t.type.name for t in f.tensors.values() if len(t.shape) >= 2} - {"F32"} == {qtype}
    ids = _sequence(f.tensors["token_embd.weight"].shape[0], 128)
    theirs = _llama_logits(_llama(llama_cpp, out, 256), ids)
    ours = _logits(lfm2.load(out, quantize="none"), ids).numpy()
    assert np.abs(ours - theirs).max() <= 0.15
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.9


def _decode_logits(llm, ids: list[int]) -> torch.Tensor:
    """Teacher-forced logits a token at a time through the cache: the decode kernels' products."""
    with torch.no_grad():
        cache = llm.model.make_cache(1, len(ids))
        return torch.cat([llm.model(torch.tensor([[t]]), cache)[0] for t in ids])


@pytest.mark.parametrize("ftype", ["Q8_0", "Q4_0", "Q4_K_M"])
def test_llama_cpp_files_agree_with_our_native_kernels(llama_cpp, wide_f32, tmp_path, ftype):
    """Files as llama-quantize makes them for users (its own mixture of types: the Q4_0 file's embedding is Q4_0,
    its head Q6_K), loaded by default: natively, in lfm2's int8 / int4 / K-quant kernels (int4 in 16-row tiles
    on AVX-512 VNNI CPUs, Q4_K in them wherever the SIMD code runs). Teacher-forced top-1 against llama.cpp on
    the same file, at prefill (one forward) and at decode (a token at a time), over 512 positions: at least 95%,
    and as high as the same file dequantized to float32, to within near-ties (issue #30). Measured (2 x 512
    positions, docs/benchmarks.md): native 96.1-97.7%, dequantized 95.7-97.5%; Q4_0 native was 95.0% while its
    embedding was requantized to int8."""
    out = tmp_path / f"{ftype}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(wide_f32).encode(), str(out).encode(), ctypes.byref(params)) == 0
    vocab = GGUFFile(out).tensors["token_embd.weight"].shape[0]
    native, dequantized = lfm2.load(out), lfm2.load(out, quantize="none")
    assert any(type(m).__name__ in ("QuantLinear", "KQuantLinear") for m in native.model.modules())
    llm = _llama(llama_cpp, out, 256)
    hits = torch.zeros(3)
    for seed in (0, 1):
        ids = _sequence(vocab, 256, seed)
        theirs = torch.from_numpy(_llama_logits(llm, ids).argmax(-1))
        assert len(set(theirs.tolist())) >= 64  # predictions that depend on the context
        for i, logits in enumerate((_logits(native, ids), _decode_logits(native, ids), _logits(dequantized, ids))):
            hits[i] += (logits.argmax(-1) == theirs).sum()
    prefill, decode, floats = (hits / 512).tolist()
    assert min(prefill, decode) >= 0.95 and min(prefill, decode) >= floats - 0.01, (prefill, decode, floats)


@pytest.mark.parametrize(("kind", "fmt"), [("q8_0", "int8"), ("q4_0", "int4"), ("f16", None)])
def test_a_gguf_file_keeps_its_own_format_by_default(dense_gguf, kind, fmt):
    """Without `quantize`, a Q8_0 / Q4_0 file runs as int8 / int4 layers made from its blocks (what
    `quantize=` names explicitly, the same weights), F16 as float; `quantize="none"` dequantizes."""
    from lfm2.gguf import GGUFFile, native_format
    from lfm2.quant import QuantEmbedding, QuantLinear

    path = dense_gguf[kind]
    assert native_format(GGUFFile(path)) == fmt
    default = lfm2.load(path)
    # The blocks' layers; the embedding and an untied head stay int8, as the file stores them.
    layers = [m for name, m in default.model.named_modules()
              if isinstance(m, QuantLinear) and not isinstance(m, QuantEmbedding) and name != "lm_head"]
    assert bool(layers) == (fmt is not None) and all(m.kind == fmt for m in layers)
    if fmt is not None:
        explicit = lfm2.load(path, quantize=fmt)
        ids = torch.tensor([[1, 5, 9, 2, 7]])
        with torch.inference_mode():
            assert torch.equal(default.model(ids), explicit.model(ids))
    plain = lfm2.load(path, quantize="none")
    assert not any(isinstance(m, QuantLinear) for m in plain.model.modules())


def _k_quant_blocks(rows: int, cols: int, qtype, rng) -> np.ndarray:
    """Random `qtype` blocks for a (rows, cols) matrix, with sane float16 super-block scales."""
    T = gguf.GGMLQuantizationType
    offsets = {T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}[qtype]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    for off in offsets:
        raw[:, off : off + 2] = np.frombuffer(np.float16(0.004).tobytes(), np.uint8)
    return raw.reshape(rows, cols // block * size)


def _k_quant_file(wide_f32: Path, dst: Path) -> tuple[Path, dict]:
    """A Q4_K_M-like copy of `wide_f32`: Q4_K / Q5_K matrices, Q6_K embedding and head (random blocks)."""
    T = gguf.GGMLQuantizationType
    rng = np.random.default_rng(0)
    f = GGUFFile(wide_f32)
    replaced = {}
    for name, info in f.tensors.items():
        if len(info.shape) == 2 and info.shape[-1] % 256 == 0:
            kind = T.Q6_K if name in ("token_embd.weight", "output.weight") else (T.Q5_K if "ffn_down" in name
                                                                                  else T.Q4_K)
            replaced[name] = (_k_quant_blocks(*info.shape, kind, rng), kind)
    return _gguf_with(wide_f32, dst, replaced), replaced


def test_k_quant_files_run_their_own_blocks_by_default(wide_f32, tmp_path):
    """A Q4_K_M-like file runs its Q4_K / Q5_K / Q6_K matrices (embedding and untied head included) as
    `lfm2.kquant` layers holding the file's bytes: no float32 matrix in memory. Decode (`kgemv`, int8
    activations per 256 values, as llama.cpp) gives the float reading's logits (`quantize="none"`) within
    that rounding; prefill the decode steps' logits (`kgemm`, on VNNI CPUs) or the float reading's
    (dequantized tiles, elsewhere)."""
    from lfm2.gguf import native_format
    from lfm2.kquant import KQuantEmbedding, KQuantLinear

    path, replaced = _k_quant_file(wide_f32, tmp_path / "k.gguf")
    assert native_format(GGUFFile(path)) == "int8"  # the format of whatever is not a K-quant
    default, plain = lfm2.load(path), lfm2.load(path, quantize="none")
    layers = [m for m in default.model.modules() if isinstance(m, KQuantLinear)]
    assert isinstance(default.model.model.embed_tokens, KQuantEmbedding)
    assert isinstance(default.model.lm_head, KQuantLinear) and default.model.lm_head.kind == "q6_k"
    assert len(layers) == len(replaced) and {m.kind for m in layers} == {"q4_k", "q5_k", "q6_k"}
    from lfm2 import kernels
    from lfm2.kquant import Q4_K_X16, tiles_faster

    # Q4_K matrices of whole 16-row tiles run in the decode kernel's tiles where it has them (AVX2, VNNI)
    tiled = {m.kernel_type == Q4_K_X16 for m in layers if m.kind == "q4_k" and m.out_features % 16 == 0}
    assert tiled == {tiles_faster()}
    assert not any(t.dtype == torch.float32 and t.dim() == 2 and t.numel() >= 256 * 256
                   for t in [*default.model.parameters(), *default.model.buffers()])
    ids = _sequence(default.config.vocab_size, 64)
    ours, ref = _logits(default, ids), _logits(plain, ids)
    # decode steps through the GEMV, teacher-forced (a random model's near-ties make free greedy runs part)
    cache = default.model.make_cache(1, 64)
    with torch.no_grad():
        default.model(torch.tensor([ids[:8]]), cache=cache)
        steps = torch.cat([default.model(torch.tensor([[t]]), cache=cache)[0] for t in ids[8:]])
    assert (steps - ref[8:]).abs().max() <= 0.05 * ref.abs().max()
    assert (steps.argmax(-1) == ref[8:].argmax(-1)).float().mean() >= 0.9
    if kernels.has_int8_gemm() and not kernels.has_amx_bf16():  # prefill by `kgemm`: the GEMV's numerics
        assert (ours[8:] - steps).abs().max() <= 1e-4 * ref.abs().max()
    else:  # dequantized tiles: bfloat16 on AMX CPUs (lfm2.kquant), float32 elsewhere
        assert (ours - ref).abs().max() <= (0.01 if kernels.has_amx_bf16() else 1e-4) * ref.abs().max()


def test_k_quant_files_run_as_int8_without_the_kernels(wide_f32, tmp_path, monkeypatch):
    """Without the kernels a K-quant layer could only dequantize with numpy at every step: such a file
    loads as int8 layers made one tensor at a time, the weights of quantizing the float reading."""
    from lfm2.quant import QuantEmbedding, QuantLinear, quantize_model

    path, replaced = _k_quant_file(wide_f32, tmp_path / "k.gguf")
    monkeypatch.setenv("LFM2_NO_KERNELS", "1")
    default, plain = lfm2.load(path), lfm2.load(path, quantize="none")
    quantized = [m for m in default.model.modules() if isinstance(m, QuantLinear)]
    assert isinstance(default.model.model.embed_tokens, QuantEmbedding)
    assert len(quantized) >= len(replaced) and all(m.kind == "int8" for m in quantized)
    ids = _sequence(default.config.vocab_size, 16)
    quantize_model(plain.model, "int8", 32)
    assert torch.equal(_logits(default, ids), _logits(plain, ids))


def test_a_moe_file_of_other_block_types_runs_its_experts_as_int8(moe_checkpoint, tmp_path):
    """Stacked expert tensors (`*_exps`, one per projection) in a block type without kernels (Q5_0 here,
    which gguf-py writes) are requantized expert by expert, as the whole float model would be."""
    from lfm2.gguf import native_format
    from lfm2.quant import QuantLinear, quantize_model

    T = gguf.GGMLQuantizationType
    src = export_gguf(moe_checkpoint, tmp_path / "moe-f32.gguf", "f32", progress=False)
    f = GGUFFile(src)
    replaced = {name: (gguf.quants.quantize(f.tensor(name).numpy(), T.Q5_0), T.Q5_0)
                for name, info in f.tensors.items()
                if len(info.shape) >= 2 and name.startswith("blk.") and info.shape[-1] % 32 == 0}
    assert any("_exps." in name for name in replaced)
    path = _gguf_with(src, tmp_path / "moe-q5_0.gguf", replaced)
    assert native_format(GGUFFile(path)) == "int8"
    default, plain = lfm2.load(path), lfm2.load(path, quantize="none")
    experts = [m for n, m in default.model.named_modules() if ".experts." in n and isinstance(m, QuantLinear)]
    assert experts and all(m.kind == "int8" for m in experts)
    quantize_model(plain.model, "int8", 32)
    ids = _sequence(default.config.vocab_size - 3, 24)
    assert torch.equal(_logits(default, ids), _logits(plain, ids))


def test_released_tensor_pages_read_back_from_the_file(dense_gguf):
    """`GGUFFile.release` drops a copied-out tensor's pages from memory (the loader's peak): a later read
    gets the same bytes from the file, and a neighbouring tensor is untouched."""
    f = GGUFFile(dense_gguf["q8_0"])
    names = sorted(f.tensors, key=lambda n: f.tensors[n].offset)
    big = max(names, key=lambda n: f.tensors[n].nbytes)
    before = {n: np.array(f.raw(n)) for n in names}
    resident = _mapped_kib(f.path)
    f.release(big)
    if resident is not None:  # Linux: the file's resident pages in this process went down by about the tensor
        assert resident - _mapped_kib(f.path) >= f.tensors[big].nbytes // 1024 - 8
    for n in names:
        np.testing.assert_array_equal(np.array(f.raw(n)), before[n])


@pytest.fixture(scope="module")
def wide_vocab_gguf(chat_checkpoint, tmp_path_factory):
    """Q8_0, Q4_0 and Q6_K files whose embedding (65536 x 256, 17 MiB in Q8_0) is most of the file."""
    cfg = tiny_config(vocab_size=65536, hidden_size=256, intermediate_size=256, max_position_embeddings=512)
    ckpt = _with_tokenizer(tmp_path_factory.mktemp("wide-vocab"), chat_checkpoint, cfg, seed=7)
    files = {t: export_gguf(ckpt, ckpt.parent / f"wide-{t}.gguf", t, progress=False) for t in ("q8_0", "q4_0")}
    from tests.test_kquant import random_blocks  # gguf-py cannot quantize to Q6_K

    q6k = gguf.GGMLQuantizationType.Q6_K
    q6 = {name: (random_blocks(*info.shape, q6k, seed=i).numpy(), q6k)
          for i, (name, info) in enumerate(GGUFFile(files["q8_0"]).tensors.items())
          if len(info.shape) == 2 and info.shape[-1] % 256 == 0}
    files["q6_k"] = _gguf_with(files["q8_0"], ckpt.parent / "wide-q6_k.gguf", q6)
    return files


@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "q6_k"])
def test_blocks_are_read_into_their_slots_without_the_map(wide_vocab_gguf, monkeypatch, kind):
    """A quantized file's blocks go from the file straight into one huge-page arena with plain reads of a chunk
    at a time: the map never holds them (a tensor copied out of it whole, then moved, was resident twice at the
    load's peak), and they make the model they made before (`LFM2_MMAP=1`: plain tensors, no arena)."""
    import lfm2.gguf as lg
    from lfm2 import kernels
    from lfm2.kquant import KQuantEmbedding, KQuantLinear
    from lfm2.quant import QuantEmbedding, QuantLinear

    if kind == "q6_k" and kernels.ops() is None:
        pytest.skip("K-quant blocks are kept as they are only where the C++ kernels run")
    path, chunk_bytes = wide_vocab_gguf[kind], 256 * 1024
    monkeypatch.setattr(lg, "CHUNK_BYTES", chunk_bytes)
    reads, resident = [], []
    real = lg.GGUFFile.read_into

    def watched(self: GGUFFile, name: str, out: np.ndarray, start: int = 0) -> None:
        real(self, name, out, start)
        reads.append(out.nbytes)
        resident.append(_mapped_kib(self.path))

    monkeypatch.setattr(lg.GGUFFile, "read_into", watched)
    llm = lfm2.load(path)
    embedding = GGUFFile(path).tensors["token_embd.weight"].nbytes
    assert sum(reads) >= embedding and (kind == "q6_k" or max(reads) <= chunk_bytes)
    layers = [m for m in llm.model.modules() if isinstance(m, QuantLinear | QuantEmbedding | KQuantLinear
                                                          | KQuantEmbedding)]
    storages = {t.untyped_storage().data_ptr() for m in layers for t in m.buffers() if t.numel() > 1}
    if lg.use_huge_pages():
        assert len(storages) == 1  # one arena, nothing moved after the load
        if resident[0] is not None:  # the file's pages mapped into this process: its header, never its blocks
            assert max(resident) * 1024 <= 2 * 2**20 < embedding // 4
    monkeypatch.setenv("LFM2_MMAP", "1")
    plain = lfm2.load(path)
    ids = torch.tensor([[1, 5, 9, 30, 2, 65000]])
    with torch.inference_mode():
        assert torch.equal(llm.model(ids)[0], plain.model(ids)[0])


def _mapped_kib(path: Path) -> int | None:
    """Resident KiB of `path`'s mappings in this process (/proc/self/smaps), None where unavailable."""
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return None
    total, inside = 0, False
    for line in lines:
        if not line[:1].isupper():  # a mapping's header line: address range, permissions, ..., path
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total
