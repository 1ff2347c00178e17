"""The fused decode step (lfm2.step, kernels/step.cpp): the eager model's bits, for every layer kind it takes."""

from __future__ import annotations

import gguf
import pytest
import torch
from torch import nn

from lfm2 import kernels
from lfm2.kquant import KQuantLinear
from lfm2.lora import LoraConfig, apply_lora
from lfm2.quant import quantize_model
from lfm2.sampling import SamplingParams
from lfm2.step import FusedDecode, Unfit, fuse_decode, plan
from tests.conftest import engine_decode, random_model, tiny_config, write_checkpoint
from tests.test_kquant import random_blocks

T = gguf.GGMLQuantizationType

# As wide as LFM2-350M where the kernels' thresholds are (hidden 1024, 16 heads of 64), two layers deep.
WIDE = dict(hidden_size=1024, intermediate_size=512, num_attention_heads=16, num_key_value_heads=4,
            num_hidden_layers=2, layer_types=["conv", "full_attention"])
MOE = dict(model_type="lfm2_moe", num_experts=6, num_experts_per_tok=2, moe_intermediate_size=256,
           num_dense_layers=1, num_hidden_layers=3, layer_types=["conv", "full_attention", "conv"])


@pytest.fixture(autouse=True)
def _kernels():
    if kernels.ops() is None:
        pytest.skip(f"the C++ kernels are not available here: {kernels.build_error() or 'disabled'}")


def _kquant(model: nn.Module, types: tuple[T, ...]) -> nn.Module:
    """The model's linear layers (not the head or router) as K-quant layers of random blocks, cycling
    through `types`, Q4_K ones in 16-row tiles where a load would put them."""
    names = [n for n, m in model.named_modules()
             if type(m).__name__ == "Linear" and not n.endswith(("lm_head", "gate"))]
    for i, name in enumerate(names):
        parent, attr = model.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]
        old, qtype = getattr(parent, attr), types[i % len(types)]
        layer = KQuantLinear.from_blocks(random_blocks(old.out_features, old.in_features, qtype, seed=i), int(qtype),
                                         old.in_features)
        layer.pack_tiles()
        setattr(parent, attr, layer)
    return model


def _model(kind: str, moe: bool = False) -> nn.Module:
    model = random_model(tiny_config(**{**WIDE, **(MOE if moe else {})}), seed=1)
    if kind in ("int8", "int4"):
        quantize_model(model, kind, 32)
    elif kind == "kquant":
        _kquant(model, (T.Q4_K, T.Q6_K, T.Q5_K))
    return model


def _steps(model: nn.Module, step, rows: int, n: int = 6) -> torch.Tensor:
    """Logits of n teacher-forced decode steps of `rows` rows after a prefill, on a cache as the engine
    passes it (a masked view of a larger one)."""
    ids = torch.randint(3, 512, (rows, 12 + n), generator=torch.Generator().manual_seed(rows))
    with torch.inference_mode():
        cache = model.make_cache(rows + 1, ids.shape[1] + 1).narrow(rows)
        model(ids[:, :12], cache)
        return torch.cat([step(ids[:, t : t + 1], cache) for t in range(12, ids.shape[1])], dim=1)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("kind", ["float32", "int8", "int4", "kquant"])
def test_the_fused_step_gives_the_eager_models_bits(kind, moe):
    model = _model(kind, moe)
    step = fuse_decode(model)
    assert isinstance(step, FusedDecode) and model.decode_step is step
    for rows in (1, 3, 8):  # 8: the int8 GEMM's rows on VNNI CPUs (`QuantLinear.forward`)
        fused = _steps(model, step, rows)
        assert torch.equal(fused, _steps(model, model, rows))
        assert fused.argmax(-1).unique().numel() > 2  # the logits depend on the context
    assert step.eager == 0


