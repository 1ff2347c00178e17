"""LFM2 (dense), in plain PyTorch.

The architecture, block by block (as in transformers' `models/lfm2/modeling_lfm2.py`
and the model cards at https://huggingface.co/LiquidAI):
- token embedding, tied to the output head; the final RMSNorm is named `embedding_norm`;
- each block is pre-norm: `x += op(operator_norm(x))`, then `x += feed_forward(ffn_norm(x))`,
  where `op` is either a gated short convolution or grouped-query attention (`layer_types`);
- gated short convolution: `in_proj` d -> 3d split into (B, C, x); `u = B*x`; a depthwise causal
  conv1d of kernel L over time; `C * conv(u)`; `out_proj`. No activation anywhere;
- attention: per-head RMSNorm on q and k BEFORE RoPE (rotate-half convention), GQA, `out_proj`;
- feed-forward: SwiGLU `w2(silu(w1(x)) * w3(x))`; RMSNorm is `w * x / rms(x)` computed in float32.

Module attribute names equal Hugging Face's parameter names, so a `model.safetensors` loads
one-to-one. The model maps token ids to logits; it does not sample, stop or tokenize. A `Cache`
passed in makes it incremental (prefill, then single-token decode); an `attention_mask` (B, T)
marks the real tokens of left-padded rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from lfm2 import kernels
from lfm2.cache import Cache
from lfm2.config import ModelConfig

FAST_GEMV_MIN_IN = 1024  # input width from which the float32 GEMV kernel beats F.linear at decode
FAST_GEMV_MAX_ROWS = 16


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, results equal up to float rounding), faster at decode on a CPU.

    A float32 product of a few rows (decode) with a wide matrix is memory-bound; eager
    `F.linear` streams LFM2-350M's weights at 14-19 GB/s on a 2-core machine, lfm2's own GEMV
    kernel (`lfm2.kernels`, prefetching, rows split across threads) at 20-32 GB/s
    (`benchmarks/kernels.py`). Everything else takes `F.linear`: training (grad enabled),
    prefill, other dtypes and devices, narrow layers (the bundled tiny model: there the call
    overhead dominates and building the kernel would not pay), or no C++ compiler.
    """

    def reset_parameters(self) -> None:
        # A model built on the meta device (every load) takes its weights from the checkpoint: there is nothing to
        # initialise, and nn.Linear's init is Python for each layer (LFM2-8B-A1B: 4,402 of them, ~1 s of a profiled
        # load, which builds the meta model twice).
        if self.weight.device.type != "meta":
            super().reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (
            self.in_features >= FAST_GEMV_MIN_IN
            and x.dtype == torch.float32
            and w.dtype == torch.float32
            and self.bias is None
            and x.device.type == "cpu"
            and not torch.is_grad_enabled()
            and x.numel() <= FAST_GEMV_MAX_ROWS * self.in_features
        ):
            ops = kernels.ops()
            if ops is not None and w.is_contiguous():
                return ops.fgemv(x.contiguous(), w)  # (..., K) -> (..., N)
        return F.linear(x, w, self.bias)


def is_plain_linear(m: nn.Module) -> bool:
    """A float linear layer of the model (not a subclass such as the MoE router, a LoRA or quantized layer)."""
    return type(m) in (nn.Linear, Linear)


def drop_decode_step(model: nn.Module) -> None:
    """Forget the decode step `lfm2.load` made for `model` or any module in it (`lfm2.step`'s fused one holds
    the weights it was planned from, a compiled one its graphs): called where layers are replaced (adapters,
    merges, quantizing), so that decoding follows the change, eagerly, instead of the weights it replaced.
    `lfm2.step.fuse_decode` or `lfm2.compile.compile_decode` makes a new one."""
    for m in model.modules():
        m.__dict__.pop("decode_step", None)


