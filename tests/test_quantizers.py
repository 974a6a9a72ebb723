"""Defining properties of every quantizer in tokenizers/ (single process; DDP lives in test_quantizers_ddp.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tokenizers.bernoulli import BernoulliBinary
from tokenizers.bsq import BSQ, binary_entropy_from_logits
from tokenizers.fsq import FSQ
from tokenizers.kl import KLGaussian
from tokenizers.lfq import LFQ
from tokenizers.msvq import MultiScaleVQ, phi_ticks
from tokenizers.simvq import SimVQ
from tokenizers.vq import VQ, nearest_code


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny tensors on a shared 2-core machine: intra-op threading only adds contention (60x slower under load)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ------------------------------------------------------------------------------------------------
# Contract shared by every quantizer
# ------------------------------------------------------------------------------------------------

FACTORIES = {
    "vq": lambda: VQ(8, 32),
    "vq_l2_lowdim": lambda: VQ(8, 32, l2_norm=True, codebook_dim=4),
    "vq_ema": lambda: VQ(8, 32, ema=True, dead_code_threshold=1.0, kmeans_init=True),
    "vq_restart": lambda: VQ(8, 32, dead_code_threshold=1.0),
    "simvq": lambda: SimVQ(8, 32),
    "fsq": lambda: FSQ([8, 5, 5, 5]),
    "fsq_proj": lambda: FSQ([8, 5, 5, 5], dim=8),
    "lfq": lambda: LFQ(6),
    "bsq": lambda: BSQ(10, group_size=4),
    "bernoulli": lambda: BernoulliBinary(8),
    "msvq": lambda: MultiScaleVQ(8, 32, scales=(1, 2, 4)),
    "kl": lambda: KLGaussian(4),
}


def _as_latent(q, out):
    return out.quantized if q.continuous else out.indices


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_contract_decode_roundtrip_dtype_and_loss(name):
    q = FACTORIES[name]()
    z = torch.randn(2, q.in_channels, 4, 4, requires_grad=True)

    q.train()  # one training step first, so EMA/k-means/restart state is exercised
    out = q(z)
    assert isinstance(out.loss, torch.Tensor) and out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert out.quantized.shape == (2, q.out_channels, 4, 4)
    (out.quantized.square().mean() + out.loss).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    assert all(torch.is_tensor(v) and v.dim() == 0 for v in out.stats.values())

    q.eval()
    out = q(z.detach())
    assert out.loss.dim() == 0
    decoded = q.decode_indices(_as_latent(q, out))
    assert decoded.shape == out.quantized.shape
    torch.testing.assert_close(decoded, out.quantized, atol=1e-5, rtol=1e-5)
    if q.codebook_size is not None:
        idx = out.indices if isinstance(out.indices, list) else [out.indices]
        assert all(i.dtype == torch.int64 for i in idx)
        assert all(((i >= 0) & (i < q.codebook_size)).all() for i in idx)


@pytest.mark.parametrize("name", ["vq", "vq_ema", "simvq", "lfq", "msvq"])
def test_straight_through_passes_the_output_gradient_unchanged(name):
    """quantized = z + sg(q - z): its value is q, and d(quantized . g)/dz = g exactly, with no gradient to codes."""
    q = FACTORIES[name]().train()
    z = torch.randn(2, q.in_channels, 4, 4, requires_grad=True)
    g = torch.randn(2, q.out_channels, 4, 4)
    out = q(z)
    (out.quantized * g).sum().backward()
    torch.testing.assert_close(z.grad, g, atol=0, rtol=0)
    assert all(p.grad is None or not p.grad.any() for p in q.parameters())
    torch.testing.assert_close(out.quantized, q.eval().decode_indices(out.indices), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_quantization_is_fp32_under_bf16_autocast(name):
    q = FACTORIES[name]()
    z = torch.randn(2, q.in_channels, 4, 4)
    for train in (True, False):
        q.train(train)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = q(z)
            assert out.quantized.dtype == torch.float32 and out.loss.dtype == torch.float32
            assert q.decode_indices(_as_latent(q, out)).dtype == torch.float32


# ------------------------------------------------------------------------------------------------
# Code vectors: codebook_vectors() in the lookup space, decode_indices(i) == decode_vectors(vectors[i])
# ------------------------------------------------------------------------------------------------

SINGLE_SCALE = sorted(n for n in FACTORIES if n not in ("kl", "msvq"))


@pytest.mark.parametrize("name", SINGLE_SCALE)
def test_codebook_vectors_decode_like_indices(name):
    q = FACTORIES[name]()
    q.train()
    q(torch.randn(2, q.in_channels, 4, 4))  # k-means / EMA state moves first
    q.eval()
    vectors = q.codebook_vectors()
    assert vectors.shape[0] == q.codebook_size and vectors.dim() == 2
    assert vectors.dtype == torch.float32 and not vectors.requires_grad
    assert torch.unique(vectors, dim=0).shape[0] == q.codebook_size  # K distinct codes
    idx = torch.randint(0, q.codebook_size, (2, 3, 5))
    decoded = q.decode_indices(idx)  # (2, C_out, 3, 5)
    torch.testing.assert_close(decoded, q.decode_vectors(vectors[idx]), atol=1e-6, rtol=1e-6)
    # and what forward outputs for a code is its row: quantize random inputs, decode their rows
    out = q(torch.randn(2, q.in_channels, 4, 4))
    torch.testing.assert_close(q.decode_vectors(vectors[out.indices]), out.quantized, atol=1e-5, rtol=1e-5)


def _lookup_space(q, z):
    """What VQ / SimVQ compare against the codebook: project_in, then l2-normalize when asked (by hand)."""
    x = getattr(q, "project_in", torch.nn.Identity())(z).permute(0, 2, 3, 1).reshape(-1, q.codebook_vectors().shape[1])
    return F.normalize(x, dim=-1) if getattr(q, "l2_norm", False) else x


@pytest.mark.parametrize("name", ["vq", "vq_l2_lowdim", "vq_ema", "simvq"])
def test_codebook_vectors_are_what_the_argmin_compares_against(name):
    q = FACTORIES[name]().eval()
    with torch.no_grad():
        for t in (getattr(q, "embed", None), getattr(q, "frozen_codebook", None)):
            if t is not None:
                t.normal_()  # spread the codes so the argmin is decided by more than rounding
    z = torch.randn(4, q.in_channels, 5, 5)
    x = _lookup_space(q, z).detach()
    brute = torch.cdist(x.double(), q.codebook_vectors().double()).argmin(1)
    assert torch.equal(q(z).indices.reshape(-1), brute)


def test_codebook_vectors_of_learned_codebooks_by_hand():
    vq = VQ(8, 32)
    torch.testing.assert_close(vq.codebook_vectors(), vq.embed.detach())
    cos = VQ(8, 32, l2_norm=True, codebook_dim=4)
    with torch.no_grad():
        cos.embed.normal_()
    e = cos.embed.detach()
    assert cos.codebook_vectors().shape == (32, 4)  # the low-dimensional space, not the 8 input channels
    torch.testing.assert_close(cos.codebook_vectors(), e / e.norm(dim=1, keepdim=True))
    sim = SimVQ(8, 32)
    by_hand = sim.frozen_codebook @ sim.proj.weight.detach().t() + sim.proj.bias.detach()  # W(C), not C
    torch.testing.assert_close(sim.codebook_vectors(), by_hand)
    for l2 in (False, True):
        ms = MultiScaleVQ(4, 16, scales=(1, 2, 4), l2_norm=l2)
        w = ms.embedding.weight.detach()
        torch.testing.assert_close(ms.codebook_vectors(), w / w.norm(dim=1, keepdim=True) if l2 else w)
        r = torch.randn(2, 4, 4, 4)
        x = r.permute(0, 2, 3, 1).reshape(-1, 4)
        x = x / x.norm(dim=1, keepdim=True) if l2 else x
        assert torch.equal(ms.lookup(r).reshape(-1), torch.cdist(x.double(), ms.codebook_vectors().double()).argmin(1))
    plain = MultiScaleVQ(4, 16, scales=(1, 2, 4))
    idx = torch.randint(0, 16, (2, 4, 4))
    torch.testing.assert_close(plain.embed(idx), plain.codebook_vectors()[idx].permute(0, 3, 1, 2))


def test_fsq_grid_enumerated_by_hand():
    levels = [3, 4, 5]
    q = FSQ(levels)
    rows = []
    for k in range(3 * 4 * 5):  # channel 0 is the least significant digit
        digits = [k % 3, (k // 3) % 4, k // 12]
        rows.append([(dg - lv // 2) / (lv // 2) for dg, lv in zip(digits, levels)])
    torch.testing.assert_close(q.codebook_vectors(), torch.tensor(rows), atol=0, rtol=0)
    # forward lands on the grid row of its index
    z = torch.randn(2, 3, 6, 6) * 2
    out = q(z)
    torch.testing.assert_close(out.quantized.permute(0, 2, 3, 1), torch.tensor(rows)[out.indices], atol=1e-6, rtol=0)


@pytest.mark.parametrize("cls,low,high", [(LFQ, -1.0, 1.0), (BSQ, -0.5, 0.5), (BernoulliBinary, 0.0, 1.0)])
def test_binary_grids_by_hand_little_endian(cls, low, high):
    q = cls(4)
    rows = [[high if c == "1" else low for c in reversed(format(k, "04b"))] for k in range(16)]  # bit i -> channel i
    torch.testing.assert_close(q.codebook_vectors(), torch.tensor(rows), atol=1e-7, rtol=0)


@pytest.mark.parametrize("make", [lambda: FSQ([8, 8, 8, 5, 5, 5]), lambda: LFQ(16), lambda: BSQ(16),
                                  lambda: BernoulliBinary(16), lambda: VQ(8, 65536, codebook_dim=6)])
def test_codebook_vectors_at_65536_codes(make):
    q = make()
    vectors = q.codebook_vectors()
    assert vectors.shape == (q.codebook_size, vectors.shape[1]) and q.codebook_size in (64000, 65536)
    idx = torch.tensor([[[0, 1, q.codebook_size - 1]]])
    torch.testing.assert_close(q.decode_indices(idx), q.decode_vectors(vectors[idx]))


def test_codebook_vectors_refused_where_there_is_none():
    with pytest.raises(ValueError, match="continuous"):
        KLGaussian(4).codebook_vectors()
    with pytest.raises(ValueError, match="limit"):
        BSQ(30).codebook_vectors()


# ------------------------------------------------------------------------------------------------
# VQ
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_block", [7, 50, 1 << 24])
def test_nearest_code_blocks_agree_with_brute_force_first_index_on_ties(max_block):
    codebook = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 2.0], [1.0, 0.0]])  # rows 2, 4 repeat 0, 1
    x = torch.cat([codebook, torch.randn(20, 2), torch.tensor([[0.5, 0.0]])])  # the last is equidistant from 0 and 1
    got = nearest_code(x, codebook, max_block=max_block)
    expected = [min(range(5), key=lambda k: (float(((v - codebook[k]) ** 2).sum()), k)) for v in x]
    assert got.tolist() == expected
    assert got[:5].tolist() == [0, 1, 0, 3, 1] and got[-1] == 0


@pytest.mark.parametrize("l2_norm,codebook_dim", [(False, None), (True, None), (True, 3), (False, 3)])
def test_vq_nearest_code_is_brute_force(l2_norm, codebook_dim):
    q = VQ(6, 50, l2_norm=l2_norm, codebook_dim=codebook_dim).eval()
    with torch.no_grad():
        q.embed.normal_()
    z = torch.randn(3, 6, 5, 5)
    out = q(z)
    x = q.project_in(z).permute(0, 2, 3, 1).reshape(-1, q.codebook_dim).detach()
    e = q.embed.detach()
    if l2_norm:  # cosine: largest normalized dot product
        expected = (F.normalize(x, dim=-1) @ F.normalize(e, dim=-1).t()).argmax(1)
    else:
        expected = torch.stack([((e - v) ** 2).sum(1).argmin() for v in x])
    assert torch.equal(out.indices.reshape(-1), expected)


def test_vq_loss_is_paper_form_not_legacy():
    beta = 0.25
    q = VQ(4, 8, beta=beta).train()
    with torch.no_grad():
        q.embed.normal_()
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = q(z)
    out.loss.backward()
    codes = q.embed.detach()[out.indices].permute(0, 3, 1, 2)  # (B, C, H, W)
    n = z.numel()
    torch.testing.assert_close(out.loss, (1 + beta) * F.mse_loss(z.detach(), codes))
    # the encoder gets beta * commitment, the codebook the full-weight term (taming's legacy swaps them)
    torch.testing.assert_close(z.grad, beta * 2 * (z.detach() - codes) / n)
    flat_z = z.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    idx = out.indices.reshape(-1)
    expected = torch.zeros_like(q.embed).index_add_(0, idx, 2 * (q.embed.detach()[idx] - flat_z) / n)
    torch.testing.assert_close(q.embed.grad, expected)


def test_vq_ema_update_matches_formula():
    decay, eps = 0.9, 0.1  # a large eps makes the Laplace smoothing visible
    q = VQ(2, 3, ema=True, decay=decay, eps=eps).train()
    embed0 = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    q.embed.copy_(embed0)
    q.embed_avg.copy_(embed0)
    q.cluster_size.fill_(1.0)
    x = torch.tensor([[1.0, 0.0], [9.0, 1.0], [0.0, 11.0], [11.0, 0.0]])  # codes 0, 1, 2, 1
    out = q(x.view(4, 2, 1, 1))
    assert out.indices.reshape(-1).tolist() == [0, 1, 2, 1]
    counts = torch.tensor([1.0, 2.0, 1.0])
    sums = torch.tensor([[1.0, 0.0], [20.0, 1.0], [0.0, 11.0]])
    cluster = decay * 1.0 + (1 - decay) * counts
    embed_avg = decay * embed0 + (1 - decay) * sums
    n = cluster.sum()
    smoothed = (cluster + eps) / (n + 3 * eps) * n
    torch.testing.assert_close(q.cluster_size, cluster)
    torch.testing.assert_close(q.embed_avg, embed_avg)
    torch.testing.assert_close(q.embed, embed_avg / smoothed[:, None])
    # EMA mode: commitment only, the quantized vectors are the codes from before the update
    torch.testing.assert_close(out.loss, 0.25 * F.mse_loss(x, embed0[[0, 1, 2, 1]]))
    assert not any(p.requires_grad for p in [q.embed, q.embed_avg])


def test_vq_eval_does_not_update_state():
    q = VQ(2, 3, ema=True, dead_code_threshold=5.0, kmeans_init=True).eval()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q(torch.randn(4, 2, 2, 2))
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())


@pytest.mark.parametrize("ema", [False, True])
def test_vq_dead_code_restarted_from_batch(ema):
    threshold = 0.75
    q = VQ(2, 4, ema=ema, decay=0.5, dead_code_threshold=threshold).train()
    with torch.no_grad():
        q.embed.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [100.0, 100.0]]))  # code 3 never chosen
        if ema:
            q.embed_avg.copy_(q.embed)
    x = torch.tensor([[0.1, 0.0], [0.9, 0.1], [0.1, 0.9], [0.0, 0.1], [1.1, 0.0], [0.0, 1.2]])
    z = x.view(6, 2, 1, 1).requires_grad_(True)
    out = q(z)
    assert 3 not in out.indices.reshape(-1).tolist()
    # code 3: cluster size 0.5 * 1 + 0.5 * 0 = 0.5 < 0.75 -> replaced by a batch vector
    assert torch.cdist(q.embed.detach()[3:4], x).min() < 1e-6
    assert q.cluster_size[3] == threshold
    assert (q.cluster_size[:3] >= 1.0).all()  # used codes keep their statistics
    if ema:
        torch.testing.assert_close(q.embed_avg[3], q.embed[3] * threshold)
    else:  # restarting the learnable codebook in place must not change the backward pass
        (out.quantized.sum() + out.loss).backward()
        used = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # the codes before the restart
        idx = out.indices.reshape(-1)
        expected = torch.zeros(4, 2).index_add_(0, idx, 2 * (used[idx] - x) / x.numel())  # codebook term only
        torch.testing.assert_close(q.embed.grad, expected)


def _clustered_data(n_clusters=16, dim=8, per_cluster=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_clusters, dim, generator=g) * 3
    x = centers.repeat_interleave(per_cluster, 0) + 0.1 * torch.randn(n_clusters * per_cluster, dim, generator=g)
    return x.view(-1, dim, 1, 1)  # (N, C, 1, 1)


def _distortion(q, z):
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    codes = q.codebook.detach()
    return ((flat - codes[nearest_code(flat, codes)]) ** 2).sum(1).mean().item()


@pytest.mark.parametrize("ema", [False, True])
def test_vq_kmeans_init_lowers_distortion(ema):
    z = _clustered_data()
    q = VQ(8, 16, ema=ema, kmeans_init=True).train()
    random_init = _distortion(q, z)
    assert not bool(q.initted)
    q(z)
    assert bool(q.initted)
    fitted = _distortion(q, z)
    assert fitted < 0.2 * random_init, (fitted, random_init)
    if not ema:  # the init runs once
        before = q.embed.detach().clone()
        q(z[:64])
        assert torch.equal(before, q.embed.detach())


def test_vq_buffers_persist_in_checkpoints():
    q = VQ(8, 16, ema=True, dead_code_threshold=0.5, kmeans_init=True).train()
    q(_clustered_data())
    state = q.state_dict()
    assert {"embed", "embed_avg", "cluster_size", "initted"} <= set(state)
    fresh = VQ(8, 16, ema=True, dead_code_threshold=0.5, kmeans_init=True)
    fresh.load_state_dict(state)
    assert bool(fresh.initted)
    z = torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(fresh.eval()(z).quantized, q.eval()(z).quantized)


# ------------------------------------------------------------------------------------------------
# SimVQ
# ------------------------------------------------------------------------------------------------


def test_simvq_frozen_codebook_and_decode_uses_projection():
    q = SimVQ(8, 64)
    assert not q.frozen_codebook.requires_grad and "frozen_codebook" in q.state_dict()
    assert abs(SimVQ(16, 8192).frozen_codebook.std().item() - 16 ** -0.5) < 0.01
    opt = torch.optim.SGD(q.parameters(), lr=1.0)
    z = torch.randn(4, 8, 4, 4)
    q.train()
    before = q.frozen_codebook.clone()
    z.requires_grad_(True)
    out = q(z)
    out.loss.backward()
    # by hand: codes = W C[idx] + b; loss = beta mse(z, sg codes) + mse(codes, sg z) over n = N * d entries
    c = q.frozen_codebook[out.indices.reshape(-1)]  # (N, d)
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 8)
    codes = c @ q.proj.weight.detach().t() + q.proj.bias.detach()
    n = flat.numel()
    torch.testing.assert_close(q.proj.weight.grad, (2 * (codes - flat) / n).t() @ c)
    torch.testing.assert_close(q.proj.bias.grad, (2 * (codes - flat) / n).sum(0))
    torch.testing.assert_close(z.grad.permute(0, 2, 3, 1).reshape(-1, 8), 0.25 * 2 * (flat - codes) / n)
    torch.testing.assert_close(out.loss, 1.25 * ((codes - flat) ** 2).mean())
    z = z.detach()
    opt.step()
    assert torch.equal(before, q.frozen_codebook)  # C never changes
    q.eval()
    out = q(z)
    idx = out.indices
    torch.testing.assert_close(q.decode_indices(idx), out.quantized)
    effective = q.proj(q.frozen_codebook).detach()[idx].permute(0, 3, 1, 2)
    torch.testing.assert_close(q.decode_indices(idx), effective)
    raw = q.frozen_codebook[idx].permute(0, 3, 1, 2)  # the official repo's get_codebook_entry bug
    assert not torch.allclose(q.decode_indices(idx), raw, atol=1e-3)
    # nearest neighbour is taken against W(C)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 8)
    assert torch.equal(idx.reshape(-1), torch.cdist(flat, q.codebook.detach()).argmin(1))


# ------------------------------------------------------------------------------------------------
# FSQ
# ------------------------------------------------------------------------------------------------


def test_fsq_indices_codes_roundtrip_over_all_codes():
    q = FSQ([8, 5, 5, 5])
    all_idx = torch.arange(q.codebook_size)
    codes = q.indices_to_codes(all_idx)  # (K, d)
    assert torch.equal(q.codes_to_indices(codes), all_idx)
    assert len({tuple(c.tolist()) for c in codes}) == q.codebook_size
    decoded = q.decode_indices(all_idx.view(1, 40, 25))
    assert torch.equal(q.codes_to_indices(decoded.permute(0, 2, 3, 1)).view(-1), all_idx)


def test_fsq_values_on_grid_and_ste_gradient():
    levels = [8, 5, 5, 5]
    q = FSQ(levels)
    z = (torch.randn(4, 4, 16, 16) * 3).requires_grad_(True)
    out = q(z)
    half = torch.tensor([lv // 2 for lv in levels], dtype=torch.float32).view(1, 4, 1, 1)
    digits = out.quantized.detach() * half + half
    assert torch.allclose(digits, digits.round(), atol=1e-5)
    for c, lv in enumerate(levels):  # exactly L levels per channel, none outside
        values = digits[:, c].round().unique()
        assert values.min() >= 0 and values.max() <= lv - 1 and len(values) == lv
    out.quantized.sum().backward()
    h = z.detach().clone().requires_grad_(True)
    expected, = torch.autograd.grad((q.bound(h.permute(0, 2, 3, 1)) / half.view(4)).sum(), h)
    torch.testing.assert_close(z.grad, expected)  # gradient of the bound, round() is straight-through
    assert (z.grad.abs() > 0).any()


# ------------------------------------------------------------------------------------------------
# LFQ and BSQ
# ------------------------------------------------------------------------------------------------


def test_lfq_bit_order_is_little_endian():
    q = LFQ(4).eval()
    z = torch.tensor([0.5, -0.2, -1.0, 2.0]).view(1, 4, 1, 1)  # bits (1, 0, 0, 1) -> 1 + 8
    assert q(z).indices.item() == 9
    torch.testing.assert_close(q.decode_indices(torch.tensor([[[9]]])).view(4), torch.tensor([1.0, -1.0, -1.0, 1.0]))
    assert q(torch.tensor([1.0, -1, -1, -1]).view(1, 4, 1, 1)).indices.item() == 1  # channel 0 = LSB


@pytest.mark.parametrize("cls", [LFQ, BSQ])
def test_binary_index_roundtrip_over_all_codes(cls):
    q = cls(6).eval()
    all_idx = torch.arange(q.codebook_size).view(1, 8, 8)
    codes = q.decode_indices(all_idx)  # (1, 6, 8, 8)
    out = q(codes)
    assert torch.equal(out.indices, all_idx)
    torch.testing.assert_close(out.quantized, codes)


def test_lfq_entropy_penalty_extremes():
    q = LFQ(4, entropy_weight=1.0, commitment_weight=0.0).train()
    codes = q.decode_indices(torch.arange(16).view(1, 4, 4))  # every code once, confidently
    spread = q(codes * 5).loss
    collapsed = q(codes[:, :, :1, :1].expand(1, 4, 4, 4) * 5).loss  # all on one code
    torch.testing.assert_close(spread, torch.tensor(-math.log(16)), atol=1e-4, rtol=0)
    torch.testing.assert_close(collapsed, torch.tensor(0.0), atol=1e-4, rtol=0)
    assert q.eval()(codes).loss == 0  # entropy only in training, commitment weight 0


def test_lfq_loss_and_gradient_by_hand():
    """commitment_weight x mean (z - sign z)^2 (gradient to z only) + entropy_weight x (H_sample - H_codebook),
    the entropies from the 8 codes enumerated with itertools."""
    import itertools

    beta, w_ent, tau = 0.25, 0.1, 1.0
    q = LFQ(3, entropy_weight=w_ent, commitment_weight=beta, inv_temperature=tau)
    z = torch.tensor([[0.5, -0.2, 0.3, -1.5], [0.1, 0.4, -0.7, 2.0], [-0.6, 0.25, 0.9, -0.05]]).view(1, 3, 2, 2)
    z.requires_grad_(True)
    sign = torch.where(z.detach() > 0, 1.0, -1.0)
    commitment = beta * ((z.detach() - sign) ** 2).mean()
    out = q.eval()(z)
    torch.testing.assert_close(out.loss, commitment)
    out.loss.backward()
    torch.testing.assert_close(z.grad, beta * 2 * (z.detach() - sign) / z.numel())
    rows = z.detach().permute(0, 2, 3, 1).reshape(4, 3)
    codes = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=3)))  # any order: entropies do not care
    probs = (2 * tau * rows @ codes.t()).softmax(-1)  # (4, 8)
    h_sample = -(probs * probs.log()).sum(-1).mean()
    avg = probs.mean(0)
    h_codebook = -(avg * avg.log()).sum()
    torch.testing.assert_close(q.train()(z.detach()).loss, commitment + w_ent * (h_sample - h_codebook))


def test_lfq_refuses_large_dim():
    with pytest.raises(ValueError, match="bsq"):
        LFQ(17)


def test_bsq_bit_order_and_unit_norm():
    q = BSQ(4).eval()
    out = q(torch.tensor([3.0, -0.2, -1.0, 0.1]).view(1, 4, 1, 1))
    assert out.indices.item() == 1 + 8
    torch.testing.assert_close(out.quantized.view(4), torch.tensor([1.0, -1.0, -1.0, 1.0]) / 2)
    assert torch.allclose(q.decode_indices(torch.tensor([[[5, 60 % 16]]])).norm(dim=1), torch.ones(1, 1, 2))


def test_bsq_factorized_entropy_matches_brute_force():
    d, tau = 4, 2.0
    q = BSQ(d, group_size=d, inv_temperature=tau, gamma0=1.0, gamma=1.0, zeta=1.0)
    u = F.normalize(torch.randn(64, d), dim=-1)
    all_codes = q.decode_indices(torch.arange(2 ** d).view(1, 1, -1)).view(d, -1).t()  # (16, d)
    probs = (2 * tau * u @ all_codes.t()).softmax(-1)  # (N, 16), the exact distribution over codes
    sample_h = -(probs * probs.log()).sum(-1).mean()
    avg = probs.mean(0)
    codebook_h = -(avg * avg.log()).sum()
    torch.testing.assert_close(q.entropy_penalty(u), (sample_h - codebook_h) / tau, atol=1e-5, rtol=1e-5)
    # per-sample entropy is analytic per bit with p = sigmoid(-4 tau u / sqrt(d))
    analytic = binary_entropy_from_logits(-4 * tau * u / math.sqrt(d)).sum(-1).mean()
    torch.testing.assert_close(analytic, sample_h, atol=1e-5, rtol=1e-5)
    # grouped codebook entropy (groups of 2 bits) = the sum of the entropies of the batch-mean marginals of the
    # exact 16-way distribution over each group's bits (code j: bits 0-1 are j & 3, bits 2-3 are j >> 2)
    q2 = BSQ(d, group_size=2, inv_temperature=tau, gamma0=0.0)
    assert q2.groups == [2, 2]
    j = torch.arange(2 ** d)
    grouped = 0
    for part in (j & 3, j >> 2):
        marginal = torch.zeros(4).index_add_(0, part, avg)  # (4,)
        grouped = grouped - (marginal * marginal.log()).sum()
    torch.testing.assert_close(-q2.entropy_penalty(u) * tau, grouped, atol=1e-5, rtol=1e-5)
    assert grouped >= codebook_h - 1e-5  # subadditivity: the grouped bound is above the joint entropy
    assert BSQ(10, group_size=4).groups == [4, 4, 2] and BSQ(3).group_size == 3


# ------------------------------------------------------------------------------------------------
# Bernoulli
# ------------------------------------------------------------------------------------------------


def test_bernoulli_eval_deterministic_train_stochastic_ste():
    q = BernoulliBinary(16, prior_weight=0.5)
    z = torch.randn(8, 16, 4, 4) * 0.5
    q.eval()
    a, b = q(z), q(z)
    assert torch.equal(a.quantized, b.quantized) and torch.equal(a.quantized, (z > 0).float())
    q.train()
    z = z.requires_grad_(True)
    a, b = q(z), q(z)
    assert not torch.equal(a.indices, b.indices)
    assert set(a.quantized.detach().unique().tolist()) <= {0.0, 1.0}
    a.quantized.sum().backward()
    p = torch.sigmoid(z.detach())
    torch.testing.assert_close(z.grad, p * (1 - p))  # d/dz of b + p - sg(p)
    torch.testing.assert_close(a.loss, 0.5 * (p * (1 - p)).mean())
    # samples follow p
    logit = torch.full((1, 16, 64, 64), math.log(0.3 / 0.7))
    assert abs(q(logit).quantized.mean().item() - 0.3) < 0.02
    assert torch.equal(BernoulliBinary(16, deterministic=True).train()(z).quantized, (z > 0).float())


def test_bernoulli_refuses_more_than_62_bits():
    with pytest.raises(ValueError):
        BernoulliBinary(63)


# ------------------------------------------------------------------------------------------------
# KL
# ------------------------------------------------------------------------------------------------


def test_kl_matches_closed_form_and_scaling():
    q = KLGaussian(4, kl_weight=0.5)
    assert q.in_channels == 8 and q.out_channels == 4 and q.codebook_size is None and q.continuous
    mean, logvar = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    z = torch.cat([mean, logvar], 1)
    q.eval()
    out = q(z)
    assert out.indices is None and torch.equal(out.quantized, mean)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, (0.5 * logvar).exp()), torch.distributions.Normal(0.0, 1.0))
    torch.testing.assert_close(out.loss, 0.5 * expected.sum((1, 2, 3)).mean())
    q.train()
    big = torch.cat([torch.zeros(2, 4, 32, 32), torch.full((2, 4, 32, 32), math.log(4.0))], 1)  # std 2
    sample = q(big).quantized
    assert abs(sample.std().item() - 2.0) < 0.1
    latents = torch.randn(16, 4, 8, 8) * 3.0 + 1.0
    q.fit_scale_factor(latents)
    assert abs(q.to_model_latent(latents).std().item() - 1.0) < 1e-4
    torch.testing.assert_close(q.from_model_latent(q.to_model_latent(latents)), latents)
    assert "scale_factor" in q.state_dict()
    assert torch.equal(q.decode_indices(latents), latents)


# ------------------------------------------------------------------------------------------------
# Multi-scale VQ
# ------------------------------------------------------------------------------------------------


def test_msvq_phi_ticks_match_var():
    np.testing.assert_allclose(phi_ticks(4), np.linspace(1 / 12, 11 / 12, 4))
    np.testing.assert_allclose(phi_ticks(3), np.linspace(1 / 6, 5 / 6, 3))  # VAR uses 1/(2n) when n != 4
    q = MultiScaleVQ(4, 8, scales=(1, 2, 3, 4, 6, 8))
    ticks = np.linspace(1 / 12, 11 / 12, 4)
    assert q.phi_index == [int(np.argmin(np.abs(ticks - k / 5))) for k in range(6)] == [0, 0, 1, 2, 3, 3]
    assert len(MultiScaleVQ(4, 8, scales=(1, 2, 4), share_quant_resi=0).phis) == 3


def _smooth_latents(b=16, c=4, size=8, seed=3):
    g = torch.Generator().manual_seed(seed)
    f = 0
    for s, amp in [(1, 1.0), (2, 0.8), (4, 0.5), (8, 0.3)]:
        f = f + amp * F.interpolate(torch.randn(b, c, s, s, generator=g), size=(size, size), mode="bicubic")
    return f


@pytest.fixture(scope="module")
def fitted_msvq():
    torch.manual_seed(0)
    q = MultiScaleVQ(4, 64, scales=(1, 2, 4, 8))
    f = _smooth_latents()
    opt = torch.optim.Adam(q.parameters(), lr=2e-2)
    q.train()
    for _ in range(60):
        opt.zero_grad()
        q(f).loss.backward()
        opt.step()
    return q.eval(), f


def test_msvq_error_falls_scale_by_scale(fitted_msvq):
    q, f = fitted_msvq
    out = q(f)
    assert [tuple(i.shape[1:]) for i in out.indices] == [(s, s) for s in q.scales]
    errors = [F.mse_loss(q.decode_indices(out.indices[:k + 1]), f).item() for k in range(len(q.scales))]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.25 * f.pow(2).mean().item(), errors


def test_msvq_contributions_sum_to_output_and_next_input_chain(fitted_msvq):
    q, f = fitted_msvq
    out = q(f)
    total = sum(q.contribution(k, idx) for k, idx in enumerate(out.indices))
    torch.testing.assert_close(total, out.quantized, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(q.decode_indices(out.indices), out.quantized, atol=1e-5, rtol=1e-5)
    f_hat, next_ins = torch.zeros_like(f), []
    for k, idx in enumerate(out.indices):
        f_hat, nxt = q.next_input(f_hat, k, idx)
        torch.testing.assert_close(f_hat, q.decode_indices(out.indices[:k + 1]))
        if k + 1 < len(q.scales):
            assert nxt.shape == (f.shape[0], 4, q.scales[k + 1], q.scales[k + 1])
            next_ins.append(nxt)
        else:
            assert nxt is None
    torch.testing.assert_close(f_hat, out.quantized, atol=1e-5, rtol=1e-5)
    teacher = q.teacher_inputs(out.indices)
    total_tokens = sum(s * s for s in q.scales)
    assert teacher.shape == (f.shape[0], total_tokens - q.scales[0] ** 2, 4)
    torch.testing.assert_close(teacher, torch.cat([n.flatten(2).transpose(1, 2) for n in next_ins], 1))
    torch.testing.assert_close(q.teacher_inputs(out.indices[:-1]), teacher)  # the last map is not needed
    flat = [i.flatten(1) for i in out.indices]  # VAR's (B, s*s) layout is accepted too
    torch.testing.assert_close(q.teacher_inputs(flat), teacher)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert q.teacher_inputs(out.indices).dtype == torch.float32
    emb = q.embed(out.indices[1])
    torch.testing.assert_close(emb, q.embedding.weight[out.indices[1]].permute(0, 3, 1, 2))


def test_msvq_loss_gradients_by_hand_two_codes():
    """Two scales (1x1, 2x2), phi = identity, a 2-code codebook: the loss is
    1/2 sum_k [beta mse(sg f_k, z) + mse(f_k, sg z)], so dL/dz = 1/2 sum_k beta 2 (z - f_k)/n and
    dL/dE_j = 1/2 sum_k sum_(p, c) 2 (f_k - z)[p, c]/n [code j is in f_k at p]; f_0 = E[i_0] everywhere,
    f_1 = f_0 + E[i_1(p)]; written out with loops, indices by brute force."""
    beta = 0.25
    q = MultiScaleVQ(2, 2, scales=(1, 2), beta=beta, quant_resi=0.0).train()
    e = torch.tensor([[1.0, -0.5], [-0.8, 0.6]])
    with torch.no_grad():
        q.embedding.weight.copy_(e)
    z = torch.tensor([[[0.9, 1.3], [0.2, 1.6]], [[-0.4, 0.1], [0.5, -0.9]]]).unsqueeze(0)  # (1, 2, 2, 2)
    z.requires_grad_(True)
    out = q(z)
    out.loss.backward()

    zz = z.detach().double()[0]  # (2, 2, 2) = (C, H, W)
    ee = e.double()
    positions = [(0, 0), (0, 1), (1, 0), (1, 1)]

    def nearest(v):
        return min(range(2), key=lambda j: float(((v - ee[j]) ** 2).sum()))

    i0 = nearest(zz.mean(dim=(1, 2)))
    i1 = {p: nearest(zz[:, p[0], p[1]] - ee[i0]) for p in positions}
    assert [out.indices[0].item()] == [i0] and [out.indices[1][0][p].item() for p in positions] == [i1[p] for p in positions]
    f = [{p: ee[i0] for p in positions}, {p: ee[i0] + ee[i1[p]] for p in positions}]
    n = zz.numel()
    grad_z = torch.zeros(2, 2, 2, dtype=torch.float64)
    grad_e = torch.zeros(2, 2, dtype=torch.float64)
    for k in range(2):
        for p in positions:
            diff = f[k][p] - zz[:, p[0], p[1]]  # (C,)
            grad_z[:, p[0], p[1]] += 0.5 * beta * 2 * -diff / n
            grad_e[i0] += 0.5 * 2 * diff / n
            if k == 1:
                grad_e[i1[p]] += 0.5 * 2 * diff / n
    torch.testing.assert_close(z.grad[0].double(), grad_z, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(q.embedding.weight.grad.double(), grad_e, atol=1e-6, rtol=1e-5)
    loss = sum((1 + beta) * sum(((f[k][p] - zz[:, p[0], p[1]]) ** 2).sum() for p in positions) / n for k in range(2)) / 2
    torch.testing.assert_close(out.loss.double(), loss, atol=1e-6, rtol=1e-5)
    f_final = torch.stack([torch.stack([f[1][(h, w)] for w in range(2)], -1) for h in range(2)], -2)  # (C, H, W)
    torch.testing.assert_close(out.quantized[0].detach().double(), f_final, atol=1e-6, rtol=1e-5)


def test_msvq_shapes_and_errors():
    q = MultiScaleVQ(4, 16, scales=(1, 2, 3, 4, 6, 8))
    assert q.multiscale and q.token_shape((8, 8)) == [(1, 1), (2, 2), (3, 3), (4, 4), (6, 6), (8, 8)]
    with pytest.raises(ValueError, match="last scale"):
        q.token_shape((16, 16))
    with pytest.raises(ValueError):
        q(torch.randn(1, 4, 16, 16))
    with pytest.raises(ValueError):
        MultiScaleVQ(4, 16, scales=(1, 4, 2))
    q.eval()
    out = q(torch.randn(2, 4, 8, 8))
    for k in range(1, 7):
        assert q.decode_indices(out.indices[:k]).shape == (2, 4, 8, 8)
    cosine = MultiScaleVQ(4, 16, scales=(1, 2, 4), l2_norm=True).eval()
    r = torch.randn(2, 4, 4, 4)
    e = cosine.embedding.weight.detach()
    expected = (F.normalize(r.permute(0, 2, 3, 1), dim=-1) @ F.normalize(e, dim=-1).t()).argmax(-1)
    assert torch.equal(cosine.lookup(r), expected)


# ------------------------------------------------------------------------------------------------
# configs/tokenizer/*.yaml build working tokenizers
# ------------------------------------------------------------------------------------------------

CONFIG_NAMES = ["vq", "vq_ema", "vq_l2", "simvq", "lfq", "bsq", "bernoulli", "msvq", "kl"]


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_tokenizer_config_builds_and_runs(name):
    from pathlib import Path

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from tokenizers.autoencoder import Tokenizer

    folder = Path(__file__).resolve().parents[1] / "configs" / "tokenizer"
    node = OmegaConf.load(folder / f"{name}.yaml")
    assert list(node.defaults) == ["/_shared/autoencoder@_here_", "_self_"] and node.name == name
    assert node.quantizer._target_.startswith("tokenizers.")
    shared = folder.parent / "_shared" / "autoencoder.yaml"
    autoencoder = OmegaConf.merge(OmegaConf.load(shared).autoencoder, node.get("autoencoder", {}))
    autoencoder.ch = 16  # small and fast; the quantizer node is used as written
    tokenizer = Tokenizer(instantiate(node.quantizer), image_channels=1, **autoencoder).eval()
    images = torch.rand(2, 1, 32, 32) * 2 - 1
    recon, q = tokenizer(images)
    assert recon.shape == images.shape and q.loss.dim() == 0
    tokens = tokenizer.encode(images)
    torch.testing.assert_close(tokenizer.decode(tokens), recon, atol=1e-4, rtol=1e-4)
    shape = tokenizer.token_shape(32)
    if tokenizer.quantizer.multiscale:
        assert shape == [(s, s) for s in (1, 2, 3, 4, 6, 8)] and [t.shape[1:] for t in tokens] == shape
    elif not tokenizer.quantizer.continuous:
        assert shape == (8, 8) and tokens.shape == (2, 8, 8)
