"""The MoE block's grouped expert paths (issue #30) against the per-expert loop they replaced.

`loop_reference` is that loop, kept here and not in the library: each chosen expert's own module
(float `Linear` or `QuantLinear`) on its tokens, weighted, added back in ascending expert order.
The decode kernel (`lfm2/kernels/moe.cpp`) must equal it up to float rounding, for float32 and for
quantized experts (it has QuantLinear's int8-activation numerics); the prefill path (`grouped`) too.
"""

from __future__ import annotations

import gguf
import pytest
import torch
from torch import nn

from lfm2 import kernels
from lfm2.kquant import KQuantLinear, tiles_faster
from lfm2.lora import LoraConfig, apply_lora
from lfm2.models.lfm2_moe import GROUPED_MAX_ROWS, SparseMoeBlock
from lfm2.quant import QuantLinear, quantize_model
from lfm2.sampling import SamplingParams
from tests.conftest import engine_decode, random_model, tiny_config
from tests.test_kquant import random_blocks

T = gguf.GGMLQuantizationType

FORMATS = [("int8", 32), ("int8", 64), ("int8", None), ("int4", 32), ("int4", 128)]


def loop_reference(block: SparseMoeBlock, x: torch.Tensor) -> torch.Tensor:
    """The block as it was before the grouped paths: a Python loop over the experts that got tokens."""
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    chosen, weights = block.route(x)
    out = torch.zeros_like(x)
    for e in torch.unique(chosen).tolist():
        token, slot = torch.where(chosen == e)
        out.index_add_(0, token, block.experts[e](x[token]) * weights[token, slot, None].to(x.dtype))
    return out.view(shape)


def _ops():
    ops = kernels.ops()
    if ops is None:
        pytest.skip(f"the C++ kernels are not available here: {kernels.build_error() or 'disabled'}")
    return ops


def _config(**overrides):
    # Widths of 12 and 8 blocks of 32: the kernels' 8-block SIMD loop and their remainder loop both run.
    base = dict(model_type="lfm2_moe", num_experts=8, num_experts_per_tok=3, moe_intermediate_size=256,
                hidden_size=384, num_dense_layers=1)
    return tiny_config(**{**base, **overrides})