class RMSNorm(nn.Module):
    """`kernel`: at inference on a CPU, lfm2's one-pass norm (`kernels/norm.cpp`) where PyTorch makes
    five or six whole-tensor operations (a 512-token prefill of LFM2-350M: ~40 ms of its norms). Set for
    models as wide as `Linear`'s kernel threshold, so that the narrow ones never build the kernels."""

    def __init__(self, dim: int, eps: float, kernel: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            if (self.kernel and x.is_cpu and x.is_contiguous() and not torch.is_grad_enabled()
                    and not torch.compiler.is_compiling()):  # a compiled step fuses the norm itself
                ops = kernels.ops()
                if ops is not None:
                    return ops.rms_norm(x, self.weight, self.eps)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused op in a compiled step
        # Float32 statistics even for bf16 activations, as the reference does.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """cos and sin (B, T, head_dim) for RoPE at the given integer positions (B, T)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rope_factors(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`apply_rope`'s factors from `rope`'s (B, T, hd): cos and the signed sin, (B, 1, T, hd) to
    broadcast over heads. Made once per forward call, not in each of the layers."""
    half = sin.shape[-1] // 2
    signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    return cos[:, None], signed[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x (B, heads, T, hd) with `rope_factors`' cos and signed sin.

    rotate_half(x) = cat(-x[half:], x[:half]) = roll(x, half) * (-1 then +1): the sign rides on
    the sin factor instead (exactly: a sign flip commutes with the product), so each call is four
    operations rather than eight."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = hd = config.head_dim
        d = config.hidden_size
        self.q_proj = Linear(d, self.n_heads * hd, bias=False)
        self.k_proj = Linear(d, self.n_kv * hd, bias=False)
        self.v_proj = Linear(d, self.n_kv * hd, bias=False)
        self.out_proj = Linear(self.n_heads * hd, d, bias=False)
        wide = d >= FAST_GEMV_MIN_IN
        self.q_layernorm = RMSNorm(hd, config.norm_eps, kernel=wide)
        self.k_layernorm = RMSNorm(hd, config.norm_eps, kernel=wide)

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        B, T, _ = x.shape
        # (B, T, heads*hd) -> (B, heads, T, hd), normed per head before RoPE.
        q = self.q_layernorm(self.q_proj(x).view(B, T, self.n_heads, self.head_dim)).transpose(1, 2)
        k = self.k_layernorm(self.k_proj(x).view(B, T, self.n_kv, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        if ctx.cache is not None:
            k, v = ctx.cache.update_kv(self.layer_idx, ctx.start, k, v)
        groups = self.n_heads // self.n_kv
        if ctx.cache is not None and T == 1:
            # decode: each kv head's query group against its keys, all of them or the valid slots
            # of each row (a continuous batch); (B, 1, 1, S) -> (B, S)
            qg = q.reshape(B, self.n_kv, groups * T, self.head_dim)
            valid = None if ctx.attn_mask is None else ctx.attn_mask[:, 0, 0]
            out = self._attend_all(qg, k, v, valid).view(B, self.n_heads, T, self.head_dim)
        elif ctx.attn_mask is None:  # plain causal self-attention over this input alone (a fresh cache's too)
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        else:
            # GQA without copying K/V: fold each kv head's query group into the time axis.
            # (B, h, T, hd) -> (B, kv, groups*T, hd); mask (B, 1, T, S) -> (B, 1, groups*T, S).
            qg = q.reshape(B, self.n_kv, groups * T, self.head_dim)
            mask = ctx.attn_mask[:, :, None].expand(B, 1, groups, T, -1).reshape(B, 1, groups * T, -1)
            out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask)
            out = out.view(B, self.n_heads, T, self.head_dim)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, -1))

    def _attend_all(self, qg: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    valid: torch.Tensor | None = None) -> torch.Tensor:
        """Each KV head's query group against its cached keys (those `valid` (B, S) marks, or all):
        on a CPU, lfm2's decode attention kernel (it reads the cache once: 1.3-2.5x faster than
        PyTorch's flash attention at decode, `benchmarks/kernels.py --attention`), else SDPA. Narrow
        models (the bundled one) keep SDPA, as `Linear` keeps `F.linear`; training keeps SDPA for
        its gradients."""
        if (
            qg.device.type == "cpu"
            and qg.dtype == torch.float32
            and self.n_heads * self.head_dim >= FAST_GEMV_MIN_IN
            and not torch.is_grad_enabled()
        ):
            ops = kernels.ops()
            if ops is not None:
                return ops.decode_attention(qg, k, v, self.head_dim**-0.5, valid)
        return F.scaled_dot_product_attention(qg, k, v, attn_mask=None if valid is None else valid[:, None, None])


class ShortConv(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        d, L = config.hidden_size, config.conv_L_cache
        self.kernel = L
        self.conv = nn.Conv1d(d, d, kernel_size=L, groups=d, bias=config.conv_bias, padding=L - 1)
        self.in_proj = Linear(d, 3 * d, bias=config.conv_bias)
        self.out_proj = Linear(d, d, bias=config.conv_bias)
        self.wide = d >= FAST_GEMV_MIN_IN  # narrow models (the bundled one) prefill in PyTorch

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        bch = self.in_proj(x)
        if (
            (self.wide or (x.shape[1] == 1 and ctx.cache is not None))  # decode steps of any width, as before
            and ctx.token_mask is None
            and ctx.segments is None
            and bch.dtype == torch.float32
            and bch.is_cpu
            and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()  # a compiled step fuses these operations itself
        ):
            ops = kernels.ops()
            if ops is not None:  # the whole gated conv in one pass (kernels/shortconv.cpp), decode and prefill
                return self.out_proj(self._fused(ops, bch.contiguous(), ctx.cache))
        b, c, h = bch.chunk(3, dim=-1)
        u = b * h
        if ctx.token_mask is not None:  # pads must not leak into the row's real tokens
            u = u * ctx.token_mask[..., None].to(u.dtype)
        u = u.transpose(1, 2)  # (B, T, d) -> (B, d, T)
        T = u.shape[-1]
        if ctx.segments is not None:
            v = self._packed_conv(u, ctx.segments)
        elif ctx.cache is not None and T == 1:
            # Decode: three multiply-adds per channel, cheaper than a conv1d call's setup.
            state = ctx.cache.conv[self.layer_idx]
            window = torch.cat((state, u), dim=-1)  # (B, d, L)
            state.copy_(window[..., 1:])
            v = (window * self.conv.weight[:, 0]).sum(-1, keepdim=True)
            if self.conv.bias is not None:
                v = v + self.conv.bias[:, None]
        else:
            if ctx.cache is not None:
                state = ctx.cache.conv[self.layer_idx]
                u = torch.cat((state, u), dim=-1)
                state.copy_(u[..., -(self.kernel - 1) :])
                if ctx.cache.marks:  # the states after chosen tokens too (lfm2/cache.py: `marks`)
                    L1 = self.kernel - 1
                    ctx.cache.marked[self.layer_idx] = [u[..., e : e + L1].clone() for e in ctx.cache.marks]
            else:
                u = F.pad(u, (self.kernel - 1, 0))
            v = F.conv1d(u, self.conv.weight, self.conv.bias, groups=u.shape[1])[..., -T:]
        return self.out_proj(c * v.transpose(1, 2))

    def _fused(self, ops, bch: torch.Tensor, cache: Cache | None) -> torch.Tensor:  # noqa: ANN001
        """`ops.short_conv` on in_proj's output (B, T, 3d), from and into the cache's conv state (a
        zero state without a cache), keeping the states after the cache's marked tokens as the
        PyTorch path does (lfm2/cache.py: `marks`)."""
        L1 = self.kernel - 1
        if cache is None:
            state = bch.new_zeros(bch.shape[0], bch.shape[-1] // 3, L1)
        else:
            state = cache.conv[self.layer_idx]
            if cache.marks:  # after token e: the last L1 values of (old state, u_0 .. u_{e-1})
                old = state.clone()
                marked = []
                for e in cache.marks:
                    b, _, h = bch[:, max(e - L1, 0) : e].chunk(3, dim=-1)
                    marked.append(torch.cat((old, (b * h).transpose(1, 2)), dim=-1)[..., -L1:].clone())
                cache.marked[self.layer_idx] = marked
        return ops.short_conv(bch, state, self.conv.weight, self.conv.bias)

    def _packed_conv(self, u: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
        """The causal depthwise conv of u (B, d, T) where a tap never reaches into another segment.

        Written as a sum over the kernel's taps (3 for LFM2) so each shifted term can be masked
        where position t - k belongs to a different packed example than t: every example then
        starts from a zero state, exactly as if it ran alone.
        """
        w = self.conv.weight[:, 0]  # (d, L); tap L-1 multiplies the current position
        v = u * w[:, -1, None]
        for k in range(1, self.kernel):
            same = (segments[:, k:] == segments[:, :-k])[:, None].to(u.dtype)  # (B, 1, T-k)
            v = v + F.pad(u[..., :-k] * same * w[:, -1 - k, None], (k, 0))
        return v if self.conv.bias is None else v + self.conv.bias[:, None]


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = Linear(dim, hidden, bias=False)
        self.w3 = Linear(dim, hidden, bias=False)
        self.w2 = Linear(hidden, dim, bias=False)
        self.kernel = dim >= FAST_GEMV_MIN_IN  # as RMSNorm's: narrow models never build the kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.w1(x)
        if torch.is_grad_enabled():
            return self.w2(F.silu(gate) * self.w3(x))
        up = self.w3(x)
        # Inference: in place on the gate's fresh buffer. Two fewer tensors of (tokens, hidden): at prefill,
        # each new one costs the page faults of its memory (a 512-token SwiGLU of LFM2-350M: 3.4 -> 0.7 ms).
        # Eagerly on a CPU, one pass (`kernels/swiglu.cpp`); a compiled step fuses the two itself.
        if (self.kernel and gate.dtype == torch.float32 and gate.is_cpu and gate.is_contiguous()
                and up.is_contiguous() and not torch.compiler.is_compiling()):
            ops = kernels.ops()
            if ops is not None:
                return self.w2(ops.swiglu_(gate, up))
        return self.w2(F.silu(gate, inplace=True).mul_(up))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, feed_forward: nn.Module) -> None:
        super().__init__()
        self.is_attention = config.layer_types[layer_idx] == "full_attention"
        if self.is_attention:
            self.self_attn = Attention(config, layer_idx)
        else:
            self.conv = ShortConv(config, layer_idx)
        self.feed_forward = feed_forward
        wide = config.hidden_size >= FAST_GEMV_MIN_IN
        self.operator_norm = RMSNorm(config.hidden_size, config.norm_eps, kernel=wide)
        self.ffn_norm = RMSNorm(config.hidden_size, config.norm_eps, kernel=wide)

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        op = self.self_attn if self.is_attention else self.conv
        x = x + op(self.operator_norm(x), ctx)
        return x + self.feed_forward(self.ffn_norm(x))


class StepContext:
    """What every layer needs to know about one forward call, computed once per call."""

    def __init__(
        self,
        cache: Cache | None,
        start: int,
        cos: torch.Tensor,
        sin: torch.Tensor,
        token_mask: torch.Tensor | None,
        attn_mask: torch.Tensor | None,
        segments: torch.Tensor | None = None,
    ) -> None:
        self.cache, self.start = cache, start
        self.cos, self.sin = cos, sin  # `rope_factors`: (B, 1, T, hd), the sin signed for rotate-half
        self.token_mask = token_mask  # (B, T) bool: real tokens of this call, None if all real
        self.attn_mask = attn_mask  # (B, 1, T, S) bool: may query i see key slot s; None: causal
        self.segments = segments  # (B, T) packed-example ids (training), None: one sequence per row


class Backbone(nn.Module):
    """`model.*` in Hugging Face's naming: embedding, blocks and final norm."""

    def __init__(self, config: ModelConfig, make_feed_forward: Callable[[ModelConfig, int], nn.Module]) -> None:
        super().__init__()
        # Given its weight, nn.Embedding skips its own init: on the meta device that init goes
        # through torch._refs, which imports torch._dynamo (~70 MiB of modules) just to load a model.
        weight = torch.empty(config.vocab_size, config.hidden_size)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=weight)
        if not weight.is_meta:
            nn.init.normal_(self.embed_tokens.weight)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, make_feed_forward(config, i)) for i in range(config.num_hidden_layers)
        )
        wide = config.hidden_size >= FAST_GEMV_MIN_IN
        self.embedding_norm = RMSNorm(config.hidden_size, config.norm_eps, kernel=wide)


