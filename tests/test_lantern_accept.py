"""LANTERN / LANTERN++ relaxed acceptance (decoding/lantern_accept.py) on random distributions and neighbour lists.

Properties: δ = 0, λ = 1 and k = 0 are standard speculative sampling bit for bit; the aggregated set is the
longest in-budget prefix of the neighbour list; one step's output distribution (computed analytically by
enumerating the draft) is within δ of p for the mixture target and any q, and for the pointwise target with
one-hot drafts; sampled steps match that analytic law (chi-square), and upstream's "zero all k neighbours"
rejection and an always-accept verifier are caught by the same test.
"""
import pytest
import torch
from scipy.stats import chisquare

from decoding.lantern_accept import (aggregated_prefix, lantern_step, lantern_verify, mixture_target,
                                     sample_from_uniform, validate_neighbours)

V, K = 12, 5


def random_neighbours(gen: torch.Generator, V: int, k: int) -> torch.Tensor:
    """(V, k): per code, k distinct other codes in random order (a stand-in for a kNN table)."""
    rows = [[j for j in torch.randperm(V, generator=gen).tolist() if j != v][:k] for v in range(V)]
    return torch.tensor(rows, dtype=torch.int64).view(V, k)


def random_dist(gen: torch.Generator, shape, zeros: float = 0.3, peak: float = 3.0) -> torch.Tensor:
    """Random distributions (..., V) in float64 with about a `zeros` fraction of exact zeros (filtered tokens)."""
    logits = peak * torch.randn(shape, generator=gen, dtype=torch.float64)
    keep = torch.rand(shape, generator=gen) > zeros
    keep[..., 0] = True
    return logits.masked_fill(~keep, float("-inf")).softmax(-1)


def reference_speculative(p, q, x, u):
    """Plain speculative sampling: accept iff u < min(1, p(x)/q(x)); residual norm(max(p - q, 0))."""
    p_x, q_x = p.gather(-1, x[..., None])[..., 0], q.gather(-1, x[..., None])[..., 0]
    accept = u < (p_x / q_x).nan_to_num(nan=0.0).clamp(max=1.0)
    excess = (p - q).clamp(min=0.0)
    total = excess.sum(-1, keepdim=True)
    return accept, torch.where(total > 0, excess / total.clamp(min=torch.finfo(p.dtype).tiny), p)


def one_step_law(p, q, nbrs, **rule):
    """P(output = y) = Σ_x q(x) [α(x) 1{y = x} + (1 - α(x)) residual_x(y)] for one position p, q (V,) -> (V,)."""
    n = p.shape[-1]
    xs = torch.arange(n)
    v = lantern_verify(p.expand(n, n), None if q is None else q.expand(n, n), xs, torch.zeros(n, dtype=p.dtype),
                       nbrs, **rule)
    kernel = v.accept_prob[:, None] * torch.eye(n, dtype=p.dtype) + (1 - v.accept_prob)[:, None] * v.residual  # (x, y)
    return kernel if q is None else (q[:, None] * kernel).sum(0)  # one-hot drafts: one law per drafted x


def tv(a, b):
    return 0.5 * (a - b).abs().sum(-1)


# -- exactness at δ = 0, λ = 1, k = 0 ------------------------------------------------------------------

@pytest.mark.parametrize("target", ["mixture", "pointwise"])
@pytest.mark.parametrize("rule, k", [(dict(delta=0.0), K), (dict(lam=1.0), K), (dict(delta=0.3), 0),
                                     (dict(lam=4.0), 0)])
