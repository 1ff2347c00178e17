"""Sampling functions against their definitions and against transformers' logits processors."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lfm2.errors import GenerationError
from lfm2.sampling import (
    MODEL_CARD_DEFAULTS,
    SamplingParams,
    TokenHistory,
    apply_presence_frequency_penalty,
    apply_repetition_penalty,
    apply_temperature,
    draw,
    make_generator,
    min_p_filter,
    process_logits,
    sample_next,
    top_k_filter,
    top_p_filter,
)

lp = pytest.importorskip("transformers.generation.logits_process")

B, V, T = 4, 64, 12


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads, and on a busy shared machine thread hand-offs cost
    milliseconds per op; the previous setting is restored for the other test modules."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_logits(seed: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, V, generator=g) * scale


def random_ids(seed: int, length: int = T) -> torch.Tensor:
    return torch.randint(0, V, (B, length), generator=torch.Generator().manual_seed(seed))


def kept(logits: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(logits)


# -- penalties ------------------------------------------------------------------------------------


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_definition_and_transformers(penalty: float) -> None:
    logits, ids = random_logits(0), random_ids(1)
    history = TokenHistory(ids, V)
    got = apply_repetition_penalty(logits, history.seen, penalty)
    expected = logits.clone()
    for b in range(B):
        for t in set(ids[b].tolist()):
            x = logits[b, t]
            expected[b, t] = x * penalty if x < 0 else x / penalty
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    reference = lp.RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
    torch.testing.assert_close(got, reference, rtol=0, atol=0)
    assert not torch.equal(got, logits)


def test_repetition_penalty_ignores_left_padding_like_transformers() -> None:
    logits, ids = random_logits(2), random_ids(3)
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[0, :5] = True
    pad[2, :1] = True
    ids[0, :5] = 0  # pad id; token 0 appears nowhere else in row 0 ...
    ids[0, 5:] = ids[0, 5:].clamp(min=1)  # ... so it must stay unpenalized
    history = TokenHistory(ids, V, pad_mask=pad)
    assert not history.seen[0, 0]
    got = apply_repetition_penalty(logits, history.seen, 1.5)
    reference = lp.RepetitionPenaltyLogitsProcessor(1.5, prompt_ignore_length=pad.int().sum(1))(ids, logits.clone())
    torch.testing.assert_close(got, reference, rtol=0, atol=0)


def test_presence_frequency_penalty_definition() -> None:
    logits = random_logits(4)
    history = TokenHistory(random_ids(5), V)
    assert history.counts.sum() == 0  # the prompt is not counted, only generated tokens
    generated = [torch.tensor([3, 3, 9, 0]), torch.tensor([3, 1, 9, 0]), torch.tensor([5, 1, 2, 0])]
    for step in generated:
        history.update(step)
    got = apply_presence_frequency_penalty(logits, history.counts, presence=0.5, frequency=0.25)
    expected = logits.clone()
    for b in range(B):
        column = [int(step[b]) for step in generated]
        for t in set(column):
            expected[b, t] -= 0.5 + 0.25 * column.count(t)
    torch.testing.assert_close(got, expected)
    assert history.counts[0, 3] == 2 and history.counts[3, 0] == 3


def test_token_history_update_respects_active_rows() -> None:
    history = TokenHistory(torch.zeros(2, 1, dtype=torch.long), V)
    history.update(torch.tensor([7, 8]), active=torch.tensor([True, False]))
    assert history.seen[0, 7] and not history.seen[1, 8]
    assert history.counts[0, 7] == 1 and history.counts[1].sum() == 0


def test_token_history_rejects_bad_ids() -> None:
    with pytest.raises(GenerationError, match=r"prompt ids must lie in \[0, 64\)"):
        TokenHistory(torch.tensor([[1, 64]]), V)
    with pytest.raises(GenerationError, match=r"shape \(B, T\)"):
        TokenHistory(torch.tensor([1, 2]), V)


# -- warpers --------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.3, 1.7])
def test_temperature_matches_transformers(temperature: float) -> None:
    logits = random_logits(6)
    reference = lp.TemperatureLogitsWarper(temperature)(None, logits.clone())
    torch.testing.assert_close(apply_temperature(logits, temperature), reference, rtol=0, atol=0)


@pytest.mark.parametrize("k", [1, 5, 17])
def test_top_k_definition_and_transformers(k: int) -> None:
    logits = random_logits(7).round()  # rounding makes ties: tokens tied with the k-th are kept
    logits[0, :2] = logits[0].max() + 1  # a tie for the top token too
    got = top_k_filter(logits, k)
    kth = logits.sort(dim=-1, descending=True).values[:, k - 1 : k]
    assert torch.equal(kept(got), logits >= kth)
    assert (kept(got).sum(-1) >= k).all() and (kept(got).sum(-1) > k).any()
    torch.testing.assert_close(got, lp.TopKLogitsWarper(k)(None, logits.clone()), rtol=0, atol=0)
    assert top_k_filter(logits, 0) is logits and top_k_filter(logits, V) is logits


@pytest.mark.parametrize("p", [0.05, 0.3, 0.75, 0.95])
def test_top_p_definition_and_transformers(p: float) -> None:
    logits = random_logits(8)
    got = top_p_filter(logits, p)
    probs = logits.softmax(-1)
    for b in range(B):
        order = probs[b].argsort(descending=True)
        mass = probs[b][order].cumsum(0)
        # The smallest prefix of the most likely tokens whose mass reaches p (at least one token).
        n = int((mass < p).sum()) + 1
        assert set(order[:n].tolist()) == set(torch.nonzero(kept(got[b])).flatten().tolist())
    torch.testing.assert_close(got, lp.TopPLogitsWarper(p)(None, logits.clone()), rtol=0, atol=0)


def test_top_p_keeps_the_top_token_even_when_tiny_p() -> None:
    logits = torch.zeros(1, V)  # all tied, p small: exactly one survives, like transformers
    assert int(kept(top_p_filter(logits, 1e-6)).sum()) == 1
    assert top_p_filter(logits, 1.0) is logits


def test_top_p_over_the_largest_tokens_keeps_what_the_sorted_rule_keeps() -> None:
    """On a full vocabulary top_p_filter looks only at the largest tokens (no sort of 65,536). It keeps
    the tokens the definition over the sorted row keeps, up to float rounding: a token on which the two
    differ has an ascending sum within 1e-5 of 1 - p."""
    from lfm2.sampling import _top_p_sorted

    checked = 0
    for seed, scale in enumerate([1.0, 3.0, 6.0, 12.0, 30.0]):
        logits = torch.randn(2, 65_536, generator=torch.Generator().manual_seed(seed)) * scale
        for p in (0.5, 0.9, 0.95):
            fast, sorted_rule = kept(top_p_filter(logits, p)), kept(_top_p_sorted(logits, p))
            assert fast.any(dim=-1).all()
            probs = logits.double().softmax(dim=-1)
            for row in range(2):
                # the exact ascending sum up to each token: the mass of tokens no more likely than it
                order = probs[row].argsort()
                ascending = torch.empty_like(probs[row]).scatter_(0, order, probs[row][order].cumsum(0))
                differ = fast[row] != sorted_rule[row]
                assert ((ascending[differ] - (1 - p)).abs() < 1e-5).all()
                checked += int(sorted_rule[row].sum())
    assert checked > 10_000  # flat rows included: the largest-first path and the fallback both ran


@pytest.mark.parametrize("min_p", [0.01, 0.15, 0.5, 1.0])
def test_min_p_definition_and_transformers(min_p: float) -> None:
    logits = random_logits(9)
    logits[0, :3] = logits[0].max() + 1.0  # a three-way tie for the top token
    got = min_p_filter(logits, min_p)
    probs = logits.softmax(-1)
    assert torch.equal(kept(got), probs >= min_p * probs.max(-1, keepdim=True).values)
    assert kept(got[0, :3]).all()
    torch.testing.assert_close(got, lp.MinPLogitsWarper(min_p)(None, logits.clone()), rtol=0, atol=0)
    assert min_p_filter(logits, 0.0) is logits


# -- the pipeline ---------------------------------------------------------------------------------


def transformers_processors(params: SamplingParams, ids: torch.Tensor, attention_mask: torch.Tensor):
    """The processor list transformers' own `generate` builds for these settings."""
    from transformers import GenerationConfig
    from transformers.generation.utils import GenerationMixin

    config = GenerationConfig(
        do_sample=True,
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        min_p=params.min_p,
        repetition_penalty=params.repetition_penalty,
    )
    model = SimpleNamespace(
        config=SimpleNamespace(is_encoder_decoder=False), _merge_criteria_processor_list=lambda a, b: a
    )
    return GenerationMixin._get_logits_processor(
        model, config, input_ids_seq_length=ids.shape[1], device="cpu", model_kwargs={"attention_mask": attention_mask}
    )


