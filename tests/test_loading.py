"""Config parsing, presets, and the errors a bad checkpoint gives."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import lfm2
from lfm2.config import PRESETS, ModelConfig, preset
from lfm2.errors import CheckpointError, ConfigError
from lfm2.models import build_model, count_parameters
from tests.conftest import reference_file

CARD_COUNTS = {
    "LFM2-350M": (354_483_968, 354_483_968),
    "LFM2-700M": (742_489_344, 742_489_344),
    "LFM2-1.2B": (1_170_340_608, 1_170_340_608),
    "LFM2-2.6B": (2_569_272_320, 2_569_272_320),
    "LFM2-8B-A1B": (8_339_930_560, 1_557_740_992),
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_parameter_counts(name):
    model = build_model(preset(name), device="meta")
    total, active = count_parameters(model), count_parameters(model, active=True)
    if name == "LFM2-24B-A2B":  # the card rounds: 24B total, 2.3B active (we count 23.79B / 2.27B)
        assert round(total / 1e9, 2) == 23.79 and round(active / 1e9, 2) == 2.27
    else:
        assert (total, active) == CARD_COUNTS[name]


@pytest.mark.reference
def test_released_config_resolves_block_ff_dim():
    path = reference_file("configs", "LFM2-1.2B.config.json")
    cfg = ModelConfig.from_json(path)
    assert cfg.intermediate_size == 8192  # block_ff_dim 12288 adjusted, not intermediate_size 8192 adjusted
    assert cfg.attention_layers == [2, 5, 8, 10, 12, 14]
    assert cfg.rope_theta == 1e6 and cfg.head_dim == 64 and cfg.tie_word_embeddings
    assert count_parameters(build_model(cfg)) == 1_170_340_608


def test_config_aliases():
    base = {"model_type": "lfm2", "vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 3,
            "num_attention_heads": 4, "num_key_value_heads": 2, "block_ff_dim": 6656,
            "block_ffn_dim_multiplier": 1.0, "block_multiple_of": 256, "something_new": [1, 2]}
    a = ModelConfig.from_dict({**base, "rope_parameters": {"rope_theta": 5e6, "rope_type": "default"},
                               "layer_types": ["conv", "full_attention", "conv"]})
    b = ModelConfig.from_dict({**base, "rope_theta": 5e6, "full_attn_idxs": [1], "tie_embedding": False})
    assert a.layer_types == b.layer_types == ["conv", "full_attention", "conv"]
    assert a.rope_theta == b.rope_theta == 5e6
    assert a.intermediate_size == 4608  # 2/3 of 6656, rounded up to 256
    assert not b.tie_word_embeddings
    no_adjust = ModelConfig.from_dict({**base, "block_auto_adjust_ff_dim": False})
    assert no_adjust.intermediate_size == 6656
    # Our own config.json round-trips.
    assert ModelConfig.from_dict(a.to_dict()) == a


@pytest.mark.parametrize(
    "change, words",
    [
        ({"model_type": "llama"}, ["model_type", "'llama'"]),
        ({"hidden_size": "big"}, ["hidden_size", "'big'"]),
        ({"layer_types": ["conv", "mamba"]}, ["layer_types", "mamba"]),
        ({"num_key_value_heads": 3}, ["num_key_value_heads 3"]),
    ],
)
def test_bad_config_fields(change, words):
    base = {"model_type": "lfm2", "vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96,
            "block_auto_adjust_ff_dim": False}
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict({**base, **change}, source="x/config.json")
    for w in words:
        assert w in str(e.value)
    assert "x/config.json" in str(e.value)


def _rewrite(path, fn):
    f = path / "model.safetensors"
    tensors = load_file(f)
    fn(tensors)
    save_file(tensors, f)


def test_missing_tensor(tiny_checkpoint):
    _rewrite(tiny_checkpoint, lambda t: t.pop("model.layers.1.self_attn.k_layernorm.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) model\.layers\.1\.self_attn\.k_layernorm"):
        lfm2.load(tiny_checkpoint)


def test_wrong_shape(tiny_checkpoint):
    def shrink(t):
        t["model.layers.0.conv.in_proj.weight"] = torch.zeros(10, 64)

    _rewrite(tiny_checkpoint, shrink)
    with pytest.raises(CheckpointError) as e:
        lfm2.load(tiny_checkpoint)
    msg = str(e.value)
    assert "model.safetensors" in msg and "model.layers.0.conv.in_proj.weight" in msg
    assert "[10, 64]" in msg and "[192, 64]" in msg


def test_unexpected_tensor(tiny_checkpoint):
    _rewrite(tiny_checkpoint, lambda t: t.update({"model.layers.9.extra": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match="unexpected tensor.*model.layers.9.extra"):
        lfm2.load(tiny_checkpoint)


def test_unknown_model_type(tiny_checkpoint):
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    cfg["model_type"] = "qwen3"
    (tiny_checkpoint / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config\.json: unsupported model_type 'qwen3'"):
        lfm2.load(tiny_checkpoint)


def test_truncated_safetensors(tiny_checkpoint):
    f = tiny_checkpoint / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor '.*' needs bytes .* truncated"):
        lfm2.load(tiny_checkpoint)
    f.write_bytes(data[:100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: header claims .* truncated"):
        lfm2.load(tiny_checkpoint)


def test_missing_config(tiny_checkpoint):
    (tiny_checkpoint / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"config\.json not found"):
        lfm2.load(tiny_checkpoint)


def test_empty_path_is_named():
    with pytest.raises(CheckpointError, match="empty checkpoint path"):
        lfm2.load("")


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        (tmp_path / "config.json").write_text(json.dumps(ModelConfig().to_dict()))
        lfm2.load(tmp_path)
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        lfm2.load(tmp_path / "nope" / "deeper")


def test_offline_hub_id_fails_clearly(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(CheckpointError, match="LiquidAI/LFM2-350M: could not download.*local checkpoint"):
        lfm2.load("LiquidAI/LFM2-350M")


def test_sharded_checkpoint(tiny_checkpoint, tmp_path):
    ref = lfm2.load(tiny_checkpoint).model
    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_checkpoint, sharded)
    tensors = load_file(sharded / "model.safetensors")
    (sharded / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, sharded / fname)
        weight_map.update({n: fname for n in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    got = lfm2.load(sharded).model
    x = torch.randint(0, 512, (1, 9))
    assert torch.equal(got(x), ref(x))
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="lists shard 'model-00002-of-00002.safetensors', which is missing"):
        lfm2.load(sharded)


def _storages(model: torch.nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_weights_are_read_into_one_huge_page_arena(tiny_checkpoint, tmp_path, monkeypatch, dtype):
    """Weights land in one 2 MiB-aligned buffer (huge pages) with the values the memory-mapped path gives,
    also when the file's dtype differs (a bf16 checkpoint loaded as float32), and save back unchanged."""
    from lfm2.weights import HUGE_PAGE, save_checkpoint

    monkeypatch.delenv("LFM2_MMAP", raising=False)  # the default, whatever the caller's environment
    ckpt = tiny_checkpoint
    if dtype == torch.bfloat16:
        ckpt = tmp_path / "bf16"
        shutil.copytree(tiny_checkpoint, ckpt)
        tensors = load_file(ckpt / "model.safetensors")
        save_file({k: v.to(dtype) for k, v in tensors.items()}, ckpt / "model.safetensors")
    model = lfm2.load(ckpt).model
    assert len(_storages(model)) == 1
    assert min(t.data_ptr() for t in model.parameters()) % HUGE_PAGE == 0
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    monkeypatch.setenv("LFM2_MMAP", "1")
    mapped = lfm2.load(ckpt).model
    assert len(_storages(mapped)) > 1
    x = torch.randint(0, 512, (1, 9))
    assert torch.equal(model(x), mapped(x))
    save_checkpoint(model, tmp_path / "saved")  # safetensors refuses shared storage: slots are written apart
    assert torch.equal(lfm2.load(tmp_path / "saved").model(x), mapped(x))


