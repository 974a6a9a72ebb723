"""Logit filters, guidance and seeded sampling (decoding/sampling.py) on hand-made logits."""
import math

import pytest
import torch

from decoding.sampling import SamplingConfig
from decoding.sampling import (cfg_combine, cfg_split_combine, filter_logits, logits_to_probs, sample_from_logits,
                               top_k_filter, top_p_filter)


def support(logits: torch.Tensor) -> set:
    return set(torch.nonzero(torch.isfinite(logits)).flatten().tolist())


# -- top-k / top-p ------------------------------------------------------------------------------

@pytest.mark.parametrize("k, expected", [(1, {1}), (2, {1, 3}), (3, {1, 3, 4}), (0, {0, 1, 2, 3, 4}),
                                         (9, {0, 1, 2, 3, 4})])
def test_top_k_keeps_exactly_the_k_largest(k, expected):
    logits = torch.tensor([0.1, 3.0, -1.0, 2.0, 0.5])
    out = top_k_filter(logits, k)
    assert support(out) == expected
    kept = sorted(expected)
    assert torch.equal(out[kept], logits[kept])  # kept logits untouched


# probabilities 0.5, 0.3, 0.15, 0.05 placed in a shuffled vocabulary order
PROBS = torch.tensor([0.15, 0.5, 0.05, 0.3])


@pytest.mark.parametrize("p, expected", [(0.0, {1}), (0.4, {1}), (0.5, {1}), (0.6, {1, 3}), (0.79, {1, 3}),
                                         (0.85, {1, 3, 0}), (0.96, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_the_smallest_set_reaching_p(p, expected):
    logits = PROBS.log()
    assert support(top_p_filter(logits, p)) == expected


def test_filters_work_on_batched_rows():
    logits = torch.stack([PROBS.log(), PROBS.flip(0).log()])[None].expand(3, 2, 4)  # (3, 2, V)
    out = top_p_filter(logits, 0.6)
    assert out.shape == (3, 2, 4)
    assert support(out[1, 0]) == {1, 3} and support(out[2, 1]) == {0, 2}
    out = top_k_filter(logits, 1)
    assert support(out[0, 1]) == {2}


def test_top_k_then_top_p_and_temperature():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -2.0])
    probs = logits_to_probs(logits, temperature=2.0)
    assert torch.allclose(probs, (logits / 2).softmax(-1))
    probs = logits_to_probs(logits, top_k=3)
    assert torch.allclose(probs[:3], logits[:3].softmax(-1)) and (probs[3:] == 0).all()
    # top-k 3 renormalizes to (0.665, 0.245, 0.090): top_p 0.8 keeps two of them
    assert support(filter_logits(logits, top_k=3, top_p=0.8)) == {0, 1}
    assert torch.equal(logits_to_probs(logits, temperature=0), torch.tensor([1.0, 0, 0, 0, 0]))


# -- guidance ----------------------------------------------------------------------------------

def test_cfg_combination():
    cond, uncond = torch.tensor([1.0, 2.0]), torch.tensor([0.5, -1.0])
    assert torch.equal(cfg_combine(cond, uncond, 1.0), cond)
    assert torch.equal(cfg_combine(cond, uncond, 0.0), uncond)
    assert torch.allclose(cfg_combine(cond, uncond, 3.0), uncond + 3.0 * (cond - uncond))
    both = torch.stack([cond, uncond])  # [cond; uncond] batch
    assert torch.allclose(cfg_split_combine(both, 2.0), (uncond + 2 * (cond - uncond))[None])


# -- seeded sampling ---------------------------------------------------------------------------

def test_samples_stay_in_the_support_and_follow_the_distribution():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -2.0]).expand(20000, 5)
    g = torch.Generator().manual_seed(0)
    x = sample_from_logits(logits, top_k=3, generator=g)
    assert x.shape == (20000,) and x.dtype == torch.long
    assert set(x.unique().tolist()) <= {0, 1, 2}
    freq = torch.bincount(x, minlength=5).float() / len(x)
    target = logits_to_probs(logits[0], top_k=3)
    assert (freq - target).abs().max() < 0.015  # ~4.5 sigma at n=20000


def test_same_seed_same_tokens():
    logits = torch.randn(4, 7, 32, generator=torch.Generator().manual_seed(1))
    a = sample_from_logits(logits, 1.0, 10, 0.9, torch.Generator().manual_seed(7))
    b = sample_from_logits(logits, 1.0, 10, 0.9, torch.Generator().manual_seed(7))
    c = sample_from_logits(logits, 1.0, 10, 0.9, torch.Generator().manual_seed(8))
    assert a.shape == (4, 7) and torch.equal(a, b) and not torch.equal(a, c)


def test_greedy_is_argmax():
    logits = torch.randn(3, 11)
    assert torch.equal(sample_from_logits(logits, temperature=0), logits.argmax(-1))
    assert torch.equal(sample_from_logits(logits, top_k=1), logits.argmax(-1))


def test_sampling_config_from_dict_rejects_unknown_keys():
    cfg = SamplingConfig.from_any({"cfg_scale": 2.0, "top_k": 5})
    assert cfg.cfg_scale == 2.0 and cfg.top_k == 5 and math.isclose(cfg.top_p, 1.0)
    assert SamplingConfig.from_any(None) == SamplingConfig()
    with pytest.raises(ValueError, match="unknown sampling setting 'method'.*cfg_scale, temperature"):
        SamplingConfig.from_any({"cfg_scale": 2.0, "method": "sjd"})
