"""Choose the next token from logits: small composable functions and the pipeline that chains them.

Every function takes float logits of shape (B, V) and returns new logits of the same shape
(filtered tokens set to -inf). `sample_next` applies them in transformers' order
(`GenerationMixin._get_logits_processor`), with the OpenAI presence/frequency penalties placed
right after the repetition penalty, as vLLM does:

    repetition penalty -> presence/frequency penalty -> [greedy argmax if temperature == 0]
    -> temperature -> top-k -> top-p -> min-p -> softmax -> multinomial draw

Penalties also apply to greedy decoding (in transformers they are processors, not warpers).
Defaults come from the checkpoint's `generation_config.json`, else from the LFM2 model card:
temperature 0.3, min_p 0.15, repetition_penalty 1.05.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lfm2.errors import GenerationError

# LFM2 model card recommendation, used for every field a generation_config.json leaves unset.
MODEL_CARD_DEFAULTS: dict[str, Any] = {"temperature": 0.3, "min_p": 0.15, "repetition_penalty": 1.05}
# Temperatures below this sample greedily: logits / 1e-300 overflow to inf and the softmax to NaN.
GREEDY_BELOW = 1e-5
# top-p: how many of the largest tokens to look at first, and how far above p their mass must be to
# be sure that no other token is kept (float32 sums over 65,536 values are good to ~1e-6).
TOP_P_FIRST, TOP_P_MARGIN = 256, 1e-4
_GENERATION_CONFIG_FIELDS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. The neutral value of each field turns its step off.

    temperature: 0 means greedy (argmax); otherwise logits are divided by it.
    top_k: keep the k most likely tokens; 0 (or -1, vLLM's spelling) keeps all.
    top_p: keep the smallest set of tokens whose probability sums to at least top_p; 1 keeps all.
    min_p: keep tokens with probability >= min_p * (top probability); 0 keeps all.
    repetition_penalty: transformers' penalty on every token already in the prompt or output; 1 is off.
    presence_penalty, frequency_penalty: OpenAI's additive penalties on generated tokens; 0 is off.
    seed: seeds the sampling generator, so a run can be reproduced; None draws a fresh seed.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        def number(name: str, low: float, high: float, allowed: str, low_open: bool = False) -> None:
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            ok = ok and (value > low if low_open else value >= low) and value <= high
            if not ok:
                raise GenerationError(f"sampling parameter {name}={value!r} is out of range: expected {allowed}")

        number("temperature", 0.0, math.inf, "a number >= 0 (0 means greedy)")
        number("top_p", 0.0, 1.0, "a number in (0, 1] (1 disables top-p)", low_open=True)
        number("min_p", 0.0, 1.0, "a number in [0, 1] (0 disables min-p)")
        number("repetition_penalty", 0.0, math.inf, "a number > 0 (1 disables it)", low_open=True)
        number("presence_penalty", -2.0, 2.0, "a number in [-2, 2] (0 disables it)")
        number("frequency_penalty", -2.0, 2.0, "a number in [-2, 2] (0 disables it)")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < -1:
            raise GenerationError(
                f"sampling parameter top_k={self.top_k!r} is out of range: expected an integer >= 0 "
                "(0 or -1 disables top-k)"
            )
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0):
            raise GenerationError(
                f"sampling parameter seed={self.seed!r} is out of range: expected None or an integer >= 0"
            )

    @property
    def greedy(self) -> bool:
        """Temperature 0, or one so small that dividing by it overflows float32 (as vLLM treats it)."""
        return self.temperature < GREEDY_BELOW

    @property
    def needs_history(self) -> bool:
        """Whether the penalties need the tokens seen so far (a `TokenHistory`)."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @classmethod
    def from_generation_config(
        cls, path_or_dict: str | os.PathLike | dict | None = None, **overrides: Any
    ) -> SamplingParams:
        """Defaults from a checkpoint's `generation_config.json`, else the LFM2 model card; then `overrides`.

        `path_or_dict` is a checkpoint folder, a generation_config.json path, an already-read dict,
        or None. Each field the config sets is used; the model card (temperature 0.3, min_p 0.15,
        repetition_penalty 1.05) fills the rest. `do_sample: false` means greedy. Overrides whose
        value is None are ignored, so optional CLI or API arguments can be passed straight through.
        """
        config = _read_generation_config(path_or_dict)
        values: dict[str, Any] = dict(MODEL_CARD_DEFAULTS)
        for name in _GENERATION_CONFIG_FIELDS:
            if config.get(name) is not None:
                values[name] = config[name]
        if config.get("do_sample") is False:
            values["temperature"] = 0.0
        fields = {f.name for f in dataclasses.fields(cls)}
        for name, value in overrides.items():
            if name not in fields:
                raise GenerationError(f"unknown sampling parameter {name!r}: expected one of {sorted(fields)}")
            if value is not None:
                values[name] = value
        if isinstance(values.get("top_k"), float) and values["top_k"].is_integer():
            values["top_k"] = int(values["top_k"])
        try:
            return cls(**values)
        except GenerationError as exc:
            raise GenerationError(f"{exc} (from generation config {path_or_dict!s:.200} or the overrides)") from exc