def test_quantized_models_move_to_huge_pages(tiny_checkpoint, tmp_path, monkeypatch):
    from lfm2.quant import quantize_checkpoint
    from lfm2.weights import move_to_huge_pages

    monkeypatch.delenv("LFM2_MMAP", raising=False)

    x = torch.randint(0, 512, (1, 9))
    on_load = lfm2.load(tiny_checkpoint, quantize="int4").model  # quantized in memory, then moved
    assert len(_storages(on_load)) == 1
    quantize_checkpoint(tiny_checkpoint, tmp_path / "q", "int4")
    stored = lfm2.load(tmp_path / "q").model  # read from the file into the arena
    assert len(_storages(stored)) == 1
    assert torch.equal(on_load(x), stored(x))
    before = stored(x)
    assert torch.equal(move_to_huge_pages(stored)(x), before)  # idempotent, values kept


def test_truncated_tensor_data_is_named(tiny_checkpoint):
    from lfm2.weights import read_tensors, tensor_table

    table = tensor_table(tiny_checkpoint)
    name = next(iter(table))
    path, info = table[name]
    info = {**info, "file_offset": path.stat().st_size - 4}  # as if the file ended inside this tensor
    with pytest.raises(CheckpointError, match="ends early"):
        read_tensors({name: (path, info)}, {name: (tuple(info["shape"]), torch.float32)})


