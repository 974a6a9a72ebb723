"""decoding=lantern (draft-head speculative decoding, relaxed acceptance) and the EAGLE draft head.

Defining properties: with δ = 0 (or k = 0) the sampler is standard speculative sampling and its sequences
follow the target's analytic joint (chain and static tree, with CFG, batched); tree verification in one masked
forward equals running every branch on its own and the compacted cache equals a fresh prefill; the draft
head's loss goes down under AdamW.
"""
import itertools

import pytest
import torch
from scipy.stats import chi2

from decoding import lantern
from decoding.lantern import _tree, commit_path, lantern_verifier, speculative_generate, tree_step
from decoding.lantern_accept import sample_from_uniform
from decoding.sampling import SamplingConfig, cfg_split_combine, logits_to_probs
from generators.draft_head import DraftHead, drafter_loss
from generators.gpt import GPT

V, NC, L = 4, 3, 3


@pytest.fixture(autouse=True)
def _seed(one_thread):
    torch.manual_seed(0)


def toy(V=V, L=L, dim=8, scale=1.0, depth=1):
    """A toy GPT with peaky, position-dependent distributions and a random draft head."""
    model = GPT(V, NC, block_size=L, dim=dim, depth=depth, heads=2, grid_size=(1, L)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
        model.head.weight.normal_(0, scale, generator=g)
    return model, DraftHead.for_target(model).eval()


def analytic_joint(model, label: int, sampling: SamplingConfig) -> torch.Tensor:
    """p(x_0..x_{L-1} | label) for every sequence (V^L,) in itertools.product order, via teacher forcing."""
    seqs = torch.tensor(list(itertools.product(range(model.vocab_size), repeat=model.block_size)))  # (V^L, L)
    cond = torch.full((len(seqs),), label)
    guided = sampling.cfg_scale != 1.0
    with torch.no_grad():
        if guided:
            lg = model(seqs.repeat(2, 1), model.cls_embed.with_null(cond))
            lg = cfg_split_combine(lg, sampling.cfg_scale)
        else:
            lg = model(seqs, cond)
    probs = logits_to_probs(lg.double(), sampling.temperature)  # (V^L, L, V)
    return probs.gather(-1, seqs[..., None]).squeeze(-1).prod(-1)


def joint_pvalue(tokens: torch.Tensor, joint: torch.Tensor, V: int) -> float:
    idx = (tokens * (V ** torch.arange(tokens.shape[1] - 1, -1, -1))).sum(-1)
    counts = torch.bincount(idx, minlength=len(joint)).double()
    expected = joint.double() / joint.double().sum() * counts.sum()
    stat = float(((counts - expected) ** 2 / expected).sum())
    return float(chi2.sf(stat, len(joint) - 1))


def always_accept(p, q, x, u):
    """A broken verifier (negative control): keeps every draft, so the output follows the draft head."""
    return torch.ones_like(x, dtype=torch.bool), p, torch.zeros(x.shape)


SAMPLING = SamplingConfig(cfg_scale=2.0, temperature=1.0)


@pytest.mark.parametrize("tree,branching,draft", [("chain", (), "sample"), ("chain", (), "greedy"),
                                                  pytest.param("static", (2, 2), "sample", marks=pytest.mark.slow),
                                                  pytest.param("static", (2, 2), "greedy", marks=pytest.mark.slow)])
def test_delta_zero_is_exact_speculative_sampling(tree, branching, draft):
    """10^5 sequences (one batch, per-row acceptance, CFG) follow the analytic joint; always-accept does not.
    Greedy drafts (x = argmax q) are verified as q = 1; verifying them against the soft q they were not drawn
    from is biased (a second negative control)."""
    model, head = toy()
    joint = analytic_joint(model, 1, SAMPLING)
    cond = torch.full((100_000,), 1)
    nbrs = torch.stack([torch.roll(torch.arange(V), -s) for s in range(1, V)], 1)  # (V, V-1) all other codes
    greedy = draft == "greedy"
    exact = lantern_verifier(nbrs, V, {"delta": 0.0}, one_hot=greedy)
    tokens, stats = speculative_generate(model, head, cond, SAMPLING, exact, 2, torch.Generator().manual_seed(0),
                                         tree, branching, draft)
    assert joint_pvalue(tokens, joint, V) > 1e-3
    assert 0 < sum(stats["accepted_lengths"]) < 2 * len(stats["accepted_lengths"])  # some accepted, some not
    broken, _ = speculative_generate(model, head, cond[:20_000], SAMPLING, always_accept, 2,
                                     torch.Generator().manual_seed(0), tree, branching, draft)
    assert joint_pvalue(broken, joint, V) < 1e-6
    if greedy:
        soft = lantern_verifier(nbrs, V, {"delta": 0.0})  # min(1, p(x)/q(x)) for an x that was not drawn from q
        biased, _ = speculative_generate(model, head, cond, SAMPLING, soft, 2, torch.Generator().manual_seed(0),
                                         tree, branching, draft)
        assert joint_pvalue(biased, joint, V) < 1e-6


def test_delta_zero_equals_k_zero_and_relaxation_changes_tokens():
    """δ = 0 with neighbours and k = 0 draw the same tokens for one seed; δ > 0 accepts more."""
    model, head = toy(V=8, L=4)
    cond = torch.arange(NC).repeat(50)
    nbrs = torch.stack([torch.roll(torch.arange(8), -s) for s in range(1, 8)], 1)

    def run(verify):
        return speculative_generate(model, head, cond, SAMPLING, verify, 3, torch.Generator().manual_seed(3))

    a, sa = run(lantern_verifier(nbrs, 8, {"delta": 0.0}))
    b, _ = run(lantern_verifier(None, 8, {"delta": 0.5}))
    _, sc = run(lantern_verifier(nbrs, 8, {"delta": 0.5}))
    assert torch.equal(a, b)
    assert sc["mean_accepted_length"] > sa["mean_accepted_length"]


def test_tree_verification_equals_branches_and_cache_equals_prefill():
    """One masked forward over a static tree = each branch through the full forward (1e-5); after keeping a
    path at per-row lengths the cache equals a fresh prefill of the kept tokens."""
    model, _ = toy(V=16, L=16, dim=32, depth=2)
    B, depth, branching = 3, 3, (2, 2, 1)
    topo = _tree(depth, "static", branching)
    N, parent = topo.N, topo.parent
    cond = torch.tensor([0, 1, 2])
    prefix = torch.randint(0, 16, (B, 16))
    n = torch.tensor([0, 4, 9])  # rows at different lengths
    model.setup_cache(B, 16 + N + 3)
    model.prefill(cond, prefix[:, :9])
    model.rollback(n + 1)
    t0 = prefix[torch.arange(B), n]
    x = torch.randint(0, 16, (B, N))
    lg, _, _, slots = tree_step(model, n, t0, x, topo)  # (B, N+1, V)

    def branch(b, j):  # tokens of row b up to and including input j (0 = t0)
        chain = []
        while j > 0:
            chain.append(int(x[b, j - 1]))
            j = int(parent[j - 1]) + 1
        return torch.cat([prefix[b, :n[b] + 1], torch.tensor(chain[::-1], dtype=torch.long)])

    for b in range(B):
        for j in range(N + 1):
            seq = branch(b, j)
            full = model(torch.cat([seq, seq[-1:]])[None], cond[b:b + 1])  # (1, len+1, V): last predicts next
            torch.testing.assert_close(lg[b, j], full[0, len(seq)], atol=1e-5, rtol=1e-5)
    # keep a different path per row: row 0 the first branch to depth 3, row 1 the second child then stop, row 2 none
    path = torch.tensor([[0, 2, 6], [1, -1, -1], [-1, -1, -1]])
    keep = torch.tensor([3, 1, 0])
    commit_path(model, n, slots, path, keep)
    kept = [torch.cat([branch(b, int(path[b, keep[b] - 1]) + 1 if keep[b] else 0)]) for b in range(B)]
    for b in range(B):
        fresh = GPT(16, NC, block_size=16, dim=32, depth=2, heads=2, grid_size=(1, 16)).eval()
        fresh.load_state_dict(model.state_dict())
        fresh.setup_cache(1, 16 + N + 3)
        fresh.prefill(cond[b:b + 1], kept[b][None])
        m = len(kept[b]) + 1
        assert int(model.cache_lengths[b]) == m
        for blk, fblk in zip(model.blocks, fresh.blocks):
            torch.testing.assert_close(blk.attn.cache.kv[:, b, :, :m], fblk.attn.cache.kv[:, 0, :, :m],
                                       atol=1e-5, rtol=1e-5)
    model.free_cache()


def test_draft_head_training_lowers_the_loss():
    model, head = toy(V=16, L=16, dim=32, depth=2)
    for p in model.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    tokens, labels = torch.randint(0, 16, (16, 16)), torch.randint(0, NC, (16,))
    g = torch.Generator().manual_seed(0)
    losses, ces, feats = [], [], []
    for _ in range(30):
        loss, parts = drafter_loss(head, model, tokens, labels, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        ces.append(float(parts["ce"]))
        feats.append(float(parts["feature_loss"]))
    assert losses[-1] < 0.7 * losses[0]
    assert ces[-1] < ces[0] and feats[-1] < 0.9 * feats[0]  # both terms, each against the target
    # the parts are the EAGLE terms: SmoothL1 to the next feature, CE to the target's own next-token distribution
    with torch.no_grad():
        _, parts = drafter_loss(head, model, tokens, labels, noise_std=0.0, null_prob=0.0)
        _, F_ = model(tokens, labels, return_hidden=True)
        pred = head(model, F_[:, :-1], tokens[:, :-1])
        ce = -(model.head(F_[:, 1:]).softmax(-1) * model.head(pred).log_softmax(-1)).sum(-1).mean()
        assert torch.allclose(parts["ce"], ce, atol=1e-5)
        assert torch.allclose(parts["feature_loss"], torch.nn.functional.smooth_l1_loss(pred, F_[:, 1:]), atol=1e-6)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("tree,branching", [("chain", ()), ("static", (3, 2, 1))])
def test_greedy_equals_greedy_ar_with_fewer_forwards(tree, branching):
    """Temperature 0, δ = 0: the same tokens as the reference sampler at every row length (CFG, batch 6); with an
    oracle draft head (the target's own features) every draft is accepted: the drafts are aligned."""
    model, head = toy(V=16, L=16, dim=32, depth=2)
    greedy = SamplingConfig(cfg_scale=2.0, temperature=0.0)
    cond = torch.arange(NC).repeat(2)
    ref = model.sample(cond, greedy)
    got, stats = speculative_generate(model, head, cond, greedy, lantern_verifier(None, 16, {"delta": 0.0}), 3,
                                      None, tree, branching)
    assert torch.equal(got, ref)
    assert stats["target_forwards"] <= 16
    oracle = Oracle(model.cls_embed.with_null(cond))
    got, stats = speculative_generate(model, oracle, cond, greedy, lantern_verifier(None, 16, {"delta": 0.0}), 3,
                                      None, tree, branching)
    assert torch.equal(got, ref)
    assert stats["target_forwards"] == 5 and set(stats["accepted_lengths"][:-1]) == {3}  # 1 + 4 x (3 + 1) tokens


class Oracle(torch.nn.Module):
    """A draft head that predicts the target's true next feature (teacher-forced target forward), with the
    draft head's cached interface (its "cache" keeps the tokens written at each slot)."""

    def __init__(self, labels):
        super().__init__()
        self.labels = labels

    def setup_cache(self, batch_size, max_len, device=None):
        self.buf = torch.zeros(batch_size, max_len, dtype=torch.long)
        self.cache_lengths = torch.zeros(batch_size, dtype=torch.long)

    def rollback(self, lengths):
        self.cache_lengths.copy_(lengths)

    def free_cache(self):
        self.buf = None

    def step(self, target, features, tokens, positions, slots, mask=None):  # (B', n, D), (B', n) x3 -> (B', n, D)
        """The true next feature of each input's history (the tokens at the slots it may see, in slot order), plus
        10 x the error of the feature it was given (so the feature bookkeeping of the decoder, committed and
        drafted, must be right for the drafts to be accepted)."""
        self.buf.scatter_(1, slots, tokens)
        T, L = self.buf.shape[1], target.block_size
        vis = torch.arange(T)[None, None] <= positions[..., None] if mask is None else mask  # (B', n, T)
        out = torch.zeros_like(features)
        for b in range(features.shape[0]):
            for i in range(features.shape[1]):
                seq = self.buf[b][vis[b, i]][:L]  # tokens 0..p
                _, h = target(torch.cat([seq, seq[-1:]])[None], self.labels[b:b + 1], return_hidden=True)
                p = len(seq) - 1  # h[0, j] = F[:, j], j <= p + 1
                out[b, i] = h[0, p + 1] + 10.0 * (features[b, i] - h[0, p])
        return out

    def logits(self, target, predicted):
        return target.head(predicted).float()


def draft_uncached(model, drafter, feats, tokens, n, topo, B, R, sampling, guided, generator, greedy=False):
    """The reference drafter: the head over each node's whole history (per-path copies), no cache."""
    parent, node_depth = torch.tensor(topo.parent), torch.tensor(topo.node_depth)
    N, L, Bp = parent.shape[0], model.block_size, feats.shape[0]
    x = torch.zeros(B, N, dtype=torch.long)
    q = torch.zeros(B, N, model.vocab_size)
    hist = {-1: (feats[:, :L + 1].clone(), tokens[:, :L + 1].clone())}  # F[:, i], token i for i <= L
    ar = torch.arange(Bp)
    for d in range(1, int(node_depth.max()) + 1):
        for par in sorted({int(parent[j]) for j in range(N) if int(node_depth[j]) == d}):
            f, t = hist[par]
            pred = drafter(model, f, t[:, :f.shape[1]].repeat(R, 1))  # (B', L+1, D) predicts F[:, i+1]
            fe = pred[ar, (n + d - 1).clamp(max=L).repeat(R)]  # (B', D) predicted feature of token n + d
            left = lantern._probs(drafter.logits(model, fe), B, sampling, guided).clone()  # (B, V)
            for j in [j for j in range(N) if int(parent[j]) == par]:
                qj = left / left.sum(-1, keepdim=True).clamp(min=1e-30)
                xj = qj.argmax(-1) if greedy else sample_from_uniform(qj, torch.rand(B, generator=generator))
                x[:, j], q[:, j] = xj, qj
                left = left.scatter(-1, xj[:, None], 0.0)
                f2, t2 = f.clone(), t.clone()
                f2[ar, (n + d).clamp(max=L).repeat(R)] = fe
                t2[torch.arange(B), (n + d).clamp(max=L)] = xj
                hist[j] = (f2, t2)
    return x, q


def coin(p, q, x, u):
    """A verifier that keeps a draft with probability 0.6 whatever it is: every accepted length occurs."""
    return u < 0.6, p, torch.zeros(x.shape)


@pytest.mark.parametrize("tree,branching", [("chain", ()), ("static", (2, 2, 1))])
def test_cached_drafting_equals_uncached(tree, branching, monkeypatch):
    """Every drafting call of a generation (CFG, batch 6, per-row rollbacks of every length) gives the same drafts
    and draft distributions (1e-5) over the head's KV cache as the head run over the whole history; the same seed
    gives the same tokens with either drafter."""
    model, head = toy(V=16, L=16, dim=32, depth=2)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.3 * torch.randn(p.shape))
    model, head = model.double(), head.double()  # float64 features: 1e-5 separates a bug from rounding
    cond = torch.arange(NC).repeat(2)
    cached, calls = lantern._draft, []

    def both(model, drafter, feats, tokens, n, topo, B, R, sampling, guided, generator, greedy=False):
        state = generator.get_state()
        x, q = cached(model, drafter, feats, tokens, n, topo, B, R, sampling, guided, generator, greedy)
        after = generator.get_state()
        generator.set_state(state)
        xr, qr = draft_uncached(model, drafter, feats, tokens, n, topo, B, R, sampling, guided, generator, greedy)
        assert torch.equal(generator.get_state(), after)
        valid = (n[:, None] + torch.tensor(topo.node_depth)[None] <= L_ - 1)  # (B, N) nodes inside the image
        assert torch.equal(x[valid], xr[valid])
        torch.testing.assert_close(q[valid], qr[valid], atol=1e-5, rtol=1e-5)
        calls.append(int(valid.sum()))
        return x, q

    L_ = model.block_size
    monkeypatch.setattr(lantern, "_draft", both)
    got, stats = speculative_generate(model, head, cond, SAMPLING, coin, 3, torch.Generator().manual_seed(0), tree,
                                      branching)
    assert len(calls) >= 4 and sum(calls) > 40
    assert set(stats["accepted_lengths"]) == {0, 1, 2, 3}  # every rollback length was exercised
    monkeypatch.setattr(lantern, "_draft", cached)
    again, _ = speculative_generate(model, head, cond, SAMPLING, coin, 3, torch.Generator().manual_seed(0), tree,
                                    branching)
    monkeypatch.setattr(lantern, "_draft", draft_uncached)
    ref, _ = speculative_generate(model, head, cond, SAMPLING, coin, 3, torch.Generator().manual_seed(0), tree,
                                  branching)
    assert torch.equal(got, again) and torch.equal(got, ref)


@pytest.mark.parametrize("draft,target", [("sample", "mixture"), ("greedy", "pointwise")])
def test_relaxed_sequences_stay_within_the_composed_tv_bound(draft, target):
    """δ = 0.05 (mixture target for sampled drafts; LANTERN's pointwise rule for greedy drafts verified as q = 1):
    TV(output joint, target joint) <= L δ (+ sampling noise of 2x10^4 sequences over 64 cells, about 0.02);
    always-accept breaks the bound."""
    model, head = toy()
    joint = analytic_joint(model, 1, SAMPLING)
    cond = torch.full((20_000,), 1)
    nbrs = torch.stack([torch.roll(torch.arange(V), -s) for s in range(1, V)], 1)
    delta = 0.05

    def tv_of(tokens):
        idx = (tokens * (V ** torch.arange(L - 1, -1, -1))).sum(-1)
        emp = torch.bincount(idx, minlength=len(joint)).double() / len(idx)
        return 0.5 * float((emp - joint / joint.sum()).abs().sum())

    greedy = draft == "greedy"

    def verifier(d):
        return lantern_verifier(nbrs, V, {"delta": d}, target, one_hot=greedy)

    tokens, stats = speculative_generate(model, head, cond, SAMPLING, verifier(delta), 2,
                                         torch.Generator().manual_seed(0), draft=draft)
    assert tv_of(tokens) <= L * delta + 0.03, tv_of(tokens)
    # the measured TV budget: within δ per verified position, its sum within L δ and above the joint's TV
    assert 0 < stats["tv_per_position"] <= delta + 1e-9
    assert 0 < stats["tv_composed"] <= stats["verified_positions"] * delta + 1e-9 <= L * delta + 1e-9
    assert tv_of(tokens) <= stats["tv_composed"] + 0.03
    _, exact = speculative_generate(model, head, cond, SAMPLING, verifier(0.0), 2, torch.Generator().manual_seed(0),
                                    draft=draft)
    assert exact["tv_composed"] == 0 and exact["verified_positions"] > 1
    if greedy:  # one-hot verification: the relaxation accepts p̃(x) >= p(x), so more drafts are kept
        assert stats["mean_accepted_length"] > exact["mean_accepted_length"]
    broken, _ = speculative_generate(model, head, cond, SAMPLING, always_accept, 2, torch.Generator().manual_seed(0),
                                     draft=draft)
    assert tv_of(broken) > L * delta + 0.03, tv_of(broken)


def test_the_tv_budget_sums_the_verified_positions():
    """With a verifier whose per-position TV is 1, the composed budget of a row counts its verified positions:
    per iteration the kept drafts plus the first rejection inside the image (counted here from the accepted
    lengths); the lantern verifier's TV is TV(p, relaxed target)."""
    from decoding.lantern_accept import lantern_verify

    model, head = toy(V=16, L=16, dim=32, depth=2)

    def unit(p, q, x, u):
        return u < 0.6, p, torch.ones(x.shape)

    for seed in range(4):
        _, stats = speculative_generate(model, head, torch.tensor([seed % NC]), SAMPLING, unit, 3,
                                        torch.Generator().manual_seed(seed))
        n, count = 0, 0
        for keep in stats["accepted_lengths"]:
            count += keep + int(keep < min(3, 16 - 1 - n))
            n += 1 + keep
        assert stats["tv_composed"] == count, (stats["tv_composed"], count)
    p, q = torch.rand(5, 16).softmax(-1), torch.rand(5, 16).softmax(-1)
    x, u = torch.randint(0, 16, (5,)), torch.rand(5)
    nbrs = torch.stack([torch.roll(torch.arange(16), -s) for s in range(1, 6)], 1)
    _, _, tv = lantern_verifier(nbrs, 16, {"delta": 0.2})(p, q, x, u)
    want = 0.5 * (lantern_verify(p, q, x, u, nbrs, delta=0.2).target - p).abs().sum(-1)
    torch.testing.assert_close(tv, want)
    assert float(want.max()) > 0


def test_settings_name_the_bad_value():
    from decoding.lantern import LanternSettings

    for bad, match in [({"draft": "beam"}, "decoding.draft='beam'; choose one of sample, greedy"),
                       ({"tree": "dynamic"}, "decoding.tree='dynamic'; choose one of chain, static"),
                       ({"target": "exact"}, "decoding.target='exact'; choose one of mixture, pointwise")]:
        with pytest.raises(ValueError, match=match):
            LanternSettings(**bad)


@pytest.mark.parametrize("tree,branching", [("chain", ()), ("static", (2, 2, 1))])
def test_greedy_drafts_are_the_most_likely_codes(tree, branching, monkeypatch):
    """draft=greedy: every node is the most likely code its parent's draft distribution has left (first child:
    argmax q; later siblings: argmax of q without the earlier siblings)."""
    model, head = toy(V=16, L=16, dim=32, depth=2)
    drafted = []
    draft = lantern._draft

    def record(*args):
        x, q = draft(*args)
        drafted.append((x, q))
        return x, q

    monkeypatch.setattr(lantern, "_draft", record)
    speculative_generate(model, head, torch.arange(NC).repeat(2), SAMPLING, coin, 3, torch.Generator().manual_seed(0),
                         tree, branching, "greedy")
    assert drafted
    for x, q in drafted:  # q[:, j] is what was left when node j was drafted
        assert torch.equal(x, q.argmax(-1))
