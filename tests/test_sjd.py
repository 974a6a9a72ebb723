"""Speculative Jacobi decoding (decoding/sjd.py on decoding/speculative.py) on its defining properties.

1. Exactness: the joint of sjd samples equals the model's analytic joint (every sequence enumerated with full
   forwards), for every init scheme and coupling, with CFG (and cfg_interval), top-k and top-p, at batch > 1;
   an always-accept verifier is detected (negative control).
2. Greedy sjd = greedy ar token for token, for any window and init, with no more forward passes.
3. window = 1 is plain AR.
4. Rows are independent: with one shared torch.Generator every random draw has a shape fixed by the batch
   size, and row b always takes element b, so a row's tokens are a function of (seed, its index, its label):
   changing the other rows' labels changes nothing in it.
5. After a rejection the cache of every row equals a fresh prefill of its accepted prefix.
"""
import copy
import itertools

import pytest
import torch
from scipy.stats import chi2

from decoding.registry import available, get_decoder
from decoding.sampling import SamplingConfig, cfg_split_combine, logits_to_probs
from decoding.sjd import COUPLINGS, INITS, JacobiDrafter, SjdSettings
from decoding.speculative import SpeculativeLoop, SpeculativeSampling
from generators.gpt import GPT

V, NC = 8, 3
SAMPLING = SamplingConfig(cfg_scale=1.5, temperature=1.0, top_k=6, top_p=0.95, cfg_interval=3)
NUM = 100_000  # sequences per distribution test


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_gpt(grid=(2, 2), vocab=V, scale=1.0, seed=0) -> GPT:
    """A GPT with random, non-degenerate weights (the trained init has a zero head)."""
    model = GPT(vocab, NC, block_size=grid[0] * grid[1], grid_size=grid, dim=8, depth=1, heads=1, mlp_ratio=2.0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


def analytic_joint(model: GPT, label: int, sampling: SamplingConfig) -> torch.Tensor:
    """P(sequence | label) of decoding=ar for every sequence (V^N,), by full forwards (no cache, no sjd code)."""
    N = model.num_tokens
    seqs = torch.tensor(list(itertools.product(range(V), repeat=N)))  # (V^N, N), index = base-V number
    with torch.no_grad():
        logits = torch.cat([model(seqs, torch.full((len(seqs),), label)),
                            model(seqs, torch.full((len(seqs),), NC))])  # [cond; uncond] (2S, N, V)
    guided = cfg_split_combine(logits, sampling.cfg_scale)
    if sampling.cfg_interval >= 0:
        guided[:, sampling.cfg_interval:] = logits[:len(seqs), sampling.cfg_interval:]
    probs = logits_to_probs(guided, sampling.temperature, sampling.top_k, sampling.top_p)  # (S, N, V)
    return probs.gather(-1, seqs[..., None])[..., 0].double().prod(-1)


@pytest.fixture(scope="module")
def joint_model():
    model = tiny_gpt()
    return model, {c: analytic_joint(model, c, SAMPLING) for c in (0, 2)}


def chi_square_p(tokens: torch.Tensor, labels: torch.Tensor, joints: dict) -> float:
    """p-value of a chi-square test of the sampled sequences against the analytic joints (cells with an
    expected count < 5 pooled), summed over the labels."""
    stat, dof = 0.0, 0
    code = (tokens * V ** torch.arange(tokens.shape[1] - 1, -1, -1)).sum(1)  # base-V index
    for c, joint in joints.items():
        counts = torch.bincount(code[labels == c], minlength=len(joint)).double()
        expected = joint * counts.sum()
        big = expected >= 5
        obs = torch.cat([counts[big], counts[~big].sum()[None]])
        exp = torch.cat([expected[big], expected[~big].sum()[None]])
        keep = exp > 0
        stat += float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
        dof += int(keep.sum()) - 1
    return float(chi2.sf(stat, dof))


def sample_sjd(model, settings: dict, seed=0, rule=None, num=NUM) -> tuple[torch.Tensor, torch.Tensor]:
    """num sequences, labels alternating 0 / 2 in one batch -> (tokens (num, N), labels)."""
    labels = torch.tensor([0, 2]).repeat(num // 2)
    g = torch.Generator().manual_seed(seed)
    s = SjdSettings(**settings)
    with torch.no_grad():
        loop = SpeculativeLoop(model, labels, SAMPLING, g, s.window, JacobiDrafter(s.init, s.draft_coupling), rule)
        tokens, _ = loop.run()
    return tokens, labels


FAST = [("sample_horizon", "gumbel"), ("repeat_vertical", "maximal")]  # the rest: make test-all (~30 s each)
ALL = [pytest.param(i, c, marks=() if (i, c) in FAST else pytest.mark.slow) for i in INITS for c in COUPLINGS]


@pytest.mark.parametrize("init,coupling", ALL)
def test_sjd_samples_the_analytic_joint(joint_model, init, coupling):
    model, joints = joint_model
    tokens, labels = sample_sjd(model, {"window": 3, "init": init, "draft_coupling": coupling})
    assert chi_square_p(tokens, labels, joints) > 1e-3


@pytest.mark.parametrize("window", [1, pytest.param(2, marks=pytest.mark.slow), pytest.param(4, marks=pytest.mark.slow)])
def test_sjd_samples_the_analytic_joint_at_other_windows(joint_model, window):
    model, joints = joint_model
    tokens, labels = sample_sjd(model, {"window": window, "init": "repeat_horizon", "draft_coupling": "gumbel"})
    assert chi_square_p(tokens, labels, joints) > 1e-3


class AlwaysAccept(SpeculativeSampling):
    """A broken verifier: every draft is accepted."""

    def accept(self, p, q, drafts, generator):
        return torch.ones_like(drafts, dtype=torch.bool)


def test_negative_control_an_always_accept_verifier_is_detected(joint_model):
    model, joints = joint_model
    tokens, labels = sample_sjd(model, {"window": 3, "init": "random"}, rule=AlwaysAccept(), num=20_000)
    assert chi_square_p(tokens, labels, joints) < 1e-6


# -- 2, 3: greedy and window 1 ---------------------------------------------------------------------
GREEDY = SamplingConfig(cfg_scale=2.0, temperature=0.0)


@pytest.mark.parametrize("init", INITS)
def test_greedy_sjd_equals_greedy_ar_with_no_more_forwards(init):
    model = tiny_gpt(grid=(4, 4), vocab=16, scale=0.5)
    cond = torch.tensor([0, 1, 2, 0, 1, 2])
    ar, ar_stats = get_decoder("ar").run(model, cond, GREEDY, torch.Generator().manual_seed(0))
    for window in (1, 2, 3, 5, 16):
        for coupling in COUPLINGS:
            tokens, stats = get_decoder("sjd").run(model, cond, GREEDY, torch.Generator().manual_seed(1), None,
                                                   {"window": window, "init": init, "draft_coupling": coupling})
            assert torch.equal(tokens, ar), (window, coupling)
            assert stats["forward_passes"] <= ar_stats["forward_passes"] == 16
            if window == 1:  # plain AR: one token per forward
                assert stats["forward_passes"] == 16 and stats["mean_accepted_length"] == 1.0


def test_window_one_is_plain_ar_when_sampling():
    """window 1 runs ar's schedule: one forward per token. (Its distribution is ar's: the window-1 joint test; the
    draws are not ar's draw for draw, since ar's sampler walks its top-k candidates in logit order.)"""
    model = tiny_gpt(grid=(4, 4), vocab=16, scale=0.5)
    cond = torch.tensor([0, 1, 2, 2])
    s = SamplingConfig(cfg_scale=1.5, top_k=10, top_p=0.9)
    ar, _ = get_decoder("ar").run(model, cond, s, torch.Generator().manual_seed(3))
    sjd, stats = get_decoder("sjd").run(model, cond, s, torch.Generator().manual_seed(3), None, {"window": 1})
    assert sjd.shape == ar.shape and stats["forward_passes"] == 16


# -- 4: row independence -----------------------------------------------------------------------------
@pytest.mark.parametrize("coupling", COUPLINGS)
def test_rows_do_not_depend_on_the_other_rows_labels(coupling):
    model = tiny_gpt(grid=(4, 4), vocab=16, scale=0.5)
    s = SamplingConfig(cfg_scale=2.0)
    settings = {"window": 5, "init": "repeat_vertical", "draft_coupling": coupling}
    a, _ = get_decoder("sjd").run(model, torch.tensor([0, 1, 2, 1]), s, torch.Generator().manual_seed(7), None, settings)
    b, _ = get_decoder("sjd").run(model, torch.tensor([2, 1, 0, 0]), s, torch.Generator().manual_seed(7), None, settings)
    assert torch.equal(a[1], b[1])  # row 1 kept its label; every other row changed
    assert not torch.equal(a[0], b[0])  # (the labels do matter)


# -- 5: the cache after rejections ----------------------------------------------------------------
def test_cache_after_a_rejection_equals_a_fresh_prefill_of_the_accepted_prefix():
    model = tiny_gpt(grid=(4, 4), vocab=16, scale=0.5)
    cond = torch.tensor([0, 1, 2, 1])
    s = SamplingConfig(cfg_scale=2.0)
    loop = SpeculativeLoop(model, cond, s, torch.Generator().manual_seed(0), 6, JacobiDrafter("repeat_horizon"))
    ref = copy.deepcopy(model)
    with torch.no_grad():
        loop.start()
        rejected = False
        for _ in range(3):
            r = loop.step()
            rejected |= bool((r.accepted < loop.L - 1).any())
            n = loop.both(loop.n)  # (B',) slots each model row keeps
            cached = [blk.attn.cache.kv for blk in model.blocks]
            for b in range(loop.labels.shape[0]):
                fresh = fresh_cache(ref, loop.labels[b:b + 1], loop.canvas[b % loop.B, :n[b] - 1][None])
                for layer, kv in enumerate(fresh):
                    assert torch.allclose(cached[layer][:, b, :, :n[b]], kv[:, 0, :, :n[b]], atol=1e-5)
        assert rejected
        model.free_cache()


def fresh_cache(ref: GPT, label: torch.Tensor, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's K/V after a fresh prefill of [label, tokens] on a separate copy of the model."""
    ref.setup_cache(1)
    ref.prefill(label, tokens)
    return [blk.attn.cache.kv for blk in ref.blocks]


# -- settings and routing ---------------------------------------------------------------------------
def test_settings_are_validated():
    assert "sjd" in available()
    dec = get_decoder("sjd")
    assert dec.applies_to == ("gpt",)
    assert dec.parse_settings({"name": "sjd"}) == SjdSettings(16, "random", "none", False)
    with pytest.raises(ValueError, match="decoding.init='diagonal' is not an init scheme; choose one of random"):
        dec.parse_settings({"init": "diagonal"})
    with pytest.raises(ValueError, match="draft_coupling='max' is not a coupling"):
        dec.parse_settings({"draft_coupling": "max"})
    with pytest.raises(ValueError, match="window must be an integer >= 1"):
        dec.parse_settings({"window": 0})
    with pytest.raises(ValueError, match="unknown decoding.windows for decoding=sjd"):
        dec.parse_settings({"windows": 8})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.compile of the window is tested on CUDA")
def test_compiled_window_gives_the_same_greedy_tokens_on_cuda():
    model = tiny_gpt(grid=(4, 4), vocab=16, scale=0.5).cuda()
    cond = torch.tensor([0, 1, 2], device="cuda")
    ar, _ = get_decoder("ar").run(model, cond, GREEDY, None)
    tokens, _ = get_decoder("sjd").run(model, cond, GREEDY, None, None, {"window": 5, "compile": True})
    assert torch.equal(tokens, ar)


# -- sample.py: stats, compare_ar, and the refusal on other generators -----------------------------
@pytest.fixture(scope="module")
def tok_runs(tmp_path_factory) -> dict:
    from tests.test_generator_training import make_tokenizer_run

    root = tmp_path_factory.mktemp("tokenizers")
    return {kind: make_tokenizer_run(root / kind, kind) for kind in ("fsq", "msvq")}


def test_sample_py_runs_sjd_with_its_stats_and_compare_ar(tok_runs, tmp_path):
    import json

    from sample import run
    from tests.conftest import compose_config
    from tests.test_generator_training import gen_overrides
    from train import train

    train(compose_config("train", gen_overrides("gpt", tok_runs["fsq"], tmp_path / "data"), tmp_path / "gen"))
    scfg = compose_config("sample", [f"ckpt={tmp_path / 'gen'}", "samples_per_class=2", "classes=[1,3]",
                                     "decoding=sjd", "decoding.window=4", "decoding.draft_coupling=gumbel",
                                     "compare_ar=true"], tmp_path / "sample")
    result = run(scfg, tmp_path / "sample")
    saved = json.loads((tmp_path / "sample" / "metrics.json").read_text())
    assert saved["decoding"] == "sjd" and saved["decoding_settings"] == {
        "window": 4, "init": "random", "draft_coupling": "gumbel", "compile": False, "relax": "none", "delta": None,
        "lam": None, "k": 1000}
    speed = result["speed"]
    assert speed["step_compression"] == 16 / speed["forward_passes_per_image"] >= 1
    assert 1 <= speed["decoding_stats"]["mean_accepted_length"] <= 4
    assert speed["latency_ratio_vs_ar"] > 0 and speed["ar_generate_seconds"] > 0


def test_sample_py_refuses_sjd_on_a_var_run(tok_runs, tmp_path):
    from sample import run
    from tests.conftest import compose_config
    from tests.test_generator_training import gen_overrides
    from train import train

    train(compose_config("train", gen_overrides("var", tok_runs["msvq"], tmp_path / "data") + [
        "trainer.max_steps=1"], tmp_path / "gen"))
    scfg = compose_config("sample", [f"ckpt={tmp_path / 'gen'}", "decoding=sjd"], tmp_path / "sample")
    with pytest.raises(ValueError, match=r"decoding=sjd applies to gpt generators, not to this var run; "
                                         r"decoders for var: ar"):
        run(scfg, tmp_path / "sample")


# -- relaxed acceptance (LANTERN's rule on SJD's self-drafts: decoding.relax=lantern) ------------------
def ring_neighbours(k: int) -> torch.Tensor:
    """(V, k): code v's neighbours v+1, v+2, ... (mod V)."""
    return torch.stack([(torch.arange(V) + s) % V for s in range(1, k + 1)], 1) if k else torch.zeros(V, 0).long()


def run_rule(model, rule, num, seed=0, window=3):
    labels = torch.tensor([0, 2]).repeat(num // 2)
    with torch.no_grad():
        loop = SpeculativeLoop(model, labels, SAMPLING, torch.Generator().manual_seed(seed), window,
                               JacobiDrafter("random", "none"), rule)
        tokens, stats = loop.run()
    return tokens, labels, stats


def joint_tv(tokens, labels, joints) -> float:
    """The largest over labels of TV(empirical joint of the sequences, analytic joint)."""
    code = (tokens * V ** torch.arange(tokens.shape[1] - 1, -1, -1)).sum(1)
    tvs = []
    for c, joint in joints.items():
        emp = torch.bincount(code[labels == c], minlength=len(joint)).double()
        tvs.append(0.5 * float((emp / emp.sum() - joint / joint.sum()).abs().sum()))
    return max(tvs)


@pytest.mark.parametrize("k,delta", [(3, 0.0), (0, 0.3)])
def test_relaxation_at_delta_zero_or_k_zero_is_exact_sjd(joint_model, k, delta):
    from decoding.lantern_accept import RelaxedSpeculativeSampling

    model, _ = joint_model
    exact, _, _ = run_rule(model, None, 4000, seed=5)
    relaxed, _, _ = run_rule(model, RelaxedSpeculativeSampling(ring_neighbours(k), delta=delta), 4000, seed=5)
    assert torch.equal(exact, relaxed)


def test_relaxed_sjd_stays_within_the_composed_tv_bound_and_accepts_more(joint_model):
    """δ = 0.05 per token, 4 tokens: TV(output joint, ar's joint) <= 4 δ (+ sampling noise); an always-accept
    rule (the negative control) is far outside it. A larger δ accepts more drafts than exact SJD (measured on this
    toy model: mean accepted length 1.197 exact, 1.230 at δ = 0.4, k = 3 — soft Jacobi drafts gain little)."""
    from decoding.lantern_accept import RelaxedSpeculativeSampling

    model, joints = joint_model
    num, delta = 40_000, 0.05
    nbrs = ring_neighbours(V - 1)
    exact, labels, exact_stats = run_rule(model, None, num)
    relaxed, _, stats = run_rule(model, RelaxedSpeculativeSampling(nbrs, delta=delta), num)
    noise = joint_tv(exact, labels, joints)  # the sampling noise of num sequences of an exact sampler
    assert joint_tv(relaxed, labels, joints) <= model.num_tokens * delta + noise + 0.01
    # the measured TV budget: within δ per verified position, and its sum bounds the joint's TV
    assert exact_stats["tv_composed"] == 0 and 0 < stats["tv_per_position"] <= delta + 1e-9
    assert stats["tv_per_position"] < stats["tv_composed"] <= model.num_tokens * delta + 1e-9
    assert joint_tv(relaxed, labels, joints) <= stats["tv_composed"] + noise + 0.01
    _, _, loose = run_rule(model, RelaxedSpeculativeSampling(ring_neighbours(3), delta=0.4), num)
    assert loose["mean_accepted_length"] > exact_stats["mean_accepted_length"] + 0.015

    class AlwaysAccept(SpeculativeSampling):
        def accept(self, p, q, drafts, generator):
            return torch.ones_like(drafts, dtype=torch.bool)

    wrong, _, _ = run_rule(model, AlwaysAccept(), num)
    assert joint_tv(wrong, labels, joints) > model.num_tokens * delta + noise + 0.01


def test_relax_settings_are_validated():
    dec = get_decoder("sjd")
    with pytest.raises(ValueError, match="takes one rule: decoding.delta"):
        dec.parse_settings({"relax": "lantern"})
    with pytest.raises(ValueError, match="choose none \\(exact\\) or lantern"):
        dec.parse_settings({"relax": "eagle"})
    settings = dec.parse_settings({"relax": "lantern", "delta": 0.1, "k": 3})
    settings.neighbours = ring_neighbours(3)
    model = tiny_gpt()
    with pytest.raises(ValueError, match="greedy decoding"):
        dec.run(model, torch.tensor([0]), SamplingConfig(temperature=0.0), None, None, settings)
    bare = dec.parse_settings({"relax": "lantern", "delta": 0.1})
    with pytest.raises(ValueError, match="needs the neighbour table"):
        dec.run(model, torch.tensor([0]), SAMPLING, None, None, bare)


def test_relax_lantern_through_the_registry_changes_the_samples_and_zero_delta_does_not(joint_model):
    model, _ = joint_model
    dec, cond = get_decoder("sjd"), torch.tensor([0, 2]).repeat(500)

    def run(extra):
        settings = dec.parse_settings({"window": 3, **extra})
        settings.neighbours = ring_neighbours(3)
        return dec.run(model, cond, SAMPLING, torch.Generator().manual_seed(1), None, settings)[0]

    exact = run({})
    assert torch.equal(run({"relax": "lantern", "delta": 0.0, "k": 3}), exact)
    assert not torch.equal(run({"relax": "lantern", "delta": 0.4, "k": 3}), exact)


def test_the_tv_budget_sums_the_verified_positions(joint_model):
    """With a rule whose per-position TV is 1, the composed budget counts the verified positions: the accepted
    drafts plus the first rejection inside the image, per forward (counted here from each step's result)."""
    from decoding.lantern_accept import RelaxedSpeculativeSampling, mixture_target

    class UnitTV(SpeculativeSampling):
        def tv(self, p, q):
            return torch.ones(p.shape[:-1], dtype=torch.float64)

    model, _ = joint_model
    for seed in range(4):
        torch.set_grad_enabled(False)
        loop = SpeculativeLoop(model, torch.tensor([seed % NC]), SAMPLING, torch.Generator().manual_seed(seed), 3,
                               JacobiDrafter("random", "none"), UnitTV())
        loop.start()
        count = 0
        while not loop.done():
            r = loop.step()
            drafts_inside = min(loop.L - 1, loop.N - int(r.n_old))
            count += int(r.accepted) + int(int(r.accepted) < drafts_inside)
        torch.set_grad_enabled(True)
        assert loop.stats(0)["tv_composed"] == count
    # and a relaxed rule's per-position TV is TV(p, p̂)
    p, q = torch.rand(5, V).softmax(-1), torch.rand(5, V).softmax(-1)
    nbrs = ring_neighbours(3)
    rule = RelaxedSpeculativeSampling(nbrs, delta=0.2)
    want = 0.5 * (mixture_target(p, q, nbrs, delta=0.2) - p).abs().sum(-1)
    torch.testing.assert_close(rule.tv(p, q), want)
    assert float(want.max()) > 0