def dense_feed_forward(config: ModelConfig, layer_idx: int) -> nn.Module:
    return MLP(config.hidden_size, config.intermediate_size)


class Lfm2ForCausalLM(nn.Module):
    """Token ids (B, T) -> logits (B, T, vocab); with a cache, logits of the new positions only."""

    make_feed_forward: Callable[[ModelConfig, int], nn.Module] = staticmethod(dense_feed_forward)

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False  # training: trade recomputation for activation memory
        self.model = Backbone(config, self.make_feed_forward)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        """The device of the weights (one for the whole model); read off the final norm, which is
        never quantized, tied or replaced."""
        return self.model.embedding_norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the activations, and so of the cache: what the embedding outputs. That is
        the weight's dtype for an `nn.Embedding`; a quantized embedding (`lfm2.quant.QuantEmbedding`)
        stores integers and says the dtype it computes in as `.dtype`."""
        embedding = self.model.embed_tokens
        return embedding.weight.dtype if isinstance(embedding, nn.Embedding) else embedding.dtype

    def make_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> Cache:
        """A cache for `batch_size` rows of up to `max_len` tokens, on the model's device."""
        return Cache(self.config, batch_size, max_len, dtype or self.dtype, self.device)

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        last_only: bool = False,
        segment_ids: torch.Tensor | None = None,
        logits_at: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the model on `input_ids` (B, T).

        `attention_mask` (B, T), 1 for real tokens and 0 for left padding, defaults to all real.
        With a cache, the tokens continue each row's sequence and the cache advances.
        `last_only` returns the logits of the last position only (B, 1, vocab), which is all that
        generation needs after a prefill and saves the (T, vocab) head matmul.
        `segment_ids` (B, T) packs several examples into one row (training): each run of equal
        ids is its own sequence, with its own positions, attention and convolution state, so the
        logits equal those of the examples run one by one.
        `logits_at` (B, T) bool returns the logits of those positions only, (N, vocab) in row-major
        order: training needs them where a target is, and in fine-tuning that is a fifth of the
        tokens, while the head and its softmax over the vocabulary were a quarter of a step's time.
        `inputs_embeds` (B, T, d) replaces the embedding of `input_ids` (which still give the shape):
        a vision model's prompt, where image features stand in for the `<image>` tokens.
        """
        B, T = input_ids.shape
        device = input_ids.device
        mask = None if attention_mask is None else attention_mask.to(device=device, dtype=torch.bool)
        if segment_ids is not None:
            if cache is not None or mask is not None:
                raise ValueError("segment_ids (packed training rows) cannot be combined with a cache or attention_mask")
            start = 0
            positions = _segment_positions(segment_ids)
            same = segment_ids[:, :, None] == segment_ids[:, None, :]
            causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
            attn_mask = (same & causal)[:, None]
        elif cache is not None:
            real = mask if mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
            start, positions = cache.reserve(real, all_real=True if mask is None else None)
            if cache.dense and T == 1:
                attn_mask = None  # one new token, every filled slot valid: it sees them all
            elif start == 0 and mask is None:
                # A fresh prompt, every token real: the mask below would be the plain causal one. SDPA told so
                # (`is_causal`) needs no (groups * T, S) mask and gives the same bits: a 512-token chunk of
                # LFM2-350M's attention, 24.5 -> 23.0 ms a layer on Zen 1 (docs/benchmarks.md).
                attn_mask = None
            else:
                S = start + T
                slots = torch.arange(S, device=device)
                query_slots = torch.arange(start, S, device=device)[:, None]
                # (T, S) causal & (B, 1, 1, S) real keys; a query always sees itself (no empty rows).
                attn_mask = ((slots <= query_slots) & cache.valid[:, None, None, :S]) | (slots == query_slots)
        else:
            start = 0
            if mask is None:
                positions = torch.arange(T, device=device).expand(B, T)
                attn_mask = None
            else:
                positions = (torch.cumsum(mask, dim=1) - 1).clamp(min=0)
                slots = torch.arange(T, device=device)
                causal = slots[None, :] <= slots[:, None]
                attn_mask = (causal & mask[:, None, None, :]) | torch.eye(T, dtype=torch.bool, device=device)
        if mask is not None and bool(mask.all()):
            mask = None
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        cos, sin = rope(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        ctx = StepContext(cache, start, *rope_factors(cos, sin), mask, attn_mask, segment_ids)
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # Keep only each block's input; recompute its insides during backward.
                x = torch.utils.checkpoint.checkpoint(layer, x, ctx, use_reentrant=False)
            else:
                x = layer(x, ctx)
        if last_only:
            x = x[:, -1:]
        elif logits_at is not None:
            x = x[logits_at]
        return self.lm_head(self.model.embedding_norm(x))


def _segment_positions(segments: torch.Tensor) -> torch.Tensor:
    """Positions (B, T) that restart at 0 wherever the segment id changes."""
    T = segments.shape[1]
    idx = torch.arange(T, device=segments.device).expand_as(segments)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=1).values
    return idx - first
