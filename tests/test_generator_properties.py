"""Generator formulas checked against independent small computations (issue 9, "tests that must catch bugs").

- Classifier-free guidance by its formula: greedy sampling through the public samplers must pick the argmax of
  the guided logits recomputed here from two plain teacher-forced passes (cond and null class), for GPT
  (u + s (c - u), ``cfg_interval``) and VAR (the ramp (1+t) c - t u, t = cfg k/(K-1)); FlowAR's sampler must
  equal an Euler loop written here (v_u + w (v_c - v_u) while t <= guidance_until, w_k = (cfg-1) k/(K-1) + 1).
- 2D RoPE: one attention output rotated by hand, the relative-position property along rows and along columns,
  and which half of the pairs follows the row inside a one-layer GPT.
- VAR's cosine attention (learned per-head temperature, init 4, clamped at 100) computed by hand, and its AdaLN
  init (gamma rows x init_adaln_gamma) by the weight statistics it defines.
- The reference sampler runs the model in eval mode whatever mode it is in.

Only public entry points are used: constructors, parameters, the teacher-forced ``forward`` (``trunk`` for
FlowAR), ``decoding.ar.generate``, ``VAR.generate``, ``FlowAR.sample`` and ``Attention`` without a cache.
"""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from decoding.ar import SamplingConfig, generate
from generators.flowar import FlowHead
from generators.gpt import GPT
from generators.layers import Attention, rope_angles, rope_grid_angles
from generators.var import VAR
from tests.test_generators import (
    NC,
    SCALES,
    V,
    _seed,  # noqa: F401 (autouse: seed, one thread)
    jitter,
    tiny_flowar,
    tiny_gpt,
    tiny_var,
    var_batch,
)
from tokenizers.msvq import MultiScaleVQ


@pytest.fixture
def vq():
    """The tiny multi-scale VQ of test_generators.py (codes spread so index maps give distinct inputs)."""
    torch.manual_seed(1)
    q = MultiScaleVQ(dim=8, codebook_size=V, scales=SCALES)
    with torch.no_grad():
        q.embedding.weight.normal_()
    return q.eval()


def assert_greedy_follows(tokens: torch.Tensor, logits: torch.Tensor, margin: float = 1e-3) -> None:
    """tokens (B, L) are the argmax of logits (B, L, V) wherever the top two differ by more than ``margin``."""
    top2 = logits.topk(2, dim=-1).values  # (B, L, 2)
    clear = top2[..., 0] - top2[..., 1] > margin  # near-ties may flip between cached and full passes
    assert clear.float().mean() > 0.9, "too many near-ties for a meaningful check"
    wrong = (tokens != logits.argmax(-1)) & clear
    assert not wrong.any(), f"{int(wrong.sum())} of {int(clear.sum())} tokens are not the argmax at {wrong.nonzero()[:5].tolist()}"


def flat(indices) -> torch.Tensor:
    """[(B, s, s)] per scale -> (B, L) in the models' token order."""
    return torch.cat([i.reshape(i.shape[0], -1) for i in indices], dim=1)


def null_like(cond: torch.Tensor) -> torch.Tensor:
    return torch.full_like(cond, NC)


# ----------------------------------------------------------------------------------------------
# Classifier-free guidance
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("cfg_interval", [-1, 6])
def test_gpt_greedy_guidance_follows_the_formula(use_cache, cfg_interval):
    model = jitter(tiny_gpt(), std=0.3)
    cond, s = torch.tensor([0, 3, 7, 9]), 3.0
    tokens, _ = generate(model, cond, SamplingConfig(cfg_scale=s, temperature=0.0, cfg_interval=cfg_interval),
                         use_cache=use_cache)
    with torch.no_grad():
        c, u = model(tokens, cond), model(tokens, null_like(cond))  # (B, 16, V) plain teacher-forced passes
    guided = u + s * (c - u)
    n = 16 if cfg_interval < 0 else cfg_interval + 2  # LlamaGen: guidance for tokens 0..cfg_interval+1
    assert_greedy_follows(tokens, torch.cat([guided[:, :n], c[:, n:]], dim=1))
    # the check has power: on this model guidance changes the argmax at many positions
    assert (guided.argmax(-1) != c.argmax(-1)).float().mean() > 0.2


