"""Transformer layers shared by GPT, VAR and FlowAR: norms, MLPs, 2D RoPE, attention and a static KV cache.

Attention runs through ``F.scaled_dot_product_attention``. Masks are boolean, True = may attend. The KV
cache is preallocated once per layer, written in place and read through views, so decoding allocates
nothing per step; ``truncate`` rolls it back for speculative decoding.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


#################################################################################
#                                Norms and MLPs                                 #
#################################################################################

class RMSNorm(nn.Module):
    """Root-mean-square LayerNorm (Llama); ``affine=False`` drops the gain for AdaLN blocks."""

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)
        return y * self.weight if self.weight is not None else y


def swiglu_hidden(dim: int, mlp_ratio: float, multiple_of: int = 8) -> int:
    """Llama's SwiGLU width: 2/3 of mlp_ratio * dim (same parameter count as a GELU MLP), rounded up."""
    hidden = int(2 * mlp_ratio * dim / 3)
    return multiple_of * math.ceil(hidden / multiple_of)


class SwiGLU(nn.Module):
    """Llama feed-forward: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class Mlp(nn.Module):
    """GELU(tanh) MLP, fc1 -> act -> fc2 (VAR's FFN)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(F.gelu(self.fc1(x), approximate="tanh")))


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample during training."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """AdaLN modulation x * (1 + scale) + shift; shift/scale are (B, D) or per token (B, N, D)."""
    if shift.dim() == 2:
        shift, scale = shift.unsqueeze(1), scale.unsqueeze(1)
    return x * (1 + scale) + shift


#################################################################################
#                                   2D RoPE                                     #
#################################################################################

def rope_angles(pos_y: torch.Tensor, pos_x: torch.Tensor, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """Rotation angles of 2D RoPE (LlamaGen layout): (N,) row/column positions -> (N, head_dim // 2).

    The first head_dim/4 pairs rotate with the row, the last head_dim/4 with the column, each with the
    1D frequencies base^(-2i / (head_dim/2)). Positions may be fractional; zero angles = identity.
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
    half = head_dim // 2
    freqs = 1.0 / base ** (torch.arange(0, half, 2, dtype=torch.float64) / half)  # (head_dim/4,)
    ang_y = pos_y.double()[:, None] * freqs  # (N, head_dim/4)
    ang_x = pos_x.double()[:, None] * freqs
    return torch.cat([ang_y, ang_x], dim=-1)  # (N, head_dim/2)


def rope_grid_angles(h: int, w: int, head_dim: int, base: float = 10000.0, step: float = 1.0,
                     offset: float = 0.0) -> torch.Tensor:
    """Angles for an h x w grid in raster order, position = offset + step * index -> (h*w, head_dim // 2)."""
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return rope_angles(offset + step * ys.flatten(), offset + step * xs.flatten(), head_dim, base)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive channel pairs of x (B, H, N, Dh) by angles with cos/sin (N, Dh/2); same shape out."""
    xf = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, H, N, Dh/2, 2)
    x0, x1 = xf.unbind(-1)
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)  # (B, H, N, Dh/2, 2)
    return out.flatten(-2).type_as(x)


#################################################################################
#                          Block-causal (scale-wise) masks                      #
#################################################################################

def scale_levels(scales) -> torch.Tensor:
    """(L,) int64: the scale index of every token, L = sum(s*s)."""
    return torch.cat([torch.full((s * s,), k, dtype=torch.long) for k, s in enumerate(scales)])


def scale_bounds(scales) -> list[tuple[int, int]]:
    """[(begin, end)] token range of every scale in the flattened sequence."""
    bounds, begin = [], 0
    for s in scales:
        bounds.append((begin, begin + s * s))
        begin += s * s
    return bounds


def block_causal_mask(scales) -> torch.Tensor:
    """(L, L) bool, True where level(query) >= level(key): full within a scale, causal across scales."""
    lvl = scale_levels(scales)
    return lvl[:, None] >= lvl[None, :]


#################################################################################
#                                  KV cache                                     #
#################################################################################

class KVCache:
    """Static per-layer K/V buffer (2, B, heads, max_len, head_dim); ``length`` slots are valid."""

    def __init__(self, batch_size: int, heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device=None):
        # one buffer for k and v, never reallocated: append writes in place and returns views
        self.kv = torch.empty(2, batch_size, heads, max_len, head_dim, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, heads, n, head_dim) at [length, length+n); return all valid k, v (B, heads, length, hd)."""
        b, n = k.shape[0], k.shape[2]
        end = self.length + n
        if end > self.max_len:
            raise RuntimeError(f"KV cache overflow: {end} > max_len {self.max_len}")
        if b > self.kv.shape[1]:
            raise RuntimeError(f"KV cache holds batch {self.kv.shape[1]}, got {b}")
        self.kv[0, :b, :, self.length:end] = k
        self.kv[1, :b, :, self.length:end] = v
        self.length = end
        return self.kv[0, :b, :, :end], self.kv[1, :b, :, :end]

    def truncate(self, length: int) -> None:
        """Roll back to the first ``length`` slots (speculative rejection); later slots get overwritten."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of length {self.length} to {length}")
        self.length = length

    def reset(self) -> None:
        self.length = 0


#################################################################################
#                                  Attention                                    #
#################################################################################

class Attention(nn.Module):
    """Multi-head self-attention over SDPA, with optional 2D RoPE, q/k l2-norm and a KV cache."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = False, qk_l2_norm: bool = False,
                 attn_dropout: float = 0.0, proj_dropout: float = 0.0, proj_bias: bool = True,
                 kv_heads: int | None = None, zero_k_bias: bool = False):
        """kv_heads: grouped-query attention (LlamaGen's n_kv_head), k/v projected to kv_heads heads and each shared
        by heads / kv_heads query heads; None = heads. zero_k_bias (with qkv_bias): VAR's bias layout, learned q and
        v biases and a fixed zero k bias (parameters ``q_bias``, ``v_bias``)."""
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.kv_heads = kv_heads or heads
        if heads % self.kv_heads:
            raise ValueError(f"heads {heads} is not a multiple of kv_heads {self.kv_heads}")
        kv_dim = self.kv_heads * self.head_dim
        self.qkv = nn.Linear(dim, dim + 2 * kv_dim, bias=qkv_bias and not zero_k_bias)  # rows [q | k | v]
        if qkv_bias and zero_k_bias:
            self.q_bias, self.v_bias = nn.Parameter(torch.zeros(dim)), nn.Parameter(torch.zeros(kv_dim))
            self.register_buffer("zero_k_bias", torch.zeros(kv_dim), persistent=False)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.attn_dropout = attn_dropout
        self.proj_drop = nn.Dropout(proj_dropout)
        self.qk_l2_norm = qk_l2_norm
        if qk_l2_norm:
            # VAR: cosine attention with a learned per-head temperature, init 4, clamped at 100
            self.log_scale = nn.Parameter(torch.full((1, heads, 1, 1), math.log(4.0)))
            self.max_log_scale = math.log(100.0)
        self.cache: KVCache | None = None

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, N, D) -> q (B, heads, N, Dh), k and v (B, kv_heads, N, Dh)."""
        b, n, _ = x.shape
        bias = self.qkv.bias
        if hasattr(self, "q_bias"):
            bias = torch.cat([self.q_bias, self.zero_k_bias, self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias)  # (B, N, D + 2 kv_dim)
        q, k, v = qkv.split([self.heads * self.head_dim, self.kv_heads * self.head_dim,
                             self.kv_heads * self.head_dim], dim=-1)
        q = q.view(b, n, self.heads, self.head_dim).transpose(1, 2)  # (B, H, N, Dh)
        k = k.view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, N, Dh)
        v = v.view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def repeat_kv(self, t: torch.Tensor) -> torch.Tensor:
        """(B, kv_heads, T, Dh) -> (B, heads, T, Dh): query head h reads kv head h // (heads / kv_heads)."""
        return t if self.kv_heads == self.heads else t.repeat_interleave(self.heads // self.kv_heads, dim=1)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                mask: torch.Tensor | None = None, is_causal: bool = False, use_cache: bool = False) -> torch.Tensor:
        """x (B, N, D) -> (B, N, D). mask: bool (N, T) or broadcastable to (B, heads, N, T), T = keys seen.

        With ``use_cache`` the new k/v are appended to ``self.cache`` and the queries attend to every valid
        cached slot (T = cache length after the append).
        """
        b, n, d = x.shape
        q, k, v = self.project_qkv(x)  # (B, H, N, Dh), k and v (B, Hkv, N, Dh)
        scale = None
        if self.qk_l2_norm:
            q = F.normalize(q, dim=-1) * self.log_scale.clamp(max=self.max_log_scale).exp().to(q.dtype)
            k = F.normalize(k, dim=-1)
            scale = 1.0
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if use_cache:
            if self.cache is None:
                raise RuntimeError("use_cache=True but no cache: call setup_cache(...) first")
            k, v = self.cache.append(k.to(self.cache.kv.dtype), v.to(self.cache.kv.dtype))  # (B, H, T, Dh)
            k, v = k.to(q.dtype), v.to(q.dtype)
        k, v = self.repeat_kv(k), self.repeat_kv(v)  # (B, H, T, Dh); a cache stores kv_heads heads
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal and mask is None,
            dropout_p=self.attn_dropout if self.training else 0.0, scale=scale)  # (B, H, N, Dh)
        out = out.transpose(1, 2).reshape(b, n, d)  # (B, N, D)
        return self.proj_drop(self.proj(out))