def _block(kind: str | None = None, group: int | None = 32, seed: int = 0, **overrides) -> SparseMoeBlock:
    """A random MoE block (biased router), its experts quantized to `kind` when given."""
    torch.manual_seed(seed)
    block = SparseMoeBlock(_config(**overrides))
    with torch.no_grad():
        block.gate.weight.normal_(0, 0.3)
        block.expert_bias.normal_(0, 0.5)
        if kind is not None:
            for expert in block.experts:
                for name in ("w1", "w3", "w2"):
                    setattr(expert, name, QuantLinear.from_linear(getattr(expert, name), kind, group))
    return block.eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _x(rows: int, d: int = 384, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, 1, d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rows", [1, 3, GROUPED_MAX_ROWS, 40])
@torch.no_grad()
def test_float32_experts_equal_the_loop(rows):
    block = _block()
    x = _x(rows)
    if rows <= GROUPED_MAX_ROWS:
        _ops()
        assert block._kernel_args(x) is not None  # the decode kernel runs, not the generic path
    ref = loop_reference(block, x)
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(block(x), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind,group", FORMATS)
@pytest.mark.parametrize("rows", [1, 5, GROUPED_MAX_ROWS, 40])
@torch.no_grad()
def test_quantized_experts_equal_each_quantlinear(kind, group, rows):
    """The kernel computes what each chosen expert's QuantLinear computes, to float rounding."""
    block = _block(kind, group)
    x = _x(rows)
    if rows <= GROUPED_MAX_ROWS:
        _ops()
        assert block._kernel_args(x)[-3:] == (8 if kind == "int8" else 4, group or 0, False)
    ref = loop_reference(block, x)
    assert _rel(block(x), ref) < 1e-5


@pytest.mark.parametrize("rows", [1, 5, GROUPED_MAX_ROWS])
@torch.no_grad()
def test_int4_experts_in_tiles_equal_the_rows(rows):
    """Q4_0 experts in 16-row tiles (`QuantLinear.pack_tiles`): the kernel takes whole tiles of w1/w3 and w2,
    and computes what it computes on the file's layout, to float rounding."""
    _ops()
    if not kernels.has_vnni():
        pytest.skip("16-row int4 tiles are made on CPUs with AVX-512 VNNI only")
    block = _block("int4", 32)
    x = _x(rows)
    rows_out = block(x)
    assert all(m.pack_tiles() for m in block.experts.modules() if isinstance(m, QuantLinear))
    assert block._kernel_args(x)[-3:] == (4, 32, True)
    assert _rel(block(x), rows_out) < 1e-6
    assert _rel(block(x), loop_reference(block, x)) < 1e-5


@torch.no_grad()
def test_per_channel_int8_with_a_ragged_width():
    """Widths that are not multiples of 32 (per-channel int8 only): the float tail of each row."""
    _ops()
    block = _block("int8", None, hidden_size=80, moe_intermediate_size=72)
    x = _x(4, d=80)
    assert block._kernel_args(x) is not None
    assert _rel(block(x), loop_reference(block, x)) < 1e-5


@pytest.mark.parametrize("kind", [None, "int4"])
@torch.no_grad()
def test_rows_sharing_experts_equal_rows_alone(kind):
    """Rows whose experts repeat (identical tokens) beside a row that shares few: the kernel reads each
    expert once for all its rows, and each row's output is exactly what it is alone (batch invariance)."""
    ops = _ops()
    block = _block(kind)
    a, b = _x(1, seed=2)[0, 0], _x(1, seed=3)[0, 0]
    batch = torch.stack([a, b, a, a])  # (4, d)
    chosen, weights = block.route(batch)
    assert torch.equal(chosen[0], chosen[2]) and not torch.equal(chosen[0], chosen[1])
    args = block._kernel_args(batch)[1:]
    out = ops.moe_experts(batch, chosen, weights, *args)
    for r in range(4):
        alone = ops.moe_experts(batch[r : r + 1], chosen[r : r + 1], weights[r : r + 1], *args)
        assert torch.equal(out[r], alone[0])
    # Through the block: the router's float GEMM may round a batch differently in the last bit.
    torch.testing.assert_close(block(batch)[1], block(b[None])[0], rtol=1e-6, atol=1e-7)
    assert _rel(block(batch), loop_reference(block, batch)) < 1e-5


@pytest.mark.parametrize("kind", [None, "int8", "int4"])
@torch.no_grad()
def test_fallback_equals_the_kernel(kind, monkeypatch):
    """Without the kernels (LFM2_NO_KERNELS=1): the generic path and QuantLinear's pure-PyTorch
    products. Float32: equal to rounding. Quantized: the fallback keeps activations in float, so the
    two differ by the kernel's int8 activation rounding (about 0.5% here), and no more."""
    _ops()
    block = _block(kind)
    x = _x(6)
    fast = block(x)
    monkeypatch.setenv(kernels.DISABLE_ENV, "1")
    assert block._kernel_args(x) is None
    slow = block(x)
    if kind is None:
        torch.testing.assert_close(slow, fast, rtol=1e-5, atol=1e-6)
    else:
        assert 1e-5 < _rel(fast, slow) < 0.02  # the two numerics differ, by activation rounding alone


@torch.no_grad()
def test_experts_the_kernel_cannot_run_take_the_generic_path():
    """bf16 experts, experts of mixed formats, LoRA-wrapped experts: same results as the loop."""
    block = _block().to(torch.bfloat16)
    block.gate.float()
    x = _x(2).bfloat16()
    assert block._kernel_args(x) is None
    ref = loop_reference(block, x)
    assert _rel(block(x).float(), ref.float()) < 4e-3  # bf16 rounding of the sums: about 2 ** -8
    mixed = _block("int8")
    mixed.experts[3].w2 = QuantLinear.from_linear(nn.Linear(256, 384, bias=False), "int4", 32)
    assert mixed._kernel_args(_x(2)) is None
    assert _rel(mixed(_x(2)), loop_reference(mixed, _x(2))) < 1e-6


def test_lora_and_training_take_the_generic_path_with_gradients():
    model = random_model(_config(num_experts=4, num_experts_per_tok=2))
    apply_lora(model, LoraConfig(rank=4, targets=["w1", "w2", "w3"]))
    block = model.model.layers[1].feed_forward
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)  # non-zero LoRA B, so the adapters change the output
    x = _x(3, seed=4).requires_grad_(True)
    with torch.no_grad():
        assert block._kernel_args(x) is None
    out, ref = block(x), loop_reference(block, x)
    torch.testing.assert_close(out, ref)
    params = [p for p in block.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.square().sum(), [x, *params])
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, *params])
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r)


