"""Distilled decoding's flow map (decoding/flow_map.py): pushforward, closed-form velocity, determinism, accuracy.

1. Tokens of ODE(ε), ε ~ N(0, I), follow p (chi-square, 10⁵ draws per case) for peaked and flat p on random,
   near-duplicate and degenerate-support codebooks; dropping the p_v weights from the velocity is caught.
2. The closed-form velocity is E[c - ε | x_t]: for (c ~ p, ε ~ N(0, I)) samples the residual
   (c - ε) - v(x_t, t) is orthogonal to every test function of x_t (localised bumps), the defining
   property of a conditional expectation, checked by a z-test with no kernel bias; wrong velocities fail it.
3. The same noise gives identical tokens, in any batch and leading shape.
"""
import math

import pytest
import torch
from scipy.stats import chisquare

from decoding.flow_map import (flow_map, flow_map_error_table, flow_sigma_range, flow_time_grid,
                               flow_velocity, nearest_code)

V = 8
N_DRAWS = 100_000


pytestmark = pytest.mark.usefixtures("one_thread")


def codebook(kind: str, d: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    c = torch.randn(V, d, generator=gen, dtype=torch.float64)
    if kind == "near_duplicate":  # two pairs of codes 1e-2 apart, one pair 1e-3 apart
        c[1] = c[0] + 1e-2 * torch.randn(d, generator=gen, dtype=torch.float64)
        c[3] = c[2] + 1e-2 * torch.randn(d, generator=gen, dtype=torch.float64)
        c[5] = c[4] + 1e-3 * torch.randn(d, generator=gen, dtype=torch.float64)
    elif kind == "sphere":  # l2-normalised, as LlamaGen's codebook
        c = c / c.norm(dim=-1, keepdim=True)
    return c


P_PEAKED = torch.tensor([0.62, 0.2, 0.1, 0.05, 0.02, 0.008, 0.002, 0.0], dtype=torch.float64)
P_FLAT = torch.full((V,), 1 / V, dtype=torch.float64)


def chi2_pvalue(tokens: torch.Tensor, p: torch.Tensor) -> float:
    counts = torch.bincount(tokens.flatten(), minlength=V).double()
    if counts[p == 0].sum() > 0:
        return 0.0
    support = p > 0
    return float(chisquare(counts[support].numpy(), (p[support] * counts.sum()).numpy()).pvalue)


CASES = [("gaussian", 2, P_PEAKED), ("gaussian", 4, P_FLAT), ("sphere", 8, P_PEAKED),
         ("near_duplicate", 2, P_FLAT), ("near_duplicate", 8, P_PEAKED)]


@pytest.mark.parametrize("kind, d, p", CASES)
def test_pushforward_of_noise_is_p(kind, d, p):
    codes = codebook(kind, d, seed=d)
    eps = torch.randn(N_DRAWS, d, generator=torch.Generator().manual_seed(10 + d), dtype=torch.float64)
    out = flow_map(eps, p, codes, steps=24)
    assert chi2_pvalue(out.tokens, p) > 1e-3
    assert ((out.x - codes[out.tokens]).norm(dim=-1) < 1e-6).double().mean() > 0.999  # the flow ends on the codes


@pytest.mark.parametrize("kind, d, p", [CASES[0], CASES[4]])
def test_dropping_the_code_weights_is_caught(kind, d, p):
    """Negative control: the velocity of the *uniform* mixture (the p_v weights dropped) fails the same test."""
    codes = codebook(kind, d, seed=d)
    eps = torch.randn(N_DRAWS, d, generator=torch.Generator().manual_seed(10 + d), dtype=torch.float64)
    wrong = flow_map(eps, (p > 0).double() / (p > 0).sum(), codes, steps=24)
    assert chi2_pvalue(wrong.tokens, p) < 1e-6


def test_near_duplicates_split_their_mass_correctly():
    """Codes 1e-3 apart with masses 0.3 / 0.05: the flow must separate them at σ ~ 1e-3 in the right ratio."""
    codes = codebook("near_duplicate", 4, seed=0)
    p = torch.tensor([0.1, 0.1, 0.1, 0.1, 0.3, 0.05, 0.15, 0.1], dtype=torch.float64)
    eps = torch.randn(N_DRAWS, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    tokens = flow_map(eps, p, codes, steps=24).tokens
    assert chi2_pvalue(tokens, p) > 1e-3
    # stopping the grid at a sigma_min far above the pair's gap merges the pair: caught
    sigma_min, sigma_max = flow_sigma_range(codes)
    coarse = flow_map(eps, p, codes, steps=24, sigmas=(0.5, sigma_max)).tokens
    assert chi2_pvalue(coarse, p) < 1e-6


# -- the velocity is the conditional expectation ---------------------------------------------------

def orthogonality_z(v_fn, p, codes, t, n=400_000, seed=0, centres=6, width=0.5):
    """z-scores of E[φ_j(x_t) ((c - ε) - v(x_t, t))] = 0 for Gaussian bumps φ_j at sampled points.

    Exactly zero in expectation iff v(·, t) = E[c - ε | x_t = ·] on the bumps' region: no kernel bias, so
    the tolerance is the Monte-Carlo standard error alone.
    """
    gen = torch.Generator().manual_seed(seed)
    idx = torch.multinomial(p, n, replacement=True, generator=gen)
    c = codes[idx]
    eps = torch.randn(n, codes.shape[1], generator=gen, dtype=torch.float64)
    x = (1 - t) * eps + t * c  # (n, d)
    resid = (c - eps) - v_fn(x, t)  # (n, d)
    centre = x[torch.randint(0, n, (centres,), generator=gen)]  # (J, d) where the samples are
    phi = torch.exp(-0.5 * torch.cdist(x, centre) ** 2 / width ** 2)  # (n, J)
    terms = phi[:, :, None] * resid[:, None, :]  # (n, J, d)
    return terms.mean(0) / (terms.std(0) / math.sqrt(n))  # (J, d)


@pytest.mark.parametrize("t", [0.0, 0.3, 0.6, 0.85, 0.97])
def test_velocity_is_the_conditional_mean_of_c_minus_eps(t):
    codes = codebook("gaussian", 2, seed=3)
    p = P_PEAKED
    z = orthogonality_z(lambda x, s: flow_velocity(x, s, p, codes), p, codes, t)
    assert z.abs().max() < 5.0, z


@pytest.mark.parametrize("t", [0.3, 0.6, 0.85])
def test_wrong_velocities_fail_the_orthogonality_test(t):
    codes = codebook("gaussian", 2, seed=3)
    p = P_PEAKED
    uniform = torch.full_like(p, 1 / V)
    cases = {
        "p weights dropped": lambda x, s: flow_velocity(x, s, uniform, codes),
        "no 1/(1-t)": lambda x, s: flow_velocity(x, s, p, codes) * (1 - s),
        "posterior variance (1-t), not (1-t)²": lambda x, s: (
            ((p.log() + (s * (x @ codes.T) - 0.5 * s * s * (codes ** 2).sum(-1)) / (1 - s)).softmax(-1) @ codes - x)
            / (1 - s)),
    }
    for name, v_fn in cases.items():
        z = orthogonality_z(v_fn, p, codes, t)
        assert z.abs().max() > 8.0, name


def test_velocity_is_finite_near_t_one_and_with_zero_mass_codes():
    codes = codebook("near_duplicate", 4, seed=0)
    x = torch.randn(100, 4, dtype=torch.float64)
    for t in (0.0, 0.5, 1 - 1e-6, 1 - 1e-12):
        assert torch.isfinite(flow_velocity(x, t, P_PEAKED, codes)).all()
    t_rows = torch.rand(100, dtype=torch.float64)
    per_row = flow_velocity(x, t_rows, P_PEAKED.expand(100, V), codes)
    assert torch.allclose(per_row[7], flow_velocity(x[7], float(t_rows[7]), P_PEAKED, codes))


# -- determinism, shapes, grid, accuracy -----------------------------------------------------------

def test_same_noise_gives_identical_tokens_in_any_batch():
    codes = codebook("near_duplicate", 8, seed=1)
    gen = torch.Generator().manual_seed(2)
    p = torch.softmax(2 * torch.randn(3, 5, V, generator=gen, dtype=torch.float64), -1)  # (3, 5, V) per position
    eps = torch.randn(3, 5, 8, generator=gen, dtype=torch.float64)
    a, b = flow_map(eps, p, codes), flow_map(eps.clone(), p.clone(), codes)
    assert torch.equal(a.x, b.x) and torch.equal(a.tokens, b.tokens)
    assert a.tokens.shape == (3, 5)
    perm = torch.randperm(15, generator=gen)
    flat = flow_map(eps.reshape(15, 8)[perm], p.reshape(15, V)[perm], codes)
    assert torch.equal(flat.tokens, a.tokens.reshape(15)[perm])
    single = flow_map(eps[1, 2], p[1, 2], codes)
    assert single.tokens.shape == () and int(single.tokens) == int(a.tokens[1, 2])


def test_time_grid_and_sigma_range():
    codes = codebook("near_duplicate", 4, seed=0)
    sigma_min, sigma_max = flow_sigma_range(codes)
    gap = torch.pdist(codes).min().item()
    assert sigma_min == pytest.approx(0.02 * gap)
    assert sigma_max > 10 * codes.norm(dim=-1).max()
    t = flow_time_grid(10, sigma_min, sigma_max)
    assert t[0] == 0 and t[-1] == 1 and (t.diff() > 0).all() and t.shape == (11,)
    dup = torch.cat([codes, codes[:1]])  # an exact duplicate is ignored, not a zero gap
    assert flow_sigma_range(dup)[0] == pytest.approx(sigma_min)
    many = torch.randn(300, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # cdist's matmul path
    assert flow_sigma_range(many)[0] == pytest.approx(0.02 * torch.pdist(many).min().item())
    with pytest.raises(ValueError, match="steps must be >= 2"):
        flow_time_grid(1, sigma_min, sigma_max)


def test_tokens_stay_in_p_support_even_for_duplicated_codes():
    codes = codebook("gaussian", 2, seed=4)
    codes[6] = codes[2]  # an exact duplicate; the lower index has no mass
    p = P_PEAKED.clone()
    p[2], p[6] = 0.0, p[2] + p[6]
    eps = torch.randn(20_000, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    tokens = flow_map(eps, p, codes).tokens
    assert (p[tokens] > 0).all()
    assert torch.equal(nearest_code(codes, codes, P_FLAT), torch.arange(V).masked_fill(torch.arange(V) == 6, 2))


def test_endpoint_error_falls_with_steps():
    codes = codebook("near_duplicate", 4, seed=0)
    eps = torch.randn(4000, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    rows = flow_map_error_table(P_FLAT, codes, eps, steps=(4, 8, 32), solvers=("euler", "rk4"), reference_steps=256)
    err = {(r["solver"], r["steps"]): r for r in rows}
    assert err["rk4", 32]["token_mismatch"] < 0.01 < err["euler", 8]["token_mismatch"]
    assert err["rk4", 32]["mean_error"] < err["rk4", 8]["mean_error"] / 10
    assert err["rk4", 8]["mean_error"] < err["euler", 8]["mean_error"]
    assert err["rk4", 32]["nfe"] == 4 * 31 + 1


def test_bad_inputs_name_the_problem():
    codes = codebook("gaussian", 2, seed=0)
    with pytest.raises(ValueError, match="solver must be"):
        flow_map(torch.zeros(2), P_FLAT, codes, solver="midpoint")
    with pytest.raises(ValueError, match="shapes disagree"):
        flow_map(torch.zeros(3), P_FLAT, codes)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    codes = codebook("near_duplicate", 8, seed=1)
    eps = torch.randn(20_000, 8, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    cpu = flow_map(eps, P_PEAKED, codes)
    gpu = flow_map(eps.cuda(), P_PEAKED.cuda(), codes.cuda())
    same = gpu.tokens.cpu() == cpu.tokens
    assert same.double().mean() > 0.9999  # a point on a decision boundary may flip under different rounding
    assert torch.allclose(gpu.x.cpu()[same], cpu.x[same], atol=1e-6)
