"""Logits processors equal transformers' LogitsProcessors on random logits; config validation."""

from __future__ import annotations

import pytest
import torch
from transformers.generation import logits_process as hf

from ernie45.errors import ErnieError
from ernie45.generation import GenerationConfig, make_processors, make_sampler, make_warpers
from ernie45.generation import sampling as S

B, V = 4, 97


def _scores(seed: int, ties: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, V, generator=g) * 3
    return x.round(decimals=0) if ties else x  # rounding makes many exact ties


def _ids(seed: int, length: int = 30, vocab: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, length), generator=g)  # small vocab: many repeated n-grams


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.equal(a, b), (a - b).abs().nan_to_num().max()


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("t", [0.3, 0.7, 1.5])
def test_temperature(t, ties):
    s = _scores(1, ties)
    _same(S.apply_temperature(s, t), hf.TemperatureLogitsWarper(t)(None, s.clone()))


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("k,keep", [(1, 1), (5, 1), (50, 1), (3, 4), (500, 1)])
def test_top_k(k, keep, ties):
    s = _scores(2, ties)
    _same(S.apply_top_k(s, k, keep), hf.TopKLogitsWarper(k, min_tokens_to_keep=keep)(None, s.clone()))


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("p,keep", [(0.05, 1), (0.5, 1), (0.9, 1), (0.99, 1), (0.3, 5), (1.0, 1)])
def test_top_p(p, keep, ties):
    s = _scores(3, ties)
    _same(S.apply_top_p(s, p, keep), hf.TopPLogitsWarper(p, min_tokens_to_keep=keep)(None, s.clone()))


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("p,keep", [(0.0, 1), (0.05, 1), (0.3, 1), (0.9, 3), (1.0, 1)])
def test_min_p(p, keep, ties):
    s = _scores(4, ties)
    _same(S.apply_min_p(s, p, keep), hf.MinPLogitsWarper(p, min_tokens_to_keep=keep)(None, s.clone()))


@pytest.mark.parametrize("penalty", [0.6, 1.0, 1.3, 2.0])
def test_repetition_penalty(penalty):
    s, ids = _scores(5), _ids(5, vocab=V + 8)  # some ids beyond the scores' vocab, as transformers allows
    _same(
        S.apply_repetition_penalty(s, ids, penalty),
        hf.RepetitionPenaltyLogitsProcessor(penalty)(ids, s.clone()),
    )
    ignore = torch.tensor([0, 3, 7, 29])  # left padding lengths: those positions do not count
    ref = hf.RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=ignore)(ids, s.clone())
    _same(S.apply_repetition_penalty(s, ids, penalty, ignore), ref)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 31])
def test_no_repeat_ngram(n):
    s, ids = _scores(6), _ids(6)
    _same(S.apply_no_repeat_ngram(s, ids, n), hf.NoRepeatNGramLogitsProcessor(n)(ids, s.clone()))


@pytest.mark.parametrize("generated", [0, 2, 3, 5])
def test_min_new_tokens_suppresses_eos(generated):
    prompt_len, eos = 10, [2, 7]
    s, ids = _scores(7), _ids(7, length=prompt_len + generated)
    (proc,) = make_processors(prompt_len=prompt_len, min_new_tokens=3, eos_token_ids=eos)
    ref = hf.MinNewTokensLengthLogitsProcessor(prompt_len, 3, eos)(ids, s.clone())
    _same(proc(ids, s), ref)
    assert bool(torch.isinf(proc(ids, s)[:, eos]).all()) == (generated < 3)


def test_presence_frequency_penalty_exact():
    s = torch.zeros(2, 6)
    gen = torch.tensor([[1, 1, 1, 4], [5, 0, 5, 5]])
    out = S.apply_presence_frequency_penalty(s, gen, presence=0.5, frequency=0.25)
    expected = torch.tensor([[0, -1.25, 0, 0, -0.75, 0], [-0.75, 0, 0, 0, 0, -1.25]])
    _same(out, expected)
    # only the generated part counts: the prompt is sliced off by make_processors
    (proc,) = make_processors(prompt_len=3, presence_penalty=0.5, frequency_penalty=0.25)
    _same(proc(torch.cat([torch.full((2, 3), 3), gen], dim=1), s), expected)


