"""Quantized models through the public entry points: lfm2.load(quantize=), `lfm2 quantize`, GGUF Q8_0/Q4_0."""

from __future__ import annotations

import pytest
import torch

import lfm2
from lfm2 import kernels
from lfm2.errors import ConfigError
from lfm2.quant import QuantEmbedding, QuantLinear, TiedQuantHead, from_gguf_q4_0, from_gguf_q8_0
from tests.conftest import tiny_config, write_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("q") / "tiny", tiny_config(), seed=4)


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind,group", [("int8", None), ("int8", 32), ("int4", 32)])
def test_load_quantize_replaces_every_layer(ckpt, kind, group):
    ref = lfm2.load(ckpt)
    llm = lfm2.load(ckpt, quantize=kind, group_size=group)
    linears = [n for n, m in llm.model.named_modules() if type(m) is torch.nn.Linear]
    assert linears == []  # nothing left in float
    assert isinstance(llm.model.model.embed_tokens, QuantEmbedding) and isinstance(llm.model.lm_head, TiedQuantHead)
    ids = _ids(ref.config.vocab_size)
    with torch.no_grad():
        a, b = ref.model(ids), llm.model(ids)
    rel = float((a - b).abs().max() / a.abs().max())
    assert rel < (0.05 if kind == "int8" else 0.3), rel


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_quantized_model_knows_its_device_and_dtype(ckpt, dtype):
    """The cache is made in the dtype the quantized embedding computes in, on the model's device: the
    model says both itself (no float-looking `weight` on the integer embedding stands in for them)."""
    llm = lfm2.load(ckpt, dtype=dtype, quantize="int8")
    assert not hasattr(llm.model.model.embed_tokens, "weight")
    assert llm.model.dtype == llm.dtype == dtype and llm.model.device == llm.device == torch.device("cpu")
    cache = llm.model.make_cache(1, 8)
    assert {t.dtype for t in [*cache.keys.values(), *cache.conv.values()]} == {dtype}
    with torch.no_grad():
        assert llm.model(_ids(llm.config.vocab_size)[:1, :8], cache).dtype == dtype


def test_group_size_that_does_not_divide_a_layer_is_named(ckpt):
    with pytest.raises(ConfigError, match="w2"):  # intermediate size 96 is not a multiple of 64
        lfm2.load(ckpt, quantize="int4", group_size=64)


def test_quantize_command_writes_a_checkpoint_that_loads_directly(ckpt, tmp_path, capsys):
    from lfm2.cli import main

    main(["quantize", str(ckpt), "-o", str(tmp_path / "q4"), "--type", "int4", "--group-size", "32"])
    assert "int4" in capsys.readouterr().out
    direct = lfm2.load(tmp_path / "q4")
    assert isinstance(direct.model.model.layers[0].feed_forward.w1, QuantLinear)
    ids = _ids(direct.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(direct.model(ids), lfm2.load(ckpt, quantize="int4").model(ids))
    with pytest.raises(ConfigError, match="already quantized"):
        lfm2.load(tmp_path / "q4", quantize="int8")
    with pytest.raises(ConfigError, match="LoRA adapters apply to float checkpoints"):
        lfm2.load(tmp_path / "q4", adapter=tmp_path)
    with pytest.raises(SystemExit):
        main(["quantize", str(ckpt), "-o", str(tmp_path / "bad"), "--type", "int4", "--group-size", "channel"])
    assert "per-channel" in capsys.readouterr().err


def test_adapter_is_folded_in_before_quantizing(ckpt, tmp_path):
    from lfm2.lora import LoraConfig, apply_lora, save_adapter

    model = lfm2.load(ckpt).model
    apply_lora(model, LoraConfig(rank=2))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    save_adapter(model, tmp_path / "ad")
    tuned = lfm2.load(ckpt, adapter=tmp_path / "ad")
    q = lfm2.load(ckpt, adapter=tmp_path / "ad", quantize="int8")
    ids = _ids(tuned.config.vocab_size)
    with torch.no_grad():
        a, b, base = tuned.model(ids), q.model(ids), lfm2.load(ckpt).model(ids)
    assert (a - b).norm() < 0.2 * (a - base).norm()  # much closer to the tuned model than to the base


@pytest.mark.parametrize("gguf_type,kind", [("q8_0", "int8"), ("q4_0", "int4")])
def test_gguf_blocks_become_quantized_layers_as_they_are(chat_checkpoint, tmp_path, gguf_type, kind):
    from lfm2.gguf import GGUFFile, export_gguf

    path = tmp_path / f"m-{gguf_type}.gguf"
    export_gguf(chat_checkpoint, path, gguf_type, progress=False)
    f = GGUFFile(path)
    llm = lfm2.load(path, quantize=kind)
    layer = llm.model.model.layers[0].feed_forward.w1
    info = f.tensors["blk.0.ffn_gate.weight"]
    q, s = (from_gguf_q8_0 if kind == "int8" else from_gguf_q4_0)(f.raw(info.name), info.shape)
    saved = layer.state_dict()  # the file's layout even where the layer runs in 16-row tiles
    assert isinstance(layer, QuantLinear) and torch.equal(saved["qweight"], q) and torch.equal(saved["scales"], s)
    assert layer.x16 == (kind == "int4" and kernels.has_vnni())  # Q4_0 in the decode tiles where they are faster
    assert torch.allclose(layer.dequantize(), f.tensor(info.name))  # the file's values, no requantization
    emb = llm.model.model.embed_tokens
    assert isinstance(emb, QuantEmbedding) and emb.kind == "int8"  # token_embd is Q8_0 in both files
    ids = _ids(llm.config.vocab_size)
    with torch.no_grad():
        a, b = lfm2.load(path).model(ids), llm.model(ids)  # dequantized vs quantized compute
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9