def var_guided_reference(model, vq, indices, cond, cfg):
    """VAR's ramp recomputed from two teacher-forced passes over the sampled maps -> guided logits (B, L, V)."""
    inputs = vq.teacher_inputs(indices)  # (B, L - 1, Cv)
    with torch.no_grad():
        c, u = model(indices, cond, inputs), model(indices, null_like(cond), inputs)
    K = len(SCALES)
    t = torch.cat([torch.full((s * s,), cfg * k / (K - 1)) for k, s in enumerate(SCALES)])[None, :, None]
    return (1 + t) * c - t * u, c


def test_var_greedy_guidance_ramp_follows_the_formula(vq):
    model = jitter(tiny_var(), std=0.3)
    cond, cfg = torch.tensor([1, 4, 9, 2, 0, 5]), 2.0
    indices, _ = generate(model, cond, SamplingConfig(cfg_scale=cfg, temperature=0.0), tokenizer=vq)
    guided, c = var_guided_reference(model, vq, indices, cond, cfg)
    assert_greedy_follows(flat(indices), guided)
    assert (guided.argmax(-1) != c.argmax(-1))[:, 1:].float().mean() > 0.2  # guidance matters on scales >= 1
    # VAR.generate directly (the entry point CoDe and the FID runs use) picks the same tokens
    direct = model.generate(vq, cond, cfg=cfg, temperature=0.0)
    assert all(torch.equal(a, b) for a, b in zip(direct, indices))


@torch.no_grad()
def euler_guided(head, noise, zc, zu, w, until, num_steps):
    """Euler from t=1 to 0 on the uniform grid, v = v_u + w (v_c - v_u) while t <= until, else v_c."""
    x, B = noise, noise.shape[0]
    ts = [1 - i / num_steps for i in range(num_steps + 1)]
    for t, t_next in itertools.pairwise(ts):
        tt = torch.full((B,), t)
        v = head(x, tt, zc)  # conditional velocity
        if t <= until:
            v_u = head(x, tt, zu)
            v = v_u + w * (v - v_u)
        x = x + (t_next - t) * v
    return x


def test_flow_head_guidance_formula_and_guidance_until():
    head = jitter(FlowHead(channels=4, cond_dim=8, width=32, depth=1), std=0.2)
    g = torch.Generator().manual_seed(0)
    zc, zu, noise = torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 4, generator=g)
    w, until, steps = 2.5, 0.5, 5  # grid 1, .8, .6 (unguided), .4, .2 (guided)
    got = head.sample(torch.cat([zc, zu]), num_steps=steps, cfg=w, guidance_until=until, noise=noise)
    want = euler_guided(head, noise, zc, zu, w, until, steps)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    # the check has power: guidance everywhere, or nowhere, gives visibly different samples
    assert (euler_guided(head, noise, zc, zu, w, 1.0, steps) - want).abs().max() > 1e-2
    assert (euler_guided(head, noise, zc, zu, 1.0, 1.0, steps) - want).abs().max() > 1e-2


def flowar_trunk_inputs(latents, S):
    """Scale-k latents (B, C, s_k, s_k) -> trunk inputs of scales 1.. (B, n, C): bicubic up to S, area down."""
    chunks = []
    for x, s_next in zip(latents[:-1], SCALES[1:]):
        up = F.interpolate(x, size=(S, S), mode="bicubic", align_corners=False)
        chunks.append(F.interpolate(up, size=(s_next, s_next), mode="area").flatten(2).transpose(1, 2))
    return torch.cat(chunks, dim=1)