@pytest.mark.parametrize("one_hot", [False, True])
def test_zero_relaxation_is_standard_speculative_sampling(target, rule, k, one_hot):
    gen = torch.Generator().manual_seed(1)
    p = random_dist(gen, (4, 50, V))  # zero-probability neighbours are common: the upstream trap
    q = random_dist(gen, (4, 50, V))
    x = sample_from_uniform(q, torch.rand(4, 50, generator=gen, dtype=torch.float64))
    if one_hot:
        q = torch.zeros_like(p).scatter_(-1, x[..., None], 1.0)
    u = torch.rand(4, 50, generator=gen, dtype=torch.float64)
    nbrs = random_neighbours(gen, V, k)
    v = lantern_verify(p, None if one_hot else q, x, u, nbrs, target=target, **rule)
    accept, residual = reference_speculative(p, q, x, u)
    assert torch.equal(v.accept, accept)
    assert torch.equal(v.residual, residual)  # bit for bit, on every row
    assert torch.equal(v.target, p)
    excess = (p - q).clamp(min=0)
    assert torch.allclose(v.residual, excess / excess.sum(-1, keepdim=True))  # where rejection is possible
    u2 = torch.rand(4, 50, generator=gen, dtype=torch.float64)
    tokens, _ = lantern_step(p, None if one_hot else q, x, u, u2, nbrs, target=target, **rule)
    assert torch.equal(tokens, torch.where(accept, x, sample_from_uniform(residual, u2)))


# -- the aggregated set ----------------------------------------------------------------------------

@pytest.mark.parametrize("rule", [dict(delta=0.05), dict(delta=0.2), dict(delta=0.6), dict(lam=2.0), dict(lam=5.0),
                                  dict(lam=10.0)])
def test_aggregated_set_is_the_longest_prefix_within_budget(rule):
    gen = torch.Generator().manual_seed(2)
    p = random_dist(gen, (400, V), peak=1.5)
    x = torch.randint(0, V, (400,), generator=gen)
    nbrs = random_neighbours(gen, V, K)
    p_tilde, agg = aggregated_prefix(p, x, nbrs, **rule)
    rows = torch.arange(400)
    assert agg[rows, x].all()
    in_list = agg.gather(-1, nbrs[x])  # (N, k) membership along x's neighbour list
    others = agg.clone()
    others[rows[:, None], nbrs[x]] = False
    others[rows, x] = False
    assert not others.any(), "only x and its listed neighbours may be aggregated"
    m = in_list.sum(-1)
    assert torch.equal(in_list, torch.arange(K)[None] < m[:, None]), "the aggregated neighbours form a prefix"
    p_x = p[rows, x]
    budget = torch.full_like(p_x, rule["delta"]) if "delta" in rule else (rule["lam"] - 1) * p_x
    cum = torch.cat([torch.zeros(400, 1, dtype=p.dtype), p.gather(-1, nbrs[x]).cumsum(-1)], -1)  # (N, k + 1)
    assert (cum.gather(-1, m[:, None])[:, 0] <= budget + 1e-12).all(), "the prefix stays within budget"
    longer = m < K
    assert (cum[longer].gather(-1, m[longer, None] + 1)[:, 0] > budget[longer]).all(), "and is the longest one"
    assert torch.allclose(p_tilde, (p * agg).sum(-1))  # p̃(x) = p(S(x))
    assert (p_tilde - p_x <= budget + 1e-12).all()
    if "lam" in rule:
        assert (p_tilde <= rule["lam"] * p_x + 1e-12).all()
    assert (m > 0).any() and (m < K).any()  # the case mix is not degenerate


# -- total variation of one step --------------------------------------------------------------------

@pytest.mark.parametrize("rule", [dict(delta=0.05), dict(delta=0.2), dict(lam=2.0), dict(lam=5.0)])
def test_mixture_target_keeps_tv_within_budget_for_any_q(rule):
    gen = torch.Generator().manual_seed(3)
    worst = 0.0
    for trial in range(40):
        p = random_dist(gen, (V,), peak=2.0)
        q = random_dist(gen, (V,), zeros=0.0, peak=2.0)
        nbrs = random_neighbours(gen, V, K)
        law = one_step_law(p, q, nbrs, target="mixture", **rule)
        p_hat = mixture_target(p, q, nbrs, **rule)
        assert torch.allclose(law, p_hat, atol=1e-12), "one step samples its target exactly"
        bound = rule.get("delta", 0.0) if "delta" in rule else (rule["lam"] - 1) * (q * p).sum()
        assert tv(p, law) <= bound + 1e-12
        worst = max(worst, float(tv(p, law)))
    assert worst > 0.0  # the relaxation did something


