"""The sort-free sampler (decoding/sampling.py) against the full-sort implementation it replaced.

``ref_*`` below is a verbatim copy of the previous decoding/sampling.py filters and draw (full ``torch.sort``
for top-p, a vocabulary-order inverse CDF). The new code must keep the same tokens (identical kept sets,
the same kept logits, the same probabilities up to float32 rounding) on random logits of GPT and VAR shapes
after classifier-free guidance, including ties with the k-th value. The draw order changed (the new CDF
runs over the candidates sorted by logit, the old one over the vocabulary), so the same seed gives other
tokens: distribution equality is shown with chi-square tests instead, next to a negative control.

One deliberate difference: where tokens tie *at the top-p boundary*, the old code kept an arbitrary subset
of the tied tokens (whichever ``torch.sort``'s unstable order put first); the new code keeps or drops the
whole tie group, by the rule the old docstring stated ("the mass of the tokens ranked strictly above it
is < p"). ``test_ties_at_the_top_p_boundary`` checks that rule with an independent implementation.
"""
import pytest
import torch
from scipy import stats

from decoding.sampling import (cfg_split_combine, filter_logits, logits_to_probs, nucleus, sample_from_logits,
                               top_candidates)


# -- the previous implementation, kept as the reference ----------------------------------------

def ref_top_k_filter(logits, k):
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def ref_top_p_filter(logits, p):
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.float().softmax(-1)
    mass_before = probs.cumsum(-1) - probs
    remove_sorted = mass_before >= p
    remove_sorted[..., 0] = False
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def ref_filter_logits(logits, temperature=1.0, top_k=0, top_p=1.0):
    logits = logits.float()
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    return ref_top_p_filter(ref_top_k_filter(logits, top_k), top_p)


def ref_logits_to_probs(logits, temperature=1.0, top_k=0, top_p=1.0):
    return ref_filter_logits(logits, temperature, top_k, top_p).softmax(-1)


