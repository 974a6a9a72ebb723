

def test_relaxed_sequences_stay_within_the_composed_tv_bound():
    """δ = 0.05 (mixture target, sampled drafts): TV(output joint, target joint) <= L δ (+ sampling noise),
    while the relaxation does accept more than δ = 0."""
    model, head = toy()
    joint = analytic_joint(model, 1, SAMPLING)
    cond = torch.full((50_000,), 1)
    nbrs = torch.stack([torch.roll(torch.arange(V), -s) for s in range(1, V)], 1)
    delta = 0.05
    tokens, stats = speculative_generate(model, head, cond, SAMPLING, lantern_verifier(nbrs, V, {"delta": delta}), 2,
                                         torch.Generator().manual_seed(0))
    idx = (tokens * (V ** torch.arange(L - 1, -1, -1))).sum(-1)
    emp = torch.bincount(idx, minlength=len(joint)).double() / len(idx)
    tv = 0.5 * float((emp - joint / joint.sum()).abs().sum())
    assert tv <= L * delta + 0.02, tv
    _, exact = speculative_generate(model, head, cond, SAMPLING, lantern_verifier(nbrs, V, {"delta": 0.0}), 2,
                                    torch.Generator().manual_seed(0))
    assert stats["mean_accepted_length"] > exact["mean_accepted_length"]
