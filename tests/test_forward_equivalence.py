"""The inference forward paths (generators/layers.py, generators/var.py) against the forward they replaced.

``ref_*`` below is a verbatim copy of the previous Mlp / qkv projection / q-k normalisation / VAR block forward, and
VAR's guided head mixes the logits as the previous ``VAR.generate`` did. The new paths (FFN rows in chunks with GELU
fused into fc1 by oneDNN or in place, q/k/v as three products when the fused output would exceed glibc's mmap
threshold, q and k normalised in place, AdaLN modulation and gated residuals in place on fresh tensors, VAR's CFG
ramp mixed before the head) must give the same outputs within 1e-5 (relative and absolute) and, through VAR's
sampler on these small models, the same tokens for the same seed. The thresholds are lowered in the tests so that
tiny models take every new branch. ``reference_forward()`` swaps the old forward back in (benchmarks/generators.py
times both in one process).
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from generators import layers
from generators.layers import Attention, Mlp
from generators.var import VAR, AdaLNSelfAttnBlock
from tokenizers.msvq import MultiScaleVQ

# -- the previous implementation, kept as the reference ----------------------------------------

def ref_mlp_forward(self, x):
    return self.drop(self.fc2(F.gelu(self.fc1(x), approximate="tanh")))


def ref_project_qkv(self, x):
    b, n, _ = x.shape
    bias = self.qkv.bias
    if hasattr(self, "q_bias"):
        bias = torch.cat([self.q_bias, self.zero_k_bias, self.v_bias])
    qkv = F.linear(x, self.qkv.weight, bias)
    q, k, v = qkv.split([self.heads * self.head_dim, self.kv_heads * self.head_dim,
                         self.kv_heads * self.head_dim], dim=-1)
    q = q.view(b, n, self.heads, self.head_dim).transpose(1, 2)
    k = k.view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
    v = v.view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
    return q, k, v


def ref_normalize_qk(self, q, k):
    q = F.normalize(q, dim=-1) * self.log_scale.clamp(max=self.max_log_scale).exp().to(q.dtype)
    return q, F.normalize(k, dim=-1)


def ref_block_forward(self, x, c, mask=None, cache=None):
    gamma1, gamma2, scale1, scale2, shift1, shift2 = self.ada_lin(c).view(-1, 1, 6, self.dim).unbind(2)
    x = x + self.drop_path(self.attn(self.ln(x) * (1 + scale1) + shift1, mask=mask, cache=cache) * gamma1)
    return x + self.drop_path(self.ffn(self.ln(x) * (1 + scale2) + shift2) * gamma2)


_run = VAR._run


def ref_var_run(self, x, c, mask=None, cache=None, guidance=None):
    """The previous VAR head: raw [cond; uncond] logits, the CFG ramp mixed in place on the logits."""
    logits, h = _run(self, x, c, mask=mask, cache=cache)
    if guidance is None:
        return logits, h
    cond, uncond = logits.chunk(2)
    return cond.mul_(1 + guidance).sub_(uncond.mul_(guidance)), h


@contextlib.contextmanager
def reference_forward():
    """Run Mlp, Attention.project_qkv / normalize_qk, VAR's block and VAR's guided head as they were before."""
    saved = [(Mlp, "forward", Mlp.forward), (Attention, "project_qkv", Attention.project_qkv),
             (Attention, "normalize_qk", Attention.normalize_qk),
             (AdaLNSelfAttnBlock, "forward", AdaLNSelfAttnBlock.forward), (VAR, "_run", VAR._run)]
    Mlp.forward, Attention.project_qkv, AdaLNSelfAttnBlock.forward = ref_mlp_forward, ref_project_qkv, ref_block_forward
    Attention.normalize_qk, VAR._run = ref_normalize_qk, ref_var_run
    try:
        yield
    finally:
        for cls, name, fn in saved:
            setattr(cls, name, fn)


@pytest.fixture
def small_thresholds(monkeypatch):
    """Tiny models take the chunked FFN (several chunks) and the split q/k/v projection."""
    monkeypatch.setattr(layers, "HEAP_CHUNK_BYTES", 4 * 64 * 7)  # 7 rows of a 64-wide hidden layer
    monkeypatch.setattr(layers, "ROW_BLOCK", 7)
    monkeypatch.setattr(layers, "MMAP_THRESHOLD_BYTES", 0)
    monkeypatch.setattr(layers, "keeping_freed_memory", lambda: False)  # as if no sampler had set glibc's malloc


def _perturbed(module, scale=0.3, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module.eval()


# -- the pieces --------------------------------------------------------------------------------

@pytest.mark.parametrize("fused", [True, False])
def test_chunked_ffn_matches_the_plain_ffn(small_thresholds, monkeypatch, fused):
    """Both CPU-inference FFNs: fc1 + GELU(tanh) fused in oneDNN, and fc1 then an in-place gelu_."""
    if fused:
        assert layers.LINEAR_GELU is not None, "this torch build has no oneDNN linear: the fused FFN is untested"
    else:
        monkeypatch.setattr(layers, "LINEAR_GELU", None)
    mlp = _perturbed(Mlp(16, 64))
    x = torch.randn(3, 11, 16)  # 33 rows -> chunks of 7
    with torch.no_grad():
        new = mlp(x)
        ref = ref_mlp_forward(mlp, x)
    assert new.shape == ref.shape == (3, 11, 16)
    torch.testing.assert_close(new, ref, rtol=1e-5, atol=1e-5)
    mlp.fc2.bias = None  # a bias-free output layer takes torch.mm
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), ref_mlp_forward(mlp, x), rtol=1e-5, atol=1e-5)


def test_ffn_keeps_the_plain_path_under_autograd(small_thresholds):
    mlp = _perturbed(Mlp(16, 64))
    x = torch.randn(2, 9, 16, requires_grad=True)
    mlp(x).square().sum().backward()  # in-place GELU would break this backward
    g = x.grad.clone()
    x.grad = None
    ref_mlp_forward(mlp, x).square().sum().backward()
    assert torch.equal(g, x.grad)


@pytest.mark.parametrize("kind", ["bias", "zero_k_bias", "no_bias", "gqa"])
def test_split_qkv_projection_matches_the_fused_one(small_thresholds, kind):
    attn = Attention(32, 4, qkv_bias=kind != "no_bias", zero_k_bias=kind == "zero_k_bias",
                     kv_heads=2 if kind == "gqa" else None)
    attn = _perturbed(attn)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        new, ref = attn.project_qkv(x), ref_project_qkv(attn, x)
    for a, b in zip(new, ref):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("keeping", [False, True])
def test_qkv_is_split_only_while_big_outputs_are_mmapped(small_thresholds, monkeypatch, keeping):
    """Three products above the mmap threshold, one once utils/heap.keep_freed_memory serves everything from the heap."""
    monkeypatch.setattr(layers, "keeping_freed_memory", lambda: keeping)
    calls = []
    linear = F.linear
    monkeypatch.setattr(layers.F, "linear", lambda *a, **k: calls.append(1) or linear(*a, **k))
    with torch.no_grad():
        Attention(32, 4, qkv_bias=True).project_qkv(torch.randn(2, 5, 32))
    assert len(calls) == (1 if keeping else 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_qk_normalisation_matches_f_normalize(dtype):
    """Outside autograd q and k are normalised in place with the temperature folded into q's factor (float32)."""
    attn = Attention(64, 4, qkv_bias=True, qk_l2_norm=True)
    with torch.no_grad():
        attn.log_scale.copy_(torch.tensor([0.3, 1.4, 2.0, 5.0]).view(1, 4, 1, 1))  # 5.0 > log 100: clamped
    q, k = torch.randn(2, 4, 7, 16) * 3, torch.randn(2, 4, 7, 16)
    q[0, 1, 2] = 0.0  # a zero vector stays zero (eps), as in F.normalize
    k[1, 0, 3] *= 1e-8  # a tiny one is still normalised
    qd, kd = q.to(dtype), k.to(dtype)
    exact = [t.double() for t in ref_normalize_qk(attn.double(), qd.double(), kd.double())]  # of the same inputs
    attn.float()
    old = ref_normalize_qk(attn, qd, kd)
    with torch.no_grad():
        new = attn.normalize_qk(qd.clone(), kd.clone())
    for n, o, e in zip(new, old, exact):
        assert n.dtype == dtype
        if dtype == torch.float32:
            torch.testing.assert_close(n, o, rtol=1e-6, atol=1e-6)
        else:  # one bf16 rounding of a float32 product (F.normalize and the product: two bf16 roundings)
            assert (n.double() - e).abs().max() <= (o.double() - e).abs().max()
            assert (n != e.to(dtype)).float().mean() < 0.01  # the exact value rounded once, but for near-ties
    assert torch.equal(new[0][0, 1, 2], torch.zeros(16, dtype=dtype))