@pytest.mark.parametrize("rule", [dict(delta=0.05), dict(delta=0.2), dict(lam=2.0), dict(lam=5.0)])
def test_one_hot_drafts_output_the_relaxed_target_within_budget(rule):
    gen = torch.Generator().manual_seed(4)
    for trial in range(40):
        p = random_dist(gen, (V,), peak=2.0)
        nbrs = random_neighbours(gen, V, K)
        laws = one_step_law(p, None, nbrs, target="pointwise", **rule)  # (x, y): the output law given draft x
        p_tilde, agg = aggregated_prefix(p.expand(V, V), torch.arange(V), nbrs, **rule)
        # LANTERN's rule: accept x with p̃(x), else draw from p with S(x) removed
        removed = p.masked_fill(agg, 0.0)
        expected = torch.diag(p_tilde) + (1 - p_tilde)[:, None] * removed / removed.sum(-1, keepdim=True)
        finite = removed.sum(-1) > 0
        assert torch.allclose(laws[finite], expected[finite], atol=1e-12)
        bound = torch.full((V,), rule["delta"], dtype=p.dtype) if "delta" in rule else (rule["lam"] - 1) * p
        assert (tv(p[None], laws) <= bound + 1e-12).all()
        soft_q_one_hot = one_step_law(p, torch.eye(V, dtype=p.dtype)[3], nbrs, target="mixture", **rule)
        assert torch.allclose(soft_q_one_hot, laws[3], atol=1e-12)  # mixture = pointwise for one-hot q


def test_pointwise_target_with_soft_q_can_exceed_the_budget():
    """The documented counterexample: each draft spends its own δ, and the output drifts to q (TV 1/2)."""
    n = 6
    p = torch.full((2 * n,), 1 / (2 * n), dtype=torch.float64)
    q = torch.cat([torch.full((n,), 1 / n), torch.zeros(n)]).double()
    nbrs = torch.tensor([[n + i] for i in range(n)] + [[i] for i in range(n)])
    delta = 1 / (2 * n)
    pointwise = one_step_law(p, q, nbrs, delta=delta, target="pointwise")
    mixture = one_step_law(p, q, nbrs, delta=delta, target="mixture")
    assert torch.allclose(pointwise, q) and tv(p, pointwise) == pytest.approx(0.5)
    assert tv(p, mixture) <= delta + 1e-12


# -- sampling --------------------------------------------------------------------------------------

def sample_steps(p, q, nbrs, n, seed, **rule):
    """n independent steps at one position: x ~ q, then verify-or-resample. Returns the output tokens (n,)."""
    gen = torch.Generator().manual_seed(seed)
    P, Q = p.expand(n, -1), q.expand(n, -1)
    x = sample_from_uniform(Q, torch.rand(n, generator=gen, dtype=p.dtype))
    u, u2 = torch.rand(n, generator=gen, dtype=p.dtype), torch.rand(n, generator=gen, dtype=p.dtype)
    return lantern_step(P, Q, x, u, u2, nbrs, **rule)


def chi2_pvalue(tokens, law):
    """Chi-square goodness-of-fit p-value of the tokens' counts against law (V,); 0 if a token lies off its support."""
    counts = torch.bincount(tokens, minlength=law.numel()).double()
    support = law > 0
    if counts[~support].sum() > 0:
        return 0.0
    expected = law[support] / law[support].sum() * counts.sum()
    return float(chisquare(counts[support].numpy(), expected.numpy()).pvalue)


N_DRAWS = 200_000


def fixed_problem():
    gen = torch.Generator().manual_seed(5)
    p = random_dist(gen, (V,), zeros=0.25, peak=1.5)
    q = random_dist(gen, (V,), zeros=0.0, peak=1.5)
    return p, q, random_neighbours(gen, V, K)


@pytest.mark.parametrize("rule", [dict(delta=0.0, target="mixture"), dict(delta=0.15, target="mixture"),
                                  dict(lam=3.0, target="mixture"), dict(delta=0.15, target="pointwise")])