def _read_generation_config(path_or_dict: str | os.PathLike | dict | None) -> dict:
    if path_or_dict is None:
        return {}
    if isinstance(path_or_dict, dict):
        return path_or_dict
    path = Path(path_or_dict)
    if path.is_dir():
        path = path / "generation_config.json"
        if not path.is_file():
            return {}  # a checkpoint without one: the model card's defaults apply
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GenerationError(f"{path}: expected a generation config JSON object, could not read it: {exc}") from exc
    if not isinstance(data, dict):
        raise GenerationError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


class TokenHistory:
    """Per-row record of the tokens seen so far, for the penalties.

    `seen` (B, V) bool: every token of the prompt or the output (repetition penalty).
    `counts` (B, V) int32: how often each token was generated, prompt excluded (OpenAI penalties).
    Both are allocated once and updated in place, so decoding stays allocation-free.
    """

    def __init__(self, prompt_ids: torch.Tensor, vocab_size: int, pad_mask: torch.Tensor | None = None) -> None:
        """`prompt_ids` (B, T); `pad_mask` (B, T) True where the position is padding, to be ignored."""
        if prompt_ids.dim() != 2:
            raise GenerationError(f"TokenHistory: prompt_ids should have shape (B, T), found {tuple(prompt_ids.shape)}")
        batch, device = prompt_ids.shape[0], prompt_ids.device
        self.seen = torch.zeros(batch, vocab_size, dtype=torch.bool, device=device)
        self.counts = torch.zeros(batch, vocab_size, dtype=torch.int32, device=device)
        ids = prompt_ids.long()
        real = torch.ones_like(ids, dtype=torch.bool) if pad_mask is None else ~pad_mask.bool()
        if pad_mask is not None and pad_mask.shape != prompt_ids.shape:
            raise GenerationError(
                f"TokenHistory: pad_mask shape {tuple(pad_mask.shape)} should equal prompt_ids shape "
                f"{tuple(prompt_ids.shape)}"
            )
        checked = torch.where(real, ids, 0)
        if checked.numel() and (int(checked.min()) < 0 or int(checked.max()) >= vocab_size):
            raise GenerationError(f"TokenHistory: prompt ids must lie in [0, {vocab_size}), found out-of-range ids")
        # Padding is written to an extra column that is dropped, so no row sees its pad token.
        seen = torch.zeros(batch, vocab_size + 1, dtype=torch.bool, device=device)
        seen.scatter_(1, torch.where(real, ids, vocab_size), True)
        self.seen.copy_(seen[:, :vocab_size])

    def update(self, new_tokens: torch.Tensor, active: torch.Tensor | None = None) -> None:
        """Record one generated token per row; rows where `active` (B,) is False are left unchanged."""
        index = new_tokens.long().view(-1, 1)  # (B,) -> (B, 1)
        ones = torch.ones_like(index, dtype=self.counts.dtype)
        if active is not None:
            ones = ones * active.view(-1, 1).to(self.counts.dtype)
            self.seen.scatter_(1, index, self.seen.gather(1, index) | active.view(-1, 1).bool())
        else:
            self.seen.scatter_(1, index, True)
        self.counts.scatter_add_(1, index, ones)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' repetition penalty: seen tokens' logits are divided by `penalty` if positive,
    multiplied by it if negative (so a penalty > 1 always makes them less likely)."""
    if penalty == 1.0:
        return logits
    # Only the seen entries change: a few hundred of 65,536, so index them rather than rewrite the row
    # twice (two full `torch.where` passes were a fifth of a sampled token's cost).
    rows, cols = seen.nonzero(as_tuple=True)
    values = logits[rows, cols]
    out = logits.clone()
    out[rows, cols] = torch.where(values < 0, values * penalty, values / penalty)
    return out


def apply_presence_frequency_penalty(
    logits: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float
) -> torch.Tensor:
    """OpenAI's penalties: logits -= presence * (count > 0) + frequency * count, over generated tokens."""
    if presence == 0.0 and frequency == 0.0:
        return logits
    counts = counts.to(logits.dtype)
    return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide by a temperature > 0 (temperature 0, greedy, is handled by `sample_next`)."""
    if temperature == 1.0:
        return logits
    return logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row; tokens tied with the k-th are kept too (as transformers)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, -math.inf)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability sums to >= p (transformers' rule).

    Sorted ascending, a token is dropped when the cumulative probability up to and including it is
    <= 1 - p; the most likely token is always kept.
    """
    if p >= 1.0:
        return logits
    # Sorting LFM2's 65,536 logits took ~5 ms a token here (docs/benchmarks.md), most of a small model's
    # step. The kept tokens are among the largest: take the m largest, m growing, until they hold p of the
    # mass with room to spare. Every token outside them then sums to <= 1 - p from below, so the rule drops
    # it, and for the m the rule needs only their own sums and the mass below them.
    probs = logits.softmax(dim=-1)
    m = TOP_P_FIRST
    while m * 2 < logits.shape[-1]:
        top, index = probs.topk(m, dim=-1)  # (B, m), descending
        inside = top.sum(dim=-1, keepdim=True)
        if bool((inside >= p + TOP_P_MARGIN).all()):
            below = (probs.sum(dim=-1, keepdim=True) - inside).clamp_min(0.0)  # the mass outside the m
            drop_top = below + top.flip(-1).cumsum(dim=-1).flip(-1) <= (1 - p)  # ascending sum up to each
            drop_top[..., :1] = False
            keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, index, ~drop_top)
            return logits.masked_fill(~keep, -math.inf)
        m *= 16  # 256, then 4,096, then the whole sort: a flat row pays one or two topk more than it
    return _top_p_sorted(logits, p)