def test_var_block_matches_the_previous_block(small_thresholds):
    blk = _perturbed(AdaLNSelfAttnBlock(32, 4))
    x, c = torch.randn(2, 14, 32), torch.randn(2, 32)
    mask = torch.rand(14, 14) > 0.3
    mask.fill_diagonal_(True)
    with torch.no_grad():
        torch.testing.assert_close(blk(x, c, mask=mask), ref_block_forward(blk, x, c, mask=mask), rtol=1e-5, atol=1e-5)


def test_var_block_gradients_match_in_training(small_thresholds):
    blk = _perturbed(AdaLNSelfAttnBlock(32, 4)).train()
    x, c = torch.randn(2, 6, 32), torch.randn(2, 32)
    grads = []
    for fn in (blk.forward, lambda *a: ref_block_forward(blk, *a)):
        blk.zero_grad()
        fn(x, c).square().sum().backward()
        grads.append([p.grad.clone() for p in blk.parameters() if p.grad is not None])
    for a, b in zip(*grads):  # large gradients (a perturbed block): compare against each tensor's scale
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


# -- the whole sampler ---------------------------------------------------------------------------

def test_var_logits_and_tokens_match_the_previous_forward(small_thresholds):
    scales = (1, 2, 3, 4)
    msvq = MultiScaleVQ(dim=8, codebook_size=64, scales=scales).eval()
    model = _perturbed(VAR(64, 5, scales, code_dim=8, depth=2, width=32, heads=2), scale=0.1)
    labels = torch.tensor([0, 3, 4])
    inputs = torch.randn(3, model.L - 1, 8)
    with torch.no_grad():
        new = model(None, labels, inputs)
        with reference_forward():
            ref = model(None, labels, inputs)
    torch.testing.assert_close(new, ref, rtol=1e-5, atol=1e-5)

    def sample():
        return model.generate(msvq, labels, cfg=1.5, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(7))

    new_maps = sample()
    with reference_forward():
        ref_maps = sample()
    assert all(torch.equal(a, b) for a, b in zip(new_maps, ref_maps))