@torch.no_grad()
def test_bad_input_gets_clear_errors():
    ops = _ops()
    block = _block("int4")
    x = torch.randn(2, 384)
    args = block._kernel_args(x)[1:]
    weights = torch.full((2, 3), 0.3)
    with pytest.raises(RuntimeError, match=r"chosen expert 8 is out of range \[0, 8\)"):
        ops.moe_experts(x, torch.tensor([[0, 1, 8], [2, 3, 4]]), weights, *args)
    with pytest.raises(RuntimeError, match="x must be a contiguous float32"):
        ops.moe_experts(x.double(), torch.tensor([[0, 1, 2], [2, 3, 4]]), weights, *args)
    w1, s1 = list(args[0]), args[1]
    w1[5] = w1[5][:, :32].contiguous()
    with pytest.raises(RuntimeError, match="expert 5 w1 must be a contiguous"):
        ops.moe_experts(x, torch.tensor([[0, 1, 5], [2, 3, 4]]), weights, w1, s1, *args[2:])
    with pytest.raises(RuntimeError, match="same number of experts"):
        ops.moe_experts(x, torch.tensor([[0, 1, 2], [2, 3, 4]]), weights, w1[:4], s1, *args[2:])


# -- K-quant experts (a GGUF Q4_K_M / Q5_K_M / Q6_K file's) ---------------------------------------

KTYPES = [(T.Q4_K, T.Q4_K, T.Q6_K), (T.Q5_K, T.Q5_K, T.Q5_K), (T.Q6_K, T.Q6_K, T.Q4_K)]


def _kblock(types: tuple[T, T, T], seed: int = 0, tiles: str = "") -> SparseMoeBlock:
    """A random MoE block (d 512, H 768: two and three super-blocks) whose experts are K-quant layers
    of random blocks, w1 / w3 / w2 in `types` (as one GGUF tensor per matrix kind stores them); the
    kinds named in `tiles` in 16-row tiles where they are Q4_K (`KQuantLinear.pack_tiles`, as a load does)."""
    block = _block(seed=seed, hidden_size=512, moe_intermediate_size=768)
    for e, expert in enumerate(block.experts):
        for i, (name, rows, cols) in enumerate((("w1", 768, 512), ("w3", 768, 512), ("w2", 512, 768))):
            blocks = random_blocks(rows, cols, types[i], seed=100 * seed + 3 * e + i)
            setattr(expert, name, KQuantLinear.from_blocks(blocks, int(types[i]), cols))
            if name in tiles:
                getattr(expert, name).pack_tiles()
    return block


@pytest.mark.parametrize("types", KTYPES, ids=lambda t: "-".join(x.name for x in t))
@pytest.mark.parametrize("rows", [1, 3, GROUPED_MAX_ROWS, 40])
@torch.no_grad()
def test_kquant_experts_equal_each_kquantlinear(types, rows):
    """`kmoe_experts` computes what each chosen expert's KQuantLinear (`kgemv`) computes, to float rounding."""
    ops = _ops()
    block = _kblock(types)
    x = _x(rows, d=512)
    if rows <= GROUPED_MAX_ROWS:
        args = block._kernel_args(x)
        assert args[0] is ops.kmoe_experts and args[-3:] == tuple(int(t) for t in types)
    assert _rel(block(x), loop_reference(block, x)) < 1e-5


@pytest.mark.skipif(kernels.ops() is None or not tiles_faster(), reason="Q4_K stays in the file's layout here")
@pytest.mark.parametrize("tiles", ["w1 w3 w2", "w1", "w2"])
@pytest.mark.parametrize("rows", [1, 3, GROUPED_MAX_ROWS])
@torch.no_grad()
def test_kquant_experts_in_q4_k_tiles_equal_each_kquantlinear(tiles, rows):
    """Q4_K experts in 16-row tiles: `kmoe_experts` runs them a tile at a time (a tile's rows of a w1 or w3
    in the file's layout one by one beside it) and computes what each expert's layer computes."""
    from lfm2.kquant import Q4_K_X16

    ops = _ops()
    types = (T.Q4_K, T.Q4_K, T.Q4_K)
    block = _kblock(types, seed=2, tiles=tiles)
    x = _x(rows, d=512)
    args = block._kernel_args(x[:, 0])
    assert args[0] is ops.kmoe_experts
    assert args[-3:] == tuple(Q4_K_X16 if n in tiles else int(T.Q4_K) for n in ("w1", "w3", "w2"))
    assert _rel(block(x), loop_reference(block, x)) < 1e-5
    plain = _kblock(types, seed=2)  # the file's layout: the same integer sums
    assert _rel(block(x), plain(x)) < 1e-5