@pytest.mark.parametrize(
    "settings",
    [
        {"temperature": 0.3, "min_p": 0.15, "repetition_penalty": 1.05},  # the model card's
        {"temperature": 0.7, "top_k": 20, "top_p": 0.9, "min_p": 0.05, "repetition_penalty": 1.2},
        {"temperature": 1.5, "top_k": 8, "top_p": 0.5, "repetition_penalty": 0.8},
        {"temperature": 0.5, "top_p": 0.8, "min_p": 0.3},
    ],
)
def test_pipeline_matches_transformers_processor_list(settings: dict) -> None:
    params = SamplingParams(**settings)
    ids = random_ids(10)
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[1, :4] = True  # left padding in row 1
    ids[1, :4] = 0
    logits = random_logits(11)
    history = TokenHistory(ids, V, pad_mask=pad)
    got = process_logits(logits, params, history)
    expected = transformers_processors(params, ids, (~pad).long())(ids, logits.clone())
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not kept(got).all()  # the settings do filter something


def test_presence_penalty_comes_right_after_repetition_penalty() -> None:
    # The OpenAI penalties are subtracted before temperature divides: (x' - pen) / T, not x'/T - pen.
    logits, ids = random_logits(12), random_ids(13)
    history = TokenHistory(ids, V)
    history.update(ids[:, 0])
    params = SamplingParams(temperature=0.5, repetition_penalty=1.1, presence_penalty=1.0, frequency_penalty=0.5)
    expected = apply_repetition_penalty(logits, history.seen, 1.1)
    expected = apply_presence_frequency_penalty(expected, history.counts, 1.0, 0.5) / 0.5
    torch.testing.assert_close(process_logits(logits, params, history), expected)