# What a module may not pull in: a loader neither the layer that uses it nor training code; the
# engine, which runs token ids only, no text, tool or HTTP code.
IMPORT_BOUNDARIES = {
    "lfm2.gguf": ("lfm2.llm", "lfm2.train"),
    "lfm2.loading": ("lfm2.llm", "lfm2.gguf", "lfm2.train"),
    "lfm2.engine": ("lfm2.tokenizer", "lfm2.tools", "lfm2.constrain", "lfm2.server", "fastapi"),
}


def test_the_tokenizer_renders_a_chat_with_tools_without_tool_code():
    code = ("import sys\nfrom lfm2.bundled import default_model_path\nfrom lfm2.tokenizer import Tokenizer\n"
            "tok = Tokenizer.from_dir(default_model_path())\n"
            "tok.apply_chat_template([{'role': 'user', 'content': 'hi'}], tools=[{'name': 'f', 'parameters': {}}])\n"
            "print(sorted(m for m in sys.modules if m in ('lfm2.tools', 'lfm2.constrain', 'lfm2.train')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("module", list(IMPORT_BOUNDARIES))
def test_import_boundaries(module):
    """Checked in a fresh interpreter, where `sys.modules` holds only what importing `module` pulled in."""
    forbidden = IMPORT_BOUNDARIES[module]
    code = (f"import sys, {module}\n"
            f"print(sorted(m for m in sys.modules if any(m == f or m.startswith(f + '.') for f in {forbidden!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"importing {module} imported {out.stdout.strip()}"


def test_parse_device_and_dtype_stay_importable_from_llm():
    from lfm2 import llm, loading

    assert llm.parse_device is loading.parse_device and llm.parse_dtype is loading.parse_dtype


_MOVE_PEAK = """
import sys, torch
from lfm2 import weights
def hwm():
    s = open("/proc/self/status").read()
    return int(s.split("VmHWM:")[1].split()[0]) // 1024
if sys.argv[1] == "off":
    weights.return_freed_memory = lambda: None
torch.empty(8 << 20, dtype=torch.uint8)  # freed: glibc then serves blocks up to 8 MiB from its heap, as in a load
model = torch.nn.Module()
for i in range(48):  # 48 tensors of 4 MiB, allocated apart (as a load makes them)
    model.register_buffer(f"b{i}", torch.ones(1 << 20))
before = hwm()
weights.move_to_huge_pages(model)
assert all(bool((b == 1).all()) for b in model.buffers())
print(hwm() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and glibc's malloc_trim are Linux's")
def test_moving_weights_does_not_hold_two_copies(monkeypatch):
    """Moving a model into the arena frees each old tensor's memory as it goes: the peak grows by a
    fraction of the model, not by all of it (glibc kept the freed copies resident: LFM2-350M Q8_0 peaked
    at 992 MiB loading, 762 with `return_freed_memory`). Each case in a fresh process, for its own peak."""
    monkeypatch.delenv("LFM2_MMAP", raising=False)

    def growth(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", _MOVE_PEAK, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])

    assert growth("on") <= 96  # MiB, of a 192 MiB model
    assert growth("off") >= 150  # the case the check is for: without returning memory, both copies