@pytest.mark.parametrize("until", [0.6, 1.0])
def test_flowar_sampler_is_the_guided_euler_loop_per_scale(until):
    model = jitter(tiny_flowar(), std=0.2)
    cond, cfg, steps = torch.tensor([1, 5, 7]), 3.0, 4  # grid 1, .75 | .5, .25
    outs = model.sample(cond, num_steps=steps, cfg=cfg, guidance_until=until,
                        generator=torch.Generator().manual_seed(2), return_all=True)
    B, C, K = 3, model.latent_channels, len(SCALES)
    with torch.no_grad():  # teacher-forced trunk over the sampled latents, cond and null class
        inputs = flowar_trunk_inputs(outs, SCALES[-1])
        zc, zu = model.trunk(inputs, cond), model.trunk(inputs, null_like(cond))  # (B, L, D)
    g, begin, far = torch.Generator().manual_seed(2), 0, 0.0
    for k, s in enumerate(SCALES):
        noise = torch.randn(B, s * s, C, generator=g)  # the sampler's draw, scale by scale
        w = (cfg - 1) * k / (K - 1) + 1
        sl = slice(begin, begin + s * s)
        want = euler_guided(model.head, noise, zc[:, sl], zu[:, sl], w, until, steps)
        got = outs[k].flatten(2).transpose(1, 2)  # (B, s^2, C)
        # cached vs full trunk differ by float rounding, which guidance (w up to 3) amplifies
        assert torch.allclose(got, want, atol=5e-4, rtol=1e-4), (k, (got - want).abs().max())
        if k == K - 1:  # power: the other guidance window gives a different last scale
            other = euler_guided(model.head, noise, zc[:, sl], zu[:, sl], w, 1.6 - until, steps)
            far = (other - want).abs().max()
        begin += s * s
    assert far > 1e-2


# ----------------------------------------------------------------------------------------------
# Sampling runs in eval mode
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("use_cache", [True, False])
def test_gpt_sampling_in_train_mode_uses_eval_behaviour(use_cache):
    model = jitter(tiny_gpt(class_dropout=1.0, dropout=0.5), std=0.3).train()
    cond = torch.tensor([2, 5, 8])
    tokens, _ = generate(model, cond, SamplingConfig(cfg_scale=2.0, temperature=0.0), use_cache=use_cache)
    assert model.training  # the caller's mode is restored
    model.eval()
    with torch.no_grad():
        c, u = model(tokens, cond), model(tokens, null_like(cond))
    assert_greedy_follows(tokens, u + 2.0 * (c - u))  # no label dropout, no dropout