def test_greedy_takes_argmax_after_penalties() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.9, -1.0]])
    history = TokenHistory(torch.tensor([[1]]), 4)
    params = SamplingParams(temperature=0.0, repetition_penalty=1.2, top_k=1)
    assert sample_next(logits, params, history=history).tolist() == [2]  # 3.0 / 1.2 < 2.9
    assert sample_next(logits, SamplingParams(temperature=0.0)).tolist() == [1]


def test_penalties_without_history_are_refused() -> None:
    with pytest.raises(GenerationError, match="repetition_penalty=1.05.*TokenHistory"):
        sample_next(random_logits(14), SamplingParams(repetition_penalty=1.05))


def test_fixed_seed_reproduces_a_sampled_sequence() -> None:
    params = SamplingParams(temperature=1.0, top_p=0.95, min_p=0.01, repetition_penalty=1.1, seed=1234)

    def run(seed: int) -> list[list[int]]:
        generator = make_generator(seed)
        history = TokenHistory(random_ids(15), V)
        out = []
        for step in range(32):
            token = sample_next(random_logits(100 + step, scale=1.0), params, generator, history)
            history.update(token)
            out.append(token.tolist())
        return out

    first = run(params.seed)
    assert run(params.seed) == first
    assert run(params.seed + 1) != first


def test_sampling_only_draws_kept_tokens() -> None:
    logits = random_logits(16, scale=1.0)
    params = SamplingParams(temperature=1.0, min_p=0.3)
    allowed = kept(process_logits(logits, params))
    generator = make_generator(0)
    draws = torch.stack([sample_next(logits, params, generator) for _ in range(300)], dim=1)  # (B, 300)
    assert allowed.gather(1, draws).all()
    assert any(len(set(row.tolist())) > 1 for row in draws)  # it does sample, not argmax


# -- parameters -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("temperature", -0.1, r"temperature=-0\.1 is out of range: expected a number >= 0"),
        ("temperature", math.nan, r"temperature=nan"),
        ("top_p", 0.0, r"top_p=0\.0 is out of range: expected a number in \(0, 1\]"),
        ("top_p", 1.5, r"top_p=1\.5"),
        ("min_p", -0.01, r"min_p=-0\.01 is out of range: expected a number in \[0, 1\]"),
        ("repetition_penalty", 0.0, r"repetition_penalty=0\.0 is out of range: expected a number > 0"),
        ("presence_penalty", 2.5, r"presence_penalty=2\.5 is out of range: expected a number in \[-2, 2\]"),
        ("frequency_penalty", -3, r"frequency_penalty=-3"),
        ("top_k", -2, r"top_k=-2 is out of range: expected an integer >= 0"),
        ("top_k", 2.5, r"top_k=2\.5"),
        ("seed", -1, r"seed=-1 is out of range"),
        ("temperature", "hot", r"temperature='hot'"),
    ],
)
def test_bad_values_are_refused(field: str, value, message: str) -> None:
    with pytest.raises(GenerationError, match=message):
        SamplingParams(**{field: value})