#################################################################################
#                         Cache management for a block stack                    #
#################################################################################

class CachedBlocksMixin:
    """setup/truncate/free the KV caches of ``self.blocks[i].attn`` (GPT, VAR and FlowAR's trunk).

    The subclass sets ``self.max_cache_len`` (the longest sequence it can decode).
    """

    blocks: nn.ModuleList
    max_cache_len: int

    def setup_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None,
                    device=None) -> None:
        """Allocate a fresh static cache per layer: (2, batch_size, heads, max_len, head_dim).

        dtype defaults to the autocast dtype when autocast is on (so k/v are stored without casts),
        else to the parameters' dtype; max_len defaults to ``max_cache_len``.
        """
        ref = next(self.parameters())
        device = torch.device(device) if device is not None else ref.device
        if dtype is None:
            on = torch.is_autocast_enabled(device.type)
            dtype = torch.get_autocast_dtype(device.type) if on else ref.dtype
        max_len = max_len or self.max_cache_len
        for blk in self.blocks:
            attn = blk.attn
            attn.cache = KVCache(batch_size, attn.kv_heads, max_len, attn.head_dim, dtype, device)

    def truncate_cache(self, length: int) -> None:
        """Keep the first ``length`` cached positions in every layer (speculative rollback)."""
        for blk in self.blocks:
            self._cache_of(blk).truncate(length)

    def free_cache(self) -> None:
        """Drop every layer's cache (frees its memory)."""
        for blk in self.blocks:
            blk.attn.cache = None

    @property
    def cache_length(self) -> int:
        """Number of valid cached positions (0 when no cache is set up)."""
        cache = self.blocks[0].attn.cache
        return 0 if cache is None else cache.length

    @staticmethod
    def _cache_of(blk) -> KVCache:
        if blk.attn.cache is None:
            raise RuntimeError("no KV cache: call setup_cache(batch_size, max_len, dtype, device) first")
        return blk.attn.cache