def test_processor_order_matches_transformers():
    """Penalties then warpers, in transformers' order, with min_tokens_to_keep as in beam sampling."""
    s, ids = _scores(8), _ids(8, length=20)
    ours = make_processors(
        prompt_len=16, repetition_penalty=1.2, no_repeat_ngram_size=2, min_new_tokens=8, eos_token_ids=[2]
    )
    warpers = make_warpers(temperature=0.7, top_k=20, top_p=0.8, min_p=0.05, min_tokens_to_keep=2)
    ref = hf.LogitsProcessorList(
        [
            hf.RepetitionPenaltyLogitsProcessor(1.2),
            hf.NoRepeatNGramLogitsProcessor(2),
            hf.MinNewTokensLengthLogitsProcessor(16, 8, [2]),
            hf.TemperatureLogitsWarper(0.7),
            hf.TopKLogitsWarper(20, min_tokens_to_keep=2),
            hf.TopPLogitsWarper(0.8, min_tokens_to_keep=2),
            hf.MinPLogitsWarper(0.05, min_tokens_to_keep=2),
        ]
    )(ids, s.clone())
    out = S.apply_all(ours, ids, s)
    for w in warpers:
        out = w(out)
    _same(out, ref)


def test_sampler_draws_what_transformers_draws():
    s = _scores(9)
    warped = hf.LogitsProcessorList(
        [hf.TemperatureLogitsWarper(0.8), hf.TopKLogitsWarper(50), hf.TopPLogitsWarper(0.9)]
    )(None, s.clone())
    torch.manual_seed(123)
    ref = torch.multinomial(torch.softmax(warped, dim=-1), num_samples=1).squeeze(1)
    sampler = make_sampler(
        do_sample=True, temperature=0.8, top_k=50, top_p=0.9, generator=torch.Generator().manual_seed(123)
    )
    _same(sampler(s), ref)
    assert torch.equal(make_sampler(do_sample=False)(s), s.argmax(-1))


def test_seeded_sampler_is_reproducible():
    s = _scores(10).repeat(8, 1)
    draws = [make_sampler(do_sample=True, generator=torch.Generator().manual_seed(7))(s) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    other = make_sampler(do_sample=True, generator=torch.Generator().manual_seed(8))(s)
    assert not torch.equal(draws[0], other)


def test_defaults_are_transformers_defaults():
    cfg = GenerationConfig().with_defaults()
    assert (
        cfg.do_sample,
        cfg.temperature,
        cfg.top_k,
        cfg.top_p,
        cfg.repetition_penalty,
        cfg.num_beams,
        cfg.length_penalty,
        cfg.early_stopping,
        cfg.num_return_sequences,
    ) == (False, 1.0, 50, 1.0, 1.0, 1, 1.0, False, 1)
    # layering: set fields win, None never overrides
    base = GenerationConfig(top_p=0.8, temperature=0.9, eos_token_id=[2, 4])
    cfg = base.merge(GenerationConfig(top_p=0.5)).update(temperature=None, top_k=7)
    assert (cfg.top_p, cfg.temperature, cfg.top_k, cfg.eos_token_ids) == (0.5, 0.9, 7, [2, 4])
    assert GenerationConfig(temperature=0.0, do_sample=True).with_defaults().do_sample is False


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(temperature=-0.1), "temperature"),
        (dict(num_beams=0), "num_beams"),
        (dict(top_k=-1), "top_k"),
        (dict(min_p=2.0), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
        (dict(num_return_sequences=2), "num_return_sequences"),
        (dict(early_stopping="soon"), "early_stopping"),
        (dict(eos_token_id=-3), "eos_token_id"),
        (dict(stop_strings=[""]), "stop_strings"),
        (dict(presence_penalty=3.0), "presence_penalty"),
    ],
)
def test_validation_errors(kw, msg):
    with pytest.raises(ErnieError, match=msg):
        GenerationConfig().update(**kw).with_defaults().validate()


def test_unknown_parameter_is_an_error():
    with pytest.raises(ErnieError, match="top_q"):
        GenerationConfig().update(top_q=0.5)


def test_generation_config_file_round_trip(tmp_path):
    (tmp_path / "generation_config.json").write_text(
        '{"_from_model_config": true, "eos_token_id": [2, 4], "top_p": 0.7, "temperature": 0.95, '
        '"do_sample": true, "transformers_version": "5.24.0"}'
    )
    cfg = GenerationConfig.from_pretrained(tmp_path)
    assert (cfg.eos_token_ids, cfg.top_p, cfg.temperature, cfg.do_sample) == ([2, 4], 0.7, 0.95, True)
    out = tmp_path / "out"
    out.mkdir()
    cfg.save(out)
    assert GenerationConfig.from_pretrained(out) == cfg
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(ErnieError, match="not valid JSON"):
        GenerationConfig.from_pretrained(tmp_path)