@torch.no_grad()
def test_kquant_rows_equal_rows_alone_and_mixed_types_fall_back():
    ops = _ops()
    block = _kblock(KTYPES[0], seed=1)
    a, b = _x(1, d=512, seed=2)[0, 0], _x(1, d=512, seed=3)[0, 0]
    batch = torch.stack([a, b, a])
    chosen, weights = block.route(batch)
    args = block._kernel_args(batch)[1:]
    out = ops.kmoe_experts(batch, chosen, weights, *args)
    for r in range(3):
        assert torch.equal(out[r], ops.kmoe_experts(batch[r : r + 1], chosen[r : r + 1], weights[r : r + 1], *args)[0])
    with pytest.raises(RuntimeError, match="out of range"):
        ops.kmoe_experts(batch, torch.full_like(chosen, 8), weights, *args)
    with pytest.raises(RuntimeError, match="rows of K=768"):  # w2 given the type of w1
        ops.kmoe_experts(batch, chosen, weights, *args[:3], args[3], args[4], args[3])
    # one expert's w2 in another type than the rest: not one GGUF tensor; the generic path runs it
    block.experts[2].w2 = KQuantLinear.from_blocks(random_blocks(512, 768, T.Q5_K), int(T.Q5_K), 768)
    assert block._kernel_args(batch) is None
    assert _rel(block(batch), loop_reference(block, batch)) < 1e-6


# -- whole models ----------------------------------------------------------------------------------


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", [None, "int4"])
@torch.no_grad()
def test_decode_through_the_kernel_matches_the_loop(kind, monkeypatch):
    """Prefill then decode of a batch of 3 (kernel at decode, `grouped` at prefill) against the whole
    model with every MoE block run by the loop."""
    _ops()
    model = random_model(_config(num_experts=6, num_experts_per_tok=2, hidden_size=128, moe_intermediate_size=64),
                         seed=2)
    if kind:
        quantize_model(model, kind, 32)
    x = _ids(3, 24, seed=5)
    cache = model.make_cache(batch_size=3, max_len=24)
    steps = [model(x[:, :16], cache)] + [model(x[:, t : t + 1], cache) for t in range(16, 24)]
    got = torch.cat(steps, dim=1)
    monkeypatch.setattr(SparseMoeBlock, "forward", loop_reference)
    cache = model.make_cache(batch_size=3, max_len=24)
    steps = [model(x[:, :16], cache)] + [model(x[:, t : t + 1], cache) for t in range(16, 24)]
    ref = torch.cat(steps, dim=1)
    assert ref[:, 16:].argmax(-1).unique().numel() > 5
    assert _rel(got, ref) < 1e-5


def test_greedy_generation_unchanged(monkeypatch):
    _ops()
    model = random_model(_config(num_experts=6, num_experts_per_tok=2, hidden_size=128, moe_intermediate_size=64,
                                 tie_word_embeddings=False), seed=3)
    prompts = [[5, 17, 99, 3, 250, 41], [7, 7, 300]]
    params = SamplingParams(temperature=0.0)
    tokens = engine_decode(model, prompts, params, 12, ignore_eos=True)
    monkeypatch.setattr(SparseMoeBlock, "forward", loop_reference)
    assert tokens == engine_decode(model, prompts, params, 12, ignore_eos=True)
    assert len(set(tokens[0])) > 3


@pytest.mark.slow  # torch.compile: 10-20 s on 2 cores
def test_compiled_decode_traces_the_kernel():
    """`lfm2.compile` traces the kernel (its shape-only registration) and matches eager decode."""
    from lfm2.compile import compile_decode

    _ops()
    model = quantize_model(random_model(_config(num_experts=6, num_experts_per_tok=2, hidden_size=128,
                                                moe_intermediate_size=64)), "int4", 32)
    prompt = [5, 17, 99, 3, 250, 41]

    def decode(step) -> torch.Tensor:
        cache = model.make_cache(1, 16)
        with torch.inference_mode():
            model(torch.tensor([prompt]), cache, last_only=True)
            return torch.cat([step(torch.tensor([[t]]), cache)[:, -1] for t in prompt])

    eager = decode(model)
    step = compile_decode(model, progress=False)
    compiled = decode(step)
    assert step.failed is None
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)


# -- experts stacked in one storage (a loaded file's) ----------------------------------------------