@pytest.mark.skipif(not kernels.has_int8_gemm(), reason="no int8 GEMM here")
def test_rows_past_the_gemms_threshold_take_the_gemm_as_the_eager_model_does(monkeypatch):
    """On VNNI CPUs `QuantLinear.forward` multiplies 6 rows or more by the int8 GEMM; the fused step does the
    same (on other CPUs the GEMM's AVX2 code stands in for it here)."""
    model = _model("int8")
    before = _steps(model, model, 8, n=3)
    vnni = kernels.has_vnni()
    monkeypatch.setattr(kernels, "has_vnni", lambda: True)
    step = fuse_decode(model)
    assert step.plan.max_rows == 16
    eager = _steps(model, model, 8, n=3)
    assert vnni or not torch.equal(before, eager)  # the GEMM's sums, not the GEMV's
    assert torch.equal(_steps(model, step, 8, n=3), eager) and step.eager == 0


def test_a_dense_cache_and_a_masked_one_give_the_same_bits():
    """`lfm2.generate`'s own cache (every slot valid: no mask) and the engine's view (masked)."""
    model = _model("int8")
    step = fuse_decode(model)
    ids = torch.randint(3, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        out = []
        for cache in (model.make_cache(1, 20), model.make_cache(2, 20).narrow(1)):
            model(ids[:, :10], cache)
            out.append(torch.cat([step(ids[:, t : t + 1], cache) for t in range(10, 16)], dim=1))
    assert cache.dense is False and torch.equal(out[0], out[1])


@pytest.mark.parametrize("kind", ["int4", "kquant"])
def test_experts_apart_and_stacked_give_the_same_bits(kind):
    """Experts made one by one go in as a tensor each; a loaded file's (one storage per kind, as
    `_into_one_storage` lays them out) as one stacked tensor per kind."""
    from tests.test_moe import _into_one_storage

    model = _model(kind, moe=True)
    blocks = [m for m in model.modules() if hasattr(m, "stack_experts")]
    assert blocks and not any(b.stack_experts() for b in blocks)
    apart = plan(model)
    assert len(apart.weights) > 3 * len(blocks[0].experts) * len(blocks)
    eager = _steps(model, model, 2)
    assert torch.equal(_steps(model, FusedDecode(model, apart), 2), eager)
    for block in blocks:
        _into_one_storage(block)
        assert block.stack_experts()
    stacked = plan(model)
    assert len(stacked.weights) < len(apart.weights) - 2 * len(blocks[0].experts)
    assert torch.equal(_steps(model, FusedDecode(model, stacked), 2), eager)


def test_more_rows_than_the_kernels_gemv_range_decode_eagerly():
    model = _model("float32")
    step = fuse_decode(model)
    rows = step.plan.max_rows + 1
    assert torch.equal(_steps(model, step, rows, n=2), _steps(model, model, rows, n=2))
    assert step.eager == 2


def test_the_engine_decodes_through_the_fused_step():
    model = _model("int4")
    prompts = [[5, 17, 99, 3, 250, 41], [7, 7, 300]]
    params = SamplingParams(temperature=0.0)
    eager = engine_decode(model, prompts, params, 10, ignore_eos=True)
    calls = []
    step = fuse_decode(model)
    model.decode_step = lambda ids, cache: calls.append(ids.shape[0]) or step(ids, cache)
    assert engine_decode(model, prompts, params, 10, ignore_eos=True) == eager
    assert calls and max(calls) == 2


@pytest.mark.parametrize("change", ["lora", "narrow", "bf16", "conv bias"])
def test_models_it_does_not_fit_keep_their_own_step(change):
    config = dict(WIDE)
    if change == "narrow":
        config["hidden_size"] = 512
    if change == "conv bias":
        config["conv_bias"] = True
    model = random_model(tiny_config(**config))
    if change == "lora":
        apply_lora(model, LoraConfig(rank=4, targets=["q_proj"]))
        model.eval()
    if change == "bf16":
        model.to(torch.bfloat16)
    with pytest.raises(Unfit):
        plan(model)
    assert fuse_decode(model) is None and not hasattr(model, "decode_step")


def test_load_fuses_the_step_by_default(tmp_path):
    """`lfm2.load` without `compile`: the fused step, and no compiler in the process (torch._dynamo is ~70 MiB
    resident); `compile=True`: torch.compile; `compile=False`: the eager model."""
    import subprocess
    import sys

    import lfm2
    from lfm2.compile import CompiledDecode, state

    ckpt = write_checkpoint(tmp_path / "wide", tiny_config(**WIDE))
    llm = lfm2.load(ckpt, quantize="int8")
    assert isinstance(llm.model.decode_step, FusedDecode) and state(llm.model) == "fused"
    assert isinstance(lfm2.load(ckpt, compile=True).model.decode_step, CompiledDecode)
    assert not hasattr(lfm2.load(ckpt, compile=False).model, "decode_step")
    small = lfm2.load(write_checkpoint(tmp_path / "tiny", tiny_config()))
    assert not hasattr(small.model, "decode_step")  # too narrow for the plan, too small to compile
    code = ("import sys, lfm2\n"
            f"llm = lfm2.load({str(ckpt)!r}, quantize='int4')\n"
            "params = llm.sampling_params(temperature=0)\n"
            "out = list(llm.engine(1, 32).generate([[5, 6, 7, 8]], params, 8, ignore_eos=True))\n"
            "print(type(llm.model.decode_step).__name__, len(out), sorted(m for m in sys.modules if m.startswith(\n"
            "    ('torch._dynamo', 'torch._inductor'))))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["FusedDecode", "8", "[]"]


def test_a_plan_that_does_not_fit_the_state_is_refused():
    model = _model("float32")
    p = plan(model)
    ops = kernels.ops()
    with torch.inference_mode():
        cache = model.make_cache(1, 8)
        model(torch.tensor([[5, 6, 7]]), cache)
        x = torch.zeros(1, 1, 1024)
        cos = sin = torch.zeros(1, 64)
        with pytest.raises(RuntimeError, match="fewer state tensors"):
            ops.decode_layers(x, p.weights, p.ints, p.reals, [cache.conv[0]], cos, sin, None, 3)
        with pytest.raises(RuntimeError, match="ints end early"):
            ops.decode_layers(x, p.weights, p.ints[:-1], p.reals, [cache.conv[0], cache.keys[1], cache.values[1]],
                              cos, sin, None, 3)


def test_kernels_turned_off_after_the_load_decode_eagerly(monkeypatch):
    model = _model("int8")
    step = fuse_decode(model)
    fused = _steps(model, step, 1, n=2)
    monkeypatch.setenv("LFM2_NO_KERNELS", "1")
    assert _steps(model, step, 1, n=2).shape == fused.shape and step.eager == 2


@pytest.mark.parametrize("change", ["lora", "merge", "quantize"])
def test_a_model_changed_after_fusing_decodes_as_changed(change):
    """Adapters attached, merged or a model quantized after `lfm2.load` fused its step: the stale plan
    (the old weights) is dropped, so decoding follows the change instead of the weights it replaced."""
    from lfm2.lora import lora_layers, merge_lora

    model = _model("float32")
    assert fuse_decode(model) is not None
    if change in ("lora", "merge"):
        apply_lora(model, LoraConfig(rank=4, targets=["q_proj", "w2"]))
        with torch.no_grad():
            for _, layer in lora_layers(model):
                layer.lora_B.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
        model.eval()
        if change == "merge":
            merge_lora(model)
    else:
        quantize_model(model, "int4", 32)
    assert not hasattr(model, "decode_step")
    eager = _steps(model, model, 1, n=3)
    reference = _model("float32")
    assert not torch.equal(eager, _steps(reference, reference, 1, n=3))  # the change changed the logits
    if change != "lora":  # a model without adapters fits a new plan, with the changed model's bits
        assert torch.equal(_steps(model, fuse_decode(model), 1, n=3), eager)