def test_var_guidance_before_the_head_equals_mixing_the_logits():
    """prefill / step with ``guidance`` t: head((1+t) h_c - t h_u) = (1+t) logits_c - t logits_u (an affine head)."""
    scales = (1, 2, 3)
    model = _perturbed(VAR(64, 5, scales, code_dim=8, depth=2, width=32, heads=2), scale=0.1)
    labels = model.class_emb.with_null(torch.tensor([0, 3, 4]))  # (6,) [cond; uncond]
    inputs = torch.randn(6, model.L - 1, 8)
    t = 0.75

    def mix(logits):
        return (1 + t) * logits[:3] - t * logits[3:]

    with torch.no_grad():
        for guidance in (None, t):
            model.setup_cache(6, model.L)
            out = [model.prefill(labels, inputs[:, :4], guidance=guidance),
                   model.step(inputs[:, 4:], 2, guidance=guidance)]
            if guidance is None:
                raw = out
        model.free_cache()
    for guided, plain in zip(out, raw):
        assert guided.shape[0] == 3 and plain.shape[0] == 6
        torch.testing.assert_close(guided, mix(plain), rtol=1e-5, atol=1e-5)
    assert (mix(raw[1]) - raw[1][:3]).abs().max() > 0.1  # guidance changes these logits: the check has power


def test_var_sampler_never_reads_an_unwritten_cache_slot(monkeypatch):
    """VAR.generate skips the cache's zero fill: with NaN in every unwritten slot the tokens stay the same."""
    scales = (1, 2, 3)
    msvq = MultiScaleVQ(dim=8, codebook_size=64, scales=scales).eval()
    model = _perturbed(VAR(64, 5, scales, code_dim=8, depth=2, width=32, heads=2), scale=0.1)
    labels = torch.tensor([0, 3])

    def sample():
        return model.generate(msvq, labels, cfg=1.5, top_k=20, generator=torch.Generator().manual_seed(1))

    ref = sample()
    init = layers.KVCache.__init__

    def nan_filled(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if not kwargs.get("zero", args[6] if len(args) > 6 else True):
            self.kv.fill_(float("nan"))

    monkeypatch.setattr(layers.KVCache, "__init__", nan_filled)
    assert all(torch.equal(a, b) for a, b in zip(sample(), ref))