def _into_one_storage(block: SparseMoeBlock) -> None:
    """Re-lay the experts' tensors as a file does, expert by expert in one buffer (a GGUF file stores each
    kind as one tensor), each module's buffers then views of it."""
    experts = list(block.experts)
    names = [(n, b) for n in ("w1", "w3", "w2") for b in experts[0]._modules[n]._buffers if
             experts[0]._modules[n]._buffers[b] is not None]
    sizes = [experts[0]._modules[n]._buffers[b].numel() * experts[0]._modules[n]._buffers[b].element_size()
             for n, b in names]
    per_expert = sum(sizes)
    arena = torch.empty(per_expert * len(experts), dtype=torch.uint8)
    for e, expert in enumerate(experts):
        offset = e * per_expert
        for (n, b), size in zip(names, sizes, strict=True):
            old = expert._modules[n]._buffers[b]
            view = arena[offset : offset + size].view(old.dtype).view(old.shape)
            view.copy_(old)
            expert._modules[n]._buffers[b] = view
            offset += size


@pytest.mark.parametrize("kind", ["int8", "int4", "q4_k_m", "q4_k_m tiles"])
@torch.no_grad()
def test_experts_in_one_storage_run_as_one_tensor_per_kind(kind):
    """A loaded file's experts go to the kernel as one (E, ...) view per kind (LFM2-8B-A1B's compiled step: 4,516
    inputs -> ~430), with the same results as one tensor per expert."""
    ops = _ops()
    kquants, tiles = kind.startswith("q4_k_m"), kind.endswith("tiles")
    if tiles and not tiles_faster():
        pytest.skip("Q4_K stays in the file's layout here")
    block = _kblock(KTYPES[0], tiles="w1 w3 w2" if tiles else "") if kquants else _block(kind)
    x = _x(3, d=512 if kquants else 384)
    assert not block.stack_experts()  # modules made one by one: tensors apart
    apart = block(x)
    args = block._kernel_args(x[:, 0])
    assert len(args[1]) == len(block.experts)
    _into_one_storage(block)
    block.__dict__.pop("_stacks", None)  # what a fresh load has: nothing noted yet
    args = block._kernel_args(x[:, 0])  # notes the views on its first eager call
    lists = [a for a in args[1:] if isinstance(a, list)]
    assert lists and all(len(a) == 1 and a[0].shape[0] == len(block.experts) for a in lists)
    assert args[0] is (ops.kmoe_experts if kquants else ops.moe_experts)
    assert torch.equal(block(x), apart)
    # replacing an expert's module, or moving the block, drops the views: one tensor per expert again
    first = block.experts[0].w1
    if kquants:
        raw = ops.kunpack(first.blocks, first.kernel_type, first.in_features) if tiles else first.blocks.clone()
        block.experts[0].w1 = type(first).from_blocks(raw, first.ggml_type, first.in_features)
        if tiles:
            block.experts[0].w1.pack_tiles()
    else:
        block.experts[0].w1 = QuantLinear.from_linear(torch.nn.Linear(384, 256, bias=False), kind, 32)
    assert len(block._kernel_args(x[:, 0])[1]) == len(block.experts)
    block.experts[0].w1 = first
    block.cpu()
    assert "_stacks" not in block.__dict__


@torch.no_grad()
def test_a_stacked_argument_with_another_expert_count_is_refused():
    ops = _ops()
    block = _block("int8")
    _into_one_storage(block)
    assert block.stack_experts()
    x = torch.randn(1, 384)
    op, w1, s1, w3, s3, w2, s2, bits, group, x16 = block._kernel_args(x)
    with pytest.raises(RuntimeError, match="same number of experts"):
        ops.moe_experts(x, torch.tensor([[0, 1, 2]]), torch.ones(1, 3), [w1[0][:4]], s1, w3, s3, w2, s2, bits, group,
                        x16)


def test_the_benchmarks_random_quantized_moe_model_is_random():
    """`benchmarks/moe.py`'s model for the MoE benchmark files: its quantized layers keep their random values (a
    `to_empty` once remade them and every buffer was zeroed: zero logits, every token routed to the same experts)."""
    from benchmarks.moe import random_quantized_model
    from lfm2.models.lfm2_moe import SparseMoeBlock

    config = tiny_config(model_type="lfm2_moe", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                         num_dense_layers=1, hidden_size=256, intermediate_size=256)
    model = random_quantized_model(config, "int4")
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    big = {n: t for n, t in model.named_buffers() if t.numel() > 64}
    assert big and all(t.float().abs().sum() > 0 for t in big.values())
    with torch.inference_mode():
        logits = model(torch.randint(0, config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0)))
        block = next(m for m in model.modules() if isinstance(m, SparseMoeBlock))
        chosen, _ = block.route(torch.randn(32, config.hidden_size, generator=torch.Generator().manual_seed(1)))
    assert logits.abs().max() > 0 and len(set(chosen.flatten().tolist())) >= config.num_experts // 2

