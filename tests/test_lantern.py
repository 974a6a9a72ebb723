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

from decoding.lantern import _tree, commit_path, lantern_verifier, speculative_generate, tree_step
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
    return torch.ones_like(x, dtype=torch.bool), p


SAMPLING = SamplingConfig(cfg_scale=2.0, temperature=1.0)


@pytest.mark.parametrize("tree,branching", [("chain", ()), pytest.param("static", (2, 2), marks=pytest.mark.slow)])
def test_delta_zero_is_exact_speculative_sampling(tree, branching):
    """10^5 sequences (one batch, per-row acceptance, CFG) follow the analytic joint; always-accept does not."""
    model, head = toy()
    joint = analytic_joint(model, 1, SAMPLING)
    cond = torch.full((100_000,), 1)
    nbrs = torch.stack([torch.roll(torch.arange(V), -s) for s in range(1, V)], 1)  # (V, V-1) all other codes
    exact = lantern_verifier(nbrs, V, {"delta": 0.0})
    tokens, stats = speculative_generate(model, head, cond, SAMPLING, exact, 2, torch.Generator().manual_seed(0),
                                         tree, branching)
    assert joint_pvalue(tokens, joint, V) > 1e-3
    assert 0 < sum(stats["accepted_lengths"]) < 2 * len(stats["accepted_lengths"])  # some accepted, some not
    broken, _ = speculative_generate(model, head, cond[:20_000], SAMPLING, always_accept, 2,
                                     torch.Generator().manual_seed(0), tree, branching)
    assert joint_pvalue(broken, joint, V) < 1e-6


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
    nodes, parent, ndepth = _tree(depth, "static", branching)
    N = len(nodes)
    cond = torch.tensor([0, 1, 2])
    prefix = torch.randint(0, 16, (B, 16))
    n = torch.tensor([0, 4, 9])  # rows at different lengths
    model.setup_cache(B, 16 + N + 3)
    model.prefill(cond, prefix[:, :9])
    model.rollback(n + 1)
    t0 = prefix[torch.arange(B), n]
    x = torch.randint(0, 16, (B, N))
    lg, _, _, slots = tree_step(model, n, t0, x, parent, ndepth)  # (B, N+1, V)

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
    """A draft head that predicts the target's true next feature (teacher-forced target forward)."""

    def __init__(self, labels):
        super().__init__()
        self.labels = labels

    def forward(self, target, features, tokens):  # (B', n, D), (B', n) -> (B', n, D): F[:, 1:n+1]
        """The true next feature, plus 10 x the error of the feature it was given (so the feature bookkeeping
        of the decoder, committed and drafted, must be right for the drafts to be accepted)."""
        _, h = target(torch.cat([tokens, tokens[:, -1:]], 1)[:, :target.block_size + 1], self.labels,
                      return_hidden=True)  # (B', min(n, L+1), D): h[:, i] = F[:, i]
        m = h.shape[1]
        nxt = torch.cat([h[:, 1:], h[:, -1:].expand(-1, tokens.shape[1] + 1 - m, -1)], 1)  # (B', n, D)
        return nxt + 10.0 * (features - torch.cat([h, h[:, -1:].expand(-1, tokens.shape[1] - m, -1)], 1))

    def logits(self, target, predicted):
        return target.head(predicted).float()


def test_relaxed_sequences_stay_within_the_composed_tv_bound():
    """δ = 0.05 (mixture target, sampled drafts): TV(output joint, target joint) <= L δ (+ sampling noise of
    2x10^4 sequences over 64 cells, about 0.02); always-accept breaks the bound."""
    model, head = toy()
    joint = analytic_joint(model, 1, SAMPLING)
    cond = torch.full((20_000,), 1)
    nbrs = torch.stack([torch.roll(torch.arange(V), -s) for s in range(1, V)], 1)
    delta = 0.05

    def tv_of(tokens):
        idx = (tokens * (V ** torch.arange(L - 1, -1, -1))).sum(-1)
        emp = torch.bincount(idx, minlength=len(joint)).double() / len(idx)
        return 0.5 * float((emp - joint / joint.sum()).abs().sum())

    tokens, _ = speculative_generate(model, head, cond, SAMPLING, lantern_verifier(nbrs, V, {"delta": delta}), 2,
                                         torch.Generator().manual_seed(0))
    assert tv_of(tokens) <= L * delta + 0.03, tv_of(tokens)
    broken, _ = speculative_generate(model, head, cond, SAMPLING, always_accept, 2, torch.Generator().manual_seed(0))
    assert tv_of(broken) > L * delta + 0.03, tv_of(broken)