def test_defaults_come_from_the_model_card_without_generation_config(tmp_path: Path) -> None:
    params = SamplingParams.from_generation_config(tmp_path)  # a folder with no generation_config.json
    assert (params.temperature, params.min_p, params.repetition_penalty) == (0.3, 0.15, 1.05)
    assert (params.top_k, params.top_p) == (0, 1.0)
    assert MODEL_CARD_DEFAULTS == {"temperature": 0.3, "min_p": 0.15, "repetition_penalty": 1.05}
    assert SamplingParams.from_generation_config(None) == params


def test_generation_config_values_win_field_by_field(tmp_path: Path) -> None:
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.7, "top_k": 40, "eos_token_id": 7}))
    params = SamplingParams.from_generation_config(tmp_path)
    assert (params.temperature, params.top_k, params.min_p, params.repetition_penalty) == (0.7, 40, 0.15, 1.05)
    same = SamplingParams.from_generation_config(tmp_path / "generation_config.json")
    assert same == params


def test_do_sample_false_means_greedy_and_overrides_apply() -> None:
    config = {"do_sample": False, "temperature": 0.6, "top_p": 0.9}
    params = SamplingParams.from_generation_config(config)
    assert params.greedy and params.top_p == 0.9
    params = SamplingParams.from_generation_config(config, temperature=0.8, top_k=None, seed=3)
    assert (params.temperature, params.top_k, params.seed) == (0.8, 0, 3)


def test_bad_generation_config_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "generation_config.json"
    path.write_text("{oops")
    with pytest.raises(GenerationError, match=r"generation_config\.json: expected a generation config JSON"):
        SamplingParams.from_generation_config(tmp_path)
    with pytest.raises(GenerationError, match=r"top_p=2 is out of range.*from generation config"):
        SamplingParams.from_generation_config({"top_p": 2})
    with pytest.raises(GenerationError, match="unknown sampling parameter 'temp'"):
        SamplingParams.from_generation_config({}, temp=0.5)


def test_tiny_temperature_is_greedy_not_nan() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.5, -1.0, 0.1]])
    params = SamplingParams(temperature=1e-300)
    assert params.greedy
    assert sample_next(logits, params, make_generator(0)).tolist() == [1, 0]


# -- the draw -------------------------------------------------------------------------------------


def test_draw_follows_the_probabilities_and_never_takes_a_zero() -> None:
    probs = torch.tensor([[0.5, 0.0, 0.2, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0, 2.0]])  # row 1 unnormalized
    generator = make_generator(7)
    n = 20_000
    draws = torch.stack([draw(probs, generator) for _ in range(n)], dim=1)  # (2, n)
    counts = torch.stack([torch.bincount(row, minlength=5) for row in draws]).double()
    assert counts[0, 1] == counts[0, 4] == 0 and counts[1].tolist() == [0, 0, 0, 0, n]
    expected = probs[0].double() * n
    sigma = (expected * (1 - probs[0].double())).sqrt()
    assert ((counts[0] - expected).abs() <= 5 * sigma + 1e-9).all(), counts[0].tolist()


def test_draw_refuses_nan_negative_or_empty_rows() -> None:
    for bad in ([[0.5, math.nan]], [[0.0, 0.0]], [[-0.5, 1.0]], [[math.inf, 1.0]]):
        with pytest.raises(GenerationError, match="probability tensor"):
            draw(torch.tensor(bad), make_generator(0))


def test_model_card_sampling_draws_as_the_pipeline_says() -> None:
    """sample_next skips min-p's second softmax on its fast path: its draws still follow
    softmax(process_logits(...)) row by row."""
    logits = random_logits(21, scale=1.0)
    history = TokenHistory(random_ids(22), V)
    params = SamplingParams(temperature=1.0, min_p=0.1, repetition_penalty=1.05)
    probs = process_logits(logits, params, history).softmax(dim=-1).double()
    generator, n = make_generator(3), 4000
    draws = torch.stack([sample_next(logits, params, generator, history) for _ in range(n)], dim=1)
    for row, p in zip(draws, probs, strict=True):
        counts = torch.bincount(row, minlength=V).double()
        assert (counts[p == 0] == 0).all()
        assert ((counts - p * n).abs() <= 5 * (p * n * (1 - p)).sqrt() + 1e-9).all()