def _top_p_sorted(logits: torch.Tensor, p: float) -> torch.Tensor:
    """`top_p_filter` by its definition, over the whole sorted row."""
    sorted_logits, sorted_idx = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= (1 - p)
    drop_sorted[..., -1:] = False
    drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)
    return logits.masked_fill(drop, -math.inf)


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep exactly the tokens whose probability is >= min_p * (the row's top probability)."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.amax(dim=-1, keepdim=True)  # (B, 1)
    return logits.masked_fill(probs < threshold, -math.inf)


def choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """The parameters of choice `index` of a request's n: each its own seed (seed + index), so the
    choices differ and a seeded request still reproduces. Without a seed each row draws its own."""
    if index == 0 or params.seed is None:
        return params
    return dataclasses.replace(params, seed=(params.seed + index) % 2**64)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for `sample_next`; the same seed gives the same draws on the same device."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def process_logits(logits: torch.Tensor, params: SamplingParams, history: TokenHistory | None = None) -> torch.Tensor:
    """Every step of `sample_next` before the draw: the float32 logits (B, V) it samples from."""
    logits = logits.float()
    if params.needs_history:
        if history is None:
            raise GenerationError(
                f"repetition_penalty={params.repetition_penalty}, presence_penalty={params.presence_penalty} "
                f"and frequency_penalty={params.frequency_penalty} need the tokens seen so far: "
                "pass history=TokenHistory(...)"
            )
        logits = apply_repetition_penalty(logits, history.seen, params.repetition_penalty)
        logits = apply_presence_frequency_penalty(
            logits, history.counts, params.presence_penalty, params.frequency_penalty
        )
    if params.greedy:
        return logits
    logits = apply_temperature(logits, params.temperature)
    logits = top_k_filter(logits, params.top_k)
    logits = top_p_filter(logits, params.top_p)
    return min_p_filter(logits, params.min_p)


def sample_next(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    history: TokenHistory | None = None,
) -> torch.Tensor:
    """Pick one token per row from logits (B, V); returns (B,) int64.

    Greedy when `params.temperature == 0`, else a draw from the filtered distribution using
    `generator` (see `make_generator`), so a fixed seed reproduces a run.
    """
    if logits.dim() != 2:
        raise GenerationError(f"sample_next: logits should have shape (B, V), found {tuple(logits.shape)}")
    if params.greedy:
        return process_logits(logits, params, history).argmax(dim=-1)
    return draw(filtered_probs(logits, params, history), generator)


def filtered_probs(logits: torch.Tensor, params: SamplingParams, history: TokenHistory | None = None) -> torch.Tensor:
    """What `sample_next` draws from when it samples: (B, V) probabilities, zero outside each row's kept
    tokens, each row's sum not necessarily 1 (`draw` does not need it). Rows are independent, so rows
    that share parameters can be filtered in one call and drawn each with its own generator."""
    if params.min_p <= 0.0:
        return process_logits(logits, params, history).softmax(dim=-1)
    # min-p last (`process_logits`), without a second softmax
    probs = process_logits(logits, dataclasses.replace(params, min_p=0.0), history).softmax(dim=-1)
    return probs.masked_fill(probs < params.min_p * probs.amax(dim=-1, keepdim=True), 0.0)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of `probs` (B, V), each drawn with its row's probabilities; returns (B,) int64.

    Inverse transform sampling: one uniform per row against the running sum of the row's nonzero
    entries. Why not `torch.multinomial`: for one sample it draws an exponential for every entry,
    65,536 per token, which measured 1.35 ms on this project's 2-core machine, more than the rest of
    the model card's sampling (penalty, temperature, min-p, softmax) together. After min-p a few
    entries are left, and the sum and the search over them take microseconds. The sum is in float64
    and u stays below the row's total, so an entry of probability 0 is never drawn.
    """
    out = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    for b, row in enumerate(probs):
        index = row.nonzero().squeeze(1)
        values = row[index]
        cumulative = values.double().cumsum(dim=0)
        total = cumulative[-1:]
        if not index.numel() or not bool(torch.isfinite(total).all() and (values >= 0).all()):
            raise GenerationError("probability tensor contains either `inf`, `nan` or element < 0, or sums to 0")
        u = torch.rand(1, generator=generator, dtype=torch.float64,
                       device=generator.device if generator is not None else row.device).to(row.device) * total
        u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
        out[b] = index[torch.searchsorted(cumulative, u, right=True)]
    return out