def test_sampled_steps_match_the_analytic_law(rule):
    p, q, nbrs = fixed_problem()
    law = one_step_law(p, q, nbrs, **rule)
    tokens, _ = sample_steps(p, q, nbrs, N_DRAWS, seed=6, **rule)
    assert chi2_pvalue(tokens, law) > 1e-3
    if rule.get("delta") == 0.0:
        assert torch.allclose(law, p, atol=1e-12)
    else:
        assert chi2_pvalue(tokens, p) < 1e-6  # the relaxed law differs detectably from p: the test has power


def test_negative_controls_are_caught_by_the_same_test():
    p, q, nbrs = fixed_problem()
    # Upstream's rejection at δ = 0: zero x and *all* k neighbours, renormalise (not just the aggregated set)
    gen = torch.Generator().manual_seed(8)
    x = sample_from_uniform(q.expand(N_DRAWS, -1), torch.rand(N_DRAWS, generator=gen, dtype=p.dtype))
    u, u2 = torch.rand(N_DRAWS, generator=gen, dtype=p.dtype), torch.rand(N_DRAWS, generator=gen, dtype=p.dtype)
    v = lantern_verify(p.expand(N_DRAWS, -1), q.expand(N_DRAWS, -1), x, u, nbrs, delta=0.0)
    upstream = (p - q).clamp(min=0).expand(N_DRAWS, -1).clone()
    upstream[torch.arange(N_DRAWS)[:, None], nbrs[x]] = 0.0
    upstream_tokens = torch.where(v.accept, x, sample_from_uniform(upstream, u2))
    ours = torch.where(v.accept, x, sample_from_uniform(v.residual, u2))  # the same draws, our residual
    assert chi2_pvalue(ours, p) > 1e-3
    assert chi2_pvalue(upstream_tokens, p) < 1e-6
    assert tv(p, one_step_law(p, q, nbrs, delta=0.0)) < 1e-12
    # an always-accept verifier outputs q
    assert chi2_pvalue(x, p) < 1e-6


# -- devices, input errors -------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(9)
    p, q = random_dist(gen, (3, 64, V)), random_dist(gen, (3, 64, V), zeros=0.0)  # float64: no cumsum-rounding ties
    x = sample_from_uniform(q, torch.rand(3, 64, generator=gen, dtype=torch.float64))
    u = torch.rand(3, 64, generator=gen, dtype=torch.float64)
    nbrs = random_neighbours(gen, V, K)
    for rule in (dict(delta=0.1), dict(lam=3.0, target="pointwise")):
        cpu = lantern_verify(p, q, x, u, nbrs, **rule)
        gpu = lantern_verify(p.cuda(), q.cuda(), x.cuda(), u.cuda(), nbrs.cuda(), **rule)
        assert torch.equal(cpu.aggregated, gpu.aggregated.cpu())
        assert torch.equal(cpu.accept, gpu.accept.cpu())
        assert torch.allclose(cpu.residual, gpu.residual.cpu(), atol=1e-12)


def test_bad_inputs_name_the_problem():
    p = torch.full((2, 4), 0.25)
    x = torch.zeros(2, dtype=torch.long)
    nbrs = torch.tensor([[1], [2], [3], [0]])
    with pytest.raises(ValueError, match="exactly one"):
        lantern_verify(p, p, x, torch.zeros(2), nbrs)
    with pytest.raises(ValueError, match="lam must be >= 1"):
        lantern_verify(p, p, x, torch.zeros(2), nbrs, lam=0.5)
    with pytest.raises(ValueError, match="delta must be >= 0"):
        lantern_verify(p, p, x, torch.zeros(2), nbrs, delta=-0.1)
    with pytest.raises(ValueError, match="V = p.shape"):
        lantern_verify(p, p, x, torch.zeros(2), nbrs[:3], delta=0.1)
    with pytest.raises(ValueError, match="target must be"):
        lantern_verify(p, p, x, torch.zeros(2), nbrs, delta=0.1, target="greedy")
    with pytest.raises(ValueError, match="its own neighbour list"):
        validate_neighbours(torch.tensor([[0], [2], [3], [0]]))
    with pytest.raises(ValueError, match="repeats"):
        validate_neighbours(torch.tensor([[1, 1], [2, 0], [3, 0], [0, 1]]))
    validate_neighbours(nbrs)