def ref_sample_from_logits(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """The previous draw (benchmarks/generators.py times it against the new one)."""
    if temperature <= 0 or top_k == 1:
        return logits.argmax(-1)
    probs = ref_logits_to_probs(logits, temperature, top_k, top_p)
    flat = probs.reshape(-1, probs.shape[-1])
    cdf = flat.cumsum(-1)
    u = torch.rand(flat.shape[0], 1, generator=generator, device=flat.device, dtype=cdf.dtype) * cdf[:, -1:]
    idx = torch.searchsorted(cdf, u, right=True).clamp_max(flat.shape[-1] - 1)
    idx = torch.where(flat.gather(1, idx) > 0, idx, (flat > 0).long().cumsum(-1).argmax(-1, keepdim=True))
    return idx.view(probs.shape[:-1])


# -- logits of the decoders' shapes, after guidance ---------------------------------------------

V = 4096


def gpt_logits(g, batch=16, scale=2.0):
    """GPT step: [cond; uncond] (2B, V) rows of one position -> guided (B, V)."""
    return cfg_split_combine(torch.randn(2 * batch, V, generator=g) * 3, scale)


def var_logits(g, batch=2, side=8, k=5, K=10, cfg=1.5):
    """VAR scale k: (2B, s^2, V) -> the ramped guidance (1 + t) cond - t uncond, (B, s^2, V)."""
    logits = torch.randn(2 * batch, side * side, V, generator=g) * 3
    t = cfg * k / (K - 1)
    return (1 + t) * logits[:batch] - t * logits[batch:]


SETTINGS = [(900, 0.96, 1.0), (50, 0.8, 0.7), (300, 1.0, 1.3), (0, 0.9, 1.0), (0, 0.3, 2.0), (0, 1.0, 1.0),
            (4095, 0.96, 1.0)]


@pytest.mark.parametrize("shape", ["gpt", "var"])
@pytest.mark.parametrize("top_k, top_p, temperature", SETTINGS)
def test_same_kept_sets_and_probabilities_as_the_full_sort(shape, top_k, top_p, temperature):
    g = torch.Generator().manual_seed(top_k + int(100 * top_p))
    logits = gpt_logits(g) if shape == "gpt" else var_logits(g)
    ref = ref_filter_logits(logits, temperature, top_k, top_p)
    new = filter_logits(logits, temperature, top_k, top_p)
    assert new.shape == ref.shape
    assert torch.equal(torch.isfinite(new), torch.isfinite(ref))  # identical kept sets
    assert torch.equal(new[torch.isfinite(new)], ref[torch.isfinite(ref)])  # the same kept logits
    p_ref = ref_logits_to_probs(logits, temperature, top_k, top_p)
    p_new = logits_to_probs(logits, temperature, top_k, top_p)
    assert torch.equal(p_new > 0, p_ref > 0)
    assert torch.allclose(p_new, p_ref, rtol=1e-5, atol=1e-9)
    assert torch.allclose(p_new.sum(-1), torch.ones(()), atol=1e-5)


def test_mixed_peaked_and_flat_rows_without_top_k():
    """Top-p alone: peaked rows end inside the first V/8 candidates, flat ones need the whole sort."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(64, V, generator=g)
    logits[::2] *= 12  # peaked: a short nucleus
    for p in (0.5, 0.9, 0.99):
        ref, new = ref_filter_logits(logits, top_p=p), filter_logits(logits, top_p=p)
        assert torch.equal(torch.isfinite(new), torch.isfinite(ref))
        counts = torch.isfinite(new).sum(-1)
        assert counts[::2].max() < V // 8 < counts[1::2].min()  # both paths were taken


def test_ties_with_the_kth_value_are_all_kept():
    # integer logits from a small range: every row has long runs of ties across the k-th position
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(-20, 20, (64, V), generator=g).float()
    for k in (1, 7, 900, 4000):
        ref, new = ref_filter_logits(logits, top_k=k), filter_logits(logits, top_k=k)
        assert torch.equal(torch.isfinite(new), torch.isfinite(ref))
        assert (torch.isfinite(new).sum(-1) > k).any() or k == 1
    # a float row where five values tie at the k-th place, two of them beyond the k+1 first candidates
    row = torch.randn(V, generator=g)
    ranked = row.argsort(descending=True)
    row[ranked[897:902]] = row[ranked[899]].item()
    kept = torch.isfinite(filter_logits(row, top_k=900))
    assert kept.sum() == 902 and torch.equal(kept, torch.isfinite(ref_filter_logits(row, top_k=900)))


def test_temperature_ties_are_ties():
    """Dividing by the temperature can merge neighbouring values: the k-th tie is judged after the division."""
    base = torch.tensor(1.0)
    row = torch.stack([base + i * torch.finfo(torch.float32).eps for i in range(8)]).flip(0)  # distinct
    row = torch.cat([row, -torch.rand(56, generator=torch.Generator().manual_seed(1))])
    for t in (1.0, 3.0, 7.0):
        for k in (2, 4, 6):
            ref, new = ref_filter_logits(row, t, top_k=k), filter_logits(row, t, top_k=k)
            assert torch.equal(torch.isfinite(new), torch.isfinite(ref)), (t, k)


def strictly_above_rule(logits, top_k, top_p):
    """Independent statement of the kept set: top-k (with ties), then keep iff mass of larger logits < p."""
    x = ref_top_k_filter(logits.float(), top_k)
    probs = x.softmax(-1)
    keep = torch.zeros_like(x, dtype=torch.bool)
    for r in range(x.shape[0]):
        values, counts = torch.unique(x[r], sorted=True, return_counts=True)  # ascending
        values, counts = values.flip(0), counts.flip(0)
        group_p = torch.stack([probs[r][x[r] == v][0] for v in values]) * counts  # mass per tie group
        above = torch.cumsum(group_p, 0) - group_p  # mass of strictly larger logits
        for v, a, i in zip(values, above, range(len(values))):
            if (a < top_p or i == 0) and torch.isfinite(v):
                keep[r] |= x[r] == v
    return keep


def test_ties_at_the_top_p_boundary():
    g = torch.Generator().manual_seed(5)
    logits = torch.randint(0, 6, (16, 40), generator=g).float()  # many ties, every boundary lands in a group
    for top_k, top_p in [(0, 0.5), (0, 0.9), (12, 0.7), (30, 0.95), (0, 0.0), (12, 0.0)]:  # p = 0: the top-1 run
        new = torch.isfinite(filter_logits(logits, top_k=top_k, top_p=top_p))
        assert torch.equal(new, strictly_above_rule(logits, top_k, top_p))
        # the old code kept a subset of the group the boundary fell into; never a token the rule drops
        old = torch.isfinite(ref_filter_logits(logits, top_k=top_k, top_p=top_p))
        assert not (old & ~new).any()


@pytest.mark.parametrize("block_rows", [None, 4])
def test_candidates_match_torch_topk(block_rows, monkeypatch):
    if block_rows:  # argpartition over several blocks of rows (the last one short)
        monkeypatch.setattr("decoding.sampling.PARTITION_BLOCK_BYTES", 8 * 500 * block_rows)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(33, 500, generator=g)
    for m in (1, 17, 499, 500):
        vals, idx = top_candidates(x, m)
        ref_vals, ref_idx = torch.topk(x, m, sorted=True)
        assert torch.equal(vals, ref_vals) and torch.equal(idx, ref_idx)
        assert torch.equal(x.gather(-1, idx), vals)


def test_nucleus_lists_only_what_it_needs():
    logits = torch.randn(8, V, generator=torch.Generator().manual_seed(4))
    vals, idx = nucleus(logits, top_k=900, top_p=0.96)
    assert vals.shape == idx.shape == (8, 901)  # k + 1, not V
    assert (vals[:, :-1] >= vals[:, 1:]).all()  # sorted, dropped ones (-inf) last


# -- the draw ----------------------------------------------------------------------------------

def chi2_pvalue(tokens, probs):
    """Goodness of fit of draws (n,) to probs (V,), bins with expected count >= 5 (the rest pooled)."""
    n = tokens.numel()
    observed = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() * n
    big = expected >= 5
    obs = torch.cat([observed[big], observed[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    if exp[-1] == 0:
        if obs[-1] > 0:
            return 0.0  # draws outside the support
        obs, exp = obs[:-1], exp[:-1]
    return stats.chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue


@pytest.mark.parametrize("top_k, top_p, temperature", [(40, 0.9, 1.0), (0, 0.8, 0.7), (25, 1.0, 1.5)])
def test_draws_follow_the_old_distribution(top_k, top_p, temperature):
    g = torch.Generator().manual_seed(11)
    row = torch.randn(64, generator=g) * 2
    n = 200_000
    tokens = sample_from_logits(row.expand(n, 64), temperature, top_k, top_p, torch.Generator().manual_seed(0))
    target = ref_logits_to_probs(row, temperature, top_k, top_p)
    assert set(tokens.unique().tolist()) <= set(torch.nonzero(target).flatten().tolist())
    assert chi2_pvalue(tokens, target) > 1e-4
    # negative control: the same draws against a slightly different distribution (temperature +30 %)
    wrong = ref_logits_to_probs(row, temperature * 1.3, top_k, top_p)
    assert chi2_pvalue(tokens, wrong) < 1e-8


def test_draws_per_row_follow_each_rows_distribution():
    """A VAR-shaped batch: every row keeps its own distribution (pooled chi-square over 32 rows)."""
    g = torch.Generator().manual_seed(12)
    rows = torch.randn(32, 64, generator=g) * 2
    reps = 8000
    tokens = sample_from_logits(rows.repeat(reps, 1).view(reps, 32, 64), 1.0, 30, 0.9,
                                torch.Generator().manual_seed(1))  # (reps, 32)
    target = ref_logits_to_probs(rows, 1.0, 30, 0.9)  # (32, V)
    assert (target.gather(-1, tokens.T) > 0).all()  # every draw inside its row's support
    pvalues = torch.tensor([chi2_pvalue(tokens[:, r], target[r]) for r in range(32)])
    assert stats.kstest(pvalues.numpy(), "uniform").pvalue > 1e-3  # calibrated p-values
    shifted = torch.tensor([chi2_pvalue(tokens[:, r], target[(r + 1) % 32]) for r in range(32)])
    assert (shifted < 1e-6).all()  # negative control: rows swapped


def test_the_old_draw_follows_the_same_distribution():
    """The reference draw itself passes the same chi-square test (so the test can tell the two apart only
    by distribution, and both agree)."""
    row = torch.randn(64, generator=torch.Generator().manual_seed(11)) * 2
    tokens = ref_sample_from_logits(row.expand(100_000, 64), 1.0, 40, 0.9, torch.Generator().manual_seed(0))
    assert chi2_pvalue(tokens, ref_logits_to_probs(row, 1.0, 40, 0.9)) > 1e-4


def test_seeded_draws_are_reproducible_and_inverse_cdf():
    """Same seed, same tokens; and the draw is the inverse CDF over the candidates in descending order."""
    logits = torch.randn(5, 9, 300, generator=torch.Generator().manual_seed(3))
    a = sample_from_logits(logits, 1.0, 50, 0.9, torch.Generator().manual_seed(7))
    b = sample_from_logits(logits, 1.0, 50, 0.9, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    u = torch.rand(45, 1, generator=torch.Generator().manual_seed(7))
    vals, idx = nucleus(logits, 1.0, 50, 0.9)  # kept candidates sorted by logit, dropped ones -inf
    cdf = vals.softmax(-1).cumsum(-1)
    expected = idx.gather(-1, (cdf <= u * cdf[:, -1:]).sum(-1, keepdim=True))
    # the sampler renormalises differently (u times the kept mass of the top-k list), equal up to rounding;
    # with these fixed seeds no draw sits on a rounding boundary
    assert torch.equal(a.flatten(), expected.flatten())


def test_a_uniform_rounding_onto_the_total_steps_back_onto_the_support(monkeypatch):
    """u = rand * total can round to the total: the draw must land on the last kept candidate, not a dropped one."""
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0, -2.0]])
    monkeypatch.setattr(torch, "rand", lambda *shape, **kw: torch.ones(*shape, dtype=kw.get("dtype")))
    token = sample_from_logits(logits, 1.0, 3, 1.0)  # kept {0, 1, 2}; u == total
    assert token.item() == 2


# -- the values-only draw (CPU, top-k on) against the draw over indexed candidates ----------------------

def indexed_draw(logits, temperature, top_k, top_p, generator):
    """The draw over (values, indices) candidates, the path sample_from_logits takes off the CPU."""
    import decoding.sampling
    saved, decoding.sampling.VALUES_ONLY_ON_CPU = decoding.sampling.VALUES_ONLY_ON_CPU, False
    try:
        return sample_from_logits(logits, temperature, top_k, top_p, generator)
    finally:
        decoding.sampling.VALUES_ONLY_ON_CPU = saved


def tied_logits(g, rows=256, v=300, levels=7):
    """Integer logits from a small range: long runs of equal values at every rank, k-th and top-p boundaries."""
    return torch.randint(0, levels, (rows, v), generator=g).float()


@pytest.mark.parametrize("block_rows", [None, 3])
@pytest.mark.parametrize("kind, top_k, top_p, temperature", [
    ("var", 900, 0.96, 1.0), ("gpt", 50, 0.8, 0.7), ("gpt", 300, 1.0, 1.3), ("var", 4095, 0.96, 1.0),
    ("tied", 40, 0.9, 1.0), ("tied", 7, 1.0, 1.0), ("tied", 100, 0.5, 3.0), ("tied", 299, 0.99, 1.0)])
def test_values_only_draw_gives_the_indexed_draws_tokens(kind, top_k, top_p, temperature, block_rows, monkeypatch):
    """Same seed, same tokens: the drawn logit's rank inside its run of equal values picks the same entry
    (runs sit in index order in the indexed list) -- the tied rows draw past the first entry of a run often."""
    if block_rows:  # partition and the index lookup over several blocks of rows (the last one short)
        monkeypatch.setattr("decoding.sampling.PARTITION_BLOCK_BYTES", 4 * V * block_rows)
    g = torch.Generator().manual_seed(top_k)
    logits = {"gpt": gpt_logits, "var": var_logits, "tied": tied_logits}[kind](g)
    for seed in range(3):
        new = sample_from_logits(logits, temperature, top_k, top_p, torch.Generator().manual_seed(seed))
        ref = indexed_draw(logits, temperature, top_k, top_p, torch.Generator().manual_seed(seed))
        assert new.shape == ref.shape == logits.shape[:-1]
        assert torch.equal(new, ref)


def test_values_only_draw_hits_later_entries_of_tied_runs():
    """The tied case above is not vacuous: many draws land past the first entry of their run of equal logits."""
    logits = tied_logits(torch.Generator().manual_seed(0))
    tokens = sample_from_logits(logits, 1.0, 40, 0.9, torch.Generator().manual_seed(0))
    drawn = logits.gather(-1, tokens[:, None])
    first = (logits == drawn).float().argmax(-1)
    assert (tokens != first).float().mean() > 0.5


def test_values_only_draw_with_temperature_ties():
    """Distinct logits that the temperature merges: the rank counts equal *unscaled* values, as the list orders them."""
    base = torch.tensor(1.0)
    row = torch.stack([base + i * torch.finfo(torch.float32).eps for i in range(8)]).flip(0)
    row = torch.cat([row, -torch.rand(56, generator=torch.Generator().manual_seed(1))]).expand(500, 64)
    for t in (1.0, 7.0):
        for k in (2, 6):
            a = sample_from_logits(row, t, k, 1.0, torch.Generator().manual_seed(3))
            b = indexed_draw(row, t, k, 1.0, torch.Generator().manual_seed(3))
            assert torch.equal(a, b), (t, k)


@pytest.mark.parametrize("p", [0.0, 0.3, 0.5, 0.9, 0.99])
def test_sampler_top_p_count_is_the_kept_prefix(p):
    """The sampler's kept-prefix length (one tie check at the boundary) equals the rule's kept set (every run)."""
    from decoding.sampling import _top_p_count, _top_p_keep
    logits = torch.randint(0, 6, (400, 40), generator=torch.Generator().manual_seed(int(100 * p))).float()
    vals = logits.sort(-1, descending=True).values  # long runs of ties, every boundary lands in one
    probs = vals.softmax(-1)
    keep = _top_p_keep(vals, probs, p)
    count = _top_p_count(vals, probs, probs.cumsum(-1), p)
    assert torch.equal(keep, torch.arange(40) < count)  # a prefix, of that length
    assert (keep.sum(-1) > (probs.cumsum(-1) - probs < p).sum(-1).clamp_min(1)).any()  # runs were made whole


def test_sampler_top_p_count_without_host_sync_branch(monkeypatch):
    """The branch the sampler takes off the CPU (every row's run end, no nonzero) gives the same counts."""
    from decoding import sampling
    logits = torch.randint(0, 6, (400, 40), generator=torch.Generator().manual_seed(9)).float()
    vals = logits.sort(-1, descending=True).values
    probs = vals.softmax(-1)
    cdf = probs.cumsum(-1)
    host = sampling._top_p_count(vals, probs, cdf, 0.7)

    class Meta(torch.Tensor):  # vals that report a non-CPU device, so the other branch runs on the CPU
        @property
        def device(self):
            return torch.device("meta")

    device_free = sampling._top_p_count(vals.as_subclass(Meta), probs, cdf, 0.7)
    assert torch.equal(host, device_free.as_subclass(torch.Tensor))
