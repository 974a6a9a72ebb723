"""The CPU-inference forward paths (generators/layers.py, generators/var.py) against the forward they replaced.

``ref_*`` below is a verbatim copy of the previous Mlp / qkv projection / VAR block forward. The new paths
(FFN rows in chunks with GELU fused into fc1 by oneDNN or in place, q/k/v as three products when the fused output would exceed glibc's
mmap threshold, AdaLN modulation and gated residuals in place on fresh tensors) must give the same outputs within
1e-5 (relative and absolute) and, through VAR's sampler, the same tokens for the same seed. The thresholds are lowered in the tests
so that tiny models take every new branch. ``reference_forward()`` swaps the old forward back in
(benchmarks/generators.py times both in one process).
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


def ref_block_forward(self, x, c, mask=None, cache=None):
    gamma1, gamma2, scale1, scale2, shift1, shift2 = self.ada_lin(c).view(-1, 1, 6, self.dim).unbind(2)
    x = x + self.drop_path(self.attn(self.ln(x) * (1 + scale1) + shift1, mask=mask, cache=cache) * gamma1)
    return x + self.drop_path(self.ffn(self.ln(x) * (1 + scale2) + shift2) * gamma2)


@contextlib.contextmanager
def reference_forward():
    """Run Mlp, Attention.project_qkv and VAR's block with the previous forward inside the block."""
    saved = [(Mlp, "forward", Mlp.forward), (Attention, "project_qkv", Attention.project_qkv),
             (AdaLNSelfAttnBlock, "forward", AdaLNSelfAttnBlock.forward)]
    Mlp.forward, Attention.project_qkv, AdaLNSelfAttnBlock.forward = ref_mlp_forward, ref_project_qkv, ref_block_forward
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