def test_var_and_flowar_sampling_in_train_mode_use_eval_behaviour(vq):
    var = jitter(tiny_var(class_dropout=1.0, drop_path=0.5), std=0.3).train()
    cond = torch.tensor([1, 4, 9, 2])
    indices, _ = generate(var, cond, SamplingConfig(cfg_scale=2.0, temperature=0.0), tokenizer=vq)
    assert var.training
    guided, _ = var_guided_reference(var.eval(), vq, indices, cond, 2.0)
    assert_greedy_follows(flat(indices), guided)

    flowar = jitter(tiny_flowar(class_dropout=1.0, dropout=0.5), std=0.2)
    want = flowar.sample(cond, num_steps=3, cfg=2.0, generator=torch.Generator().manual_seed(1))
    got, _ = generate(flowar.train(), cond, SamplingConfig(cfg_scale=2.0, num_steps=3), torch.Generator().manual_seed(1))
    assert flowar.training
    assert torch.allclose(got, want, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# 2D RoPE
# ----------------------------------------------------------------------------------------------

def hand_angles(row: float, col: float, head_dim: int, base: float = 10000.0) -> list[float]:
    """LlamaGen's 2D RoPE: pair j < head_dim/4 turns by row * base^(-4j/head_dim), the others by the column."""
    quarter = head_dim // 4
    freqs = [base ** (-2 * j / (head_dim // 2)) for j in range(quarter)]
    return [row * f for f in freqs] + [col * f for f in freqs]


def rotate(vec: torch.Tensor, angles: list[float]) -> torch.Tensor:
    """Rotate consecutive channel pairs (2j, 2j+1) of vec (Dh,) by angles[j]."""
    out = vec.clone()
    for j, a in enumerate(angles):
        x0, x1 = vec[2 * j].item(), vec[2 * j + 1].item()
        out[2 * j], out[2 * j + 1] = x0 * math.cos(a) - x1 * math.sin(a), x0 * math.sin(a) + x1 * math.cos(a)
    return out


def rope_of(pos, head_dim):
    """(row, col) pairs -> (cos, sin) (N, head_dim/2) from the code under test."""
    ang = rope_angles(torch.tensor([float(r) for r, _ in pos]), torch.tensor([float(c) for _, c in pos]), head_dim)
    return ang.cos().float(), ang.sin().float()


def test_rope_grid_is_raster_with_rows_first():
    h, w, hd = 3, 5, 8
    grid = rope_grid_angles(h, w, hd)  # (15, 4)
    for r in range(h):
        for c in range(w):
            assert torch.allclose(grid[r * w + c], torch.tensor(hand_angles(r, c, hd), dtype=grid.dtype)), (r, c)


def test_attention_with_rope_equals_a_hand_rotation():
    torch.manual_seed(0)
    dim, heads, hd = 16, 2, 8
    attn = jitter(Attention(dim, heads))
    pos = [(2, 5), (3, 1), (0, 4)]  # (row, col) of three tokens, causal
    x = torch.randn(1, 3, dim)
    with torch.no_grad():
        out = attn(x, rope_of(pos, hd), is_causal=True)[0]  # (3, dim)
        q, k, v = attn.qkv(x[0]).view(3, 3, heads, hd).unbind(1)  # each (N, heads, hd)
        ctx = torch.zeros(3, heads, hd)
        for i in range(3):
            for h in range(heads):
                qi = rotate(q[i, h], hand_angles(*pos[i], hd))
                scores = torch.stack([qi @ rotate(k[j, h], hand_angles(*pos[j], hd)) for j in range(i + 1)]) / math.sqrt(hd)
                ctx[i, h] = scores.softmax(0) @ v[:i + 1, h]
        want = attn.proj(ctx.reshape(3, dim))
    assert torch.allclose(out, want, atol=1e-5), (out - want).abs().max()


def two_token_output(attn, key_pos, query_pos, x):
    """Attention output of the query token (second) over [key, query] at the given grid positions."""
    with torch.no_grad():
        return attn(x, rope_of([key_pos, query_pos], attn.head_dim), is_causal=True)[0, 1]


@pytest.mark.parametrize("axis", [0, 1])
def test_rope_scores_depend_only_on_the_offset_along_each_axis(axis):
    torch.manual_seed(1)
    attn = jitter(Attention(16, 2))
    x = torch.randn(1, 2, 16)

    def at(key, query):
        return two_token_output(attn, key, query, x)

    shift = (3, 0) if axis == 0 else (0, 3)
    key, query = (1, 2), (2, 4)
    moved = tuple(a + b for a, b in zip(key, shift)), tuple(a + b for a, b in zip(query, shift))
    assert torch.allclose(at(key, query), at(*moved), atol=1e-5)  # same offset, same output
    only_query = tuple(a + b for a, b in zip(query, shift))
    assert (at(key, query) - at(key, only_query)).abs().max() > 1e-3  # another offset along this axis


def one_layer_gpt(keep: str) -> GPT:
    """A one-block GPT on a 2 x 8 grid whose queries only use the row pairs (or the column pairs) of RoPE."""
    model = jitter(GPT(V, NC, block_size=16, dim=32, depth=1, heads=2, grid_size=(2, 8)), std=0.3)
    attn = model.blocks[0].attn
    with torch.no_grad():
        wq = attn.qkv.weight[:32].view(attn.heads, attn.head_dim, 32)  # query rows, per head
        half = attn.head_dim // 2
        (wq[:, half:] if keep == "row" else wq[:, :half]).zero_()
    return model


def permuted(tokens, a, b):
    out = tokens.clone()
    out[:, [a, b]] = tokens[:, [b, a]]
    return out


def test_gpt_rotates_the_first_pairs_with_the_row_and_the_last_with_the_column():
    # one block: the output at slot p attends over slots < p with scores that depend only on the offsets the
    # query pairs see, so swapping two visible keys that share that coordinate changes nothing
    cond, tokens = torch.tensor([1, 6]), torch.randint(0, V, (2, 16))
    tokens[:, 1], tokens[:, 9] = (tokens[:, 0] + 1) % V, (tokens[:, 8] + 2) % V  # the swapped pairs differ
    rows, cols = one_layer_gpt("row"), one_layer_gpt("col")
    with torch.no_grad():
        # logits[:, p] comes from slot p holding token p-1: slots >= 10 see tokens 0..8 and hold neither 0, 1 nor 8
        base_r, base_c = rows(tokens, cond)[:, 10:], cols(tokens, cond)[:, 10:]
        same_row, same_col = permuted(tokens, 0, 1), permuted(tokens, 0, 8)  # (0,0)<->(0,1); (0,0)<->(1,0)
        assert torch.allclose(rows(same_row, cond)[:, 10:], base_r, atol=1e-5)
        assert (rows(same_col, cond)[:, 10:] - base_r).abs().max() > 1e-3
        assert torch.allclose(cols(same_col, cond)[:, 10:], base_c, atol=1e-5)
        assert (cols(same_row, cond)[:, 10:] - base_c).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------
# VAR: cosine attention with a learned temperature, AdaLN init
# ----------------------------------------------------------------------------------------------

def test_cosine_attention_with_learned_temperature_by_hand():
    torch.manual_seed(0)
    dim, heads, hd, n = 16, 2, 8, 4
    attn = Attention(dim, heads, qkv_bias=True, qk_l2_norm=True)
    assert torch.allclose(attn.log_scale.detach().flatten(), torch.full((heads,), math.log(4.0)))  # VAR's init
    x = torch.randn(1, n, dim)

    def by_hand(x, temps):
        q, k, v = attn.qkv(x[0]).view(n, 3, heads, hd).unbind(1)  # each (N, heads, hd)
        q, k = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
        scores = torch.einsum("ihd,jhd->hij", q, k) * torch.tensor(temps)[:, None, None]  # no 1/sqrt(hd)
        ctx = torch.einsum("hij,jhd->ihd", scores.softmax(-1), v)
        return attn.proj(ctx.reshape(n, dim))

    with torch.no_grad():
        assert torch.allclose(attn(x)[0], by_hand(x, [4.0, 4.0]), atol=1e-5)
        assert (by_hand(x, [4.0, 4.0]) - by_hand(x, [1.0, 1.0])).abs().max() > 1e-3  # power
        # nearly parallel tokens: cosines within ~1e-3 of each other, so 100 and 1000 weigh them differently
        x = torch.randn(1, 1, dim) + 0.02 * torch.randn(1, n, dim)
        attn.log_scale.copy_(torch.tensor([math.log(0.5), math.log(1000.0)]).view(1, heads, 1, 1))
        assert torch.allclose(attn(x)[0], by_hand(x, [0.5, 100.0]), atol=1e-5)  # clamped at 100
        assert (by_hand(x, [0.5, 100.0]) - by_hand(x, [0.5, 1000.0])).abs().max() > 1e-3  # power


def test_var_attention_temperature_is_learned(vq):
    model = jitter(tiny_var(), std=0.3)
    scales = [blk.attn.log_scale for blk in model.blocks]
    idx, inputs, cond = var_batch(vq)
    base = model(idx, cond, inputs)
    with torch.no_grad():
        for p in scales:
            p.fill_(0.0)  # temperature 1
    changed = model(idx, cond, inputs)
    assert (changed - base).abs().max() > 1e-3
    changed.logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in scales)


def test_var_adaln_init_scales_the_gamma_rows():
    # VAR: normal init with std sqrt(1/3C) (truncated or not), AdaLN rows x init_adaln, gamma rows x init_adaln_gamma
    C, gamma, adaln = 64, 1e-3, 0.5
    model = VAR(V, NC, SCALES, code_dim=8, depth=2, width=C, heads=2, init_adaln=adaln, init_adaln_gamma=gamma)
    std = math.sqrt(1 / (3 * C))
    for blk in model.blocks:
        w = blk.ada_lin[-1].weight  # (6C, C): rows gamma1, gamma2, scale1, scale2, shift1, shift2
        g, rest = w[:2 * C].std().item(), w[2 * C:].std().item()
        assert g / rest == pytest.approx(gamma / adaln, rel=0.1)  # same draws, scaled differently
        assert 0.8 * gamma * std < g < 1.1 * gamma * std  # 0.88 std when cut at 2 std
        assert (blk.ada_lin[-1].bias == 0).all()
