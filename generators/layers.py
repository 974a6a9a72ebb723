"""Transformer layers shared by GPT, VAR and FlowAR: norms, MLPs, 2D RoPE, attention and a static KV cache.

Attention runs through ``F.scaled_dot_product_attention``. Masks are boolean, True = may attend. The KV
cache is preallocated once per layer and written at explicit slots (one int for the whole batch, or a
tensor of per-row slots), read through views, so decoding allocates no buffers per step; rows roll back
independently (speculative decoding) and a draft tree is verified with its own mask.
"""
from __future__ import annotations

import math
import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from utils.heap import keeping_freed_memory


#################################################################################
#                                Norms and MLPs                                 #
#################################################################################

class RMSNorm(nn.Module):
    """Root-mean-square LayerNorm (Llama); ``affine=False`` drops the gain for AdaLN blocks.

    Not ``torch.nn.RMSNorm``: that one normalises in the input dtype, LlamaGen normalises in fp32 under bf16
    autocast and casts back (``.float()`` ... ``.type_as(x)``), which this keeps.
    """

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


# glibc serves every allocation above its largest mmap threshold (32 MB on 64-bit Linux) with fresh pages that
# fault in on first touch, on every call. CPU inference keeps its big temporaries below it, so freed heap
# memory is reused (benchmarks/RESULTS.md, "Sampling at the hardware limit").
MMAP_THRESHOLD_BYTES = 32 << 20
HEAP_CHUNK_BYTES = 16 << 20
ROW_BLOCK = 256  # chunks of a multiple of 256 rows gave bitwise the unchunked GEMM (MKL, AVX2); tests hold 1e-5


# oneDNN's linear with GELU(tanh) fused as a post-op (the kernel inductor emits for CPU inference): the GELU costs
# a fraction of ATen's separate gelu_ pass (VAR-d6 batch 16: forward 1.10x faster; benchmarks/RESULTS.md).
# None where this torch build has no oneDNN.
LINEAR_GELU = (getattr(torch.ops.mkldnn, "_linear_pointwise", None)
               if torch.backends.mkldnn.is_available() else None)


def cpu_inference(x: torch.Tensor) -> bool:
    """True for a CPU tensor outside autograd and autocast: the buffer-saving inference paths apply."""
    return x.device.type == "cpu" and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")


class Mlp(nn.Module):
    """GELU(tanh) MLP, fc1 -> act -> fc2 (VAR's FFN).

    Not timm's ``Mlp``: that applies dropout twice (after the activation and after fc2), VAR's FFN once.
    """

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or not cpu_inference(x):
            return self.drop(self.fc2(F.gelu(self.fc1(x), approximate="tanh")))
        # CPU inference: rows in chunks whose hidden activation stays in reused heap memory, GELU fused into fc1
        # (oneDNN) or in place
        flat = x.reshape(-1, x.shape[-1])  # (M, D)
        rows = HEAP_CHUNK_BYTES // (self.fc1.out_features * x.element_size())
        rows = max(ROW_BLOCK, rows - rows % ROW_BLOCK)  # whole GEMM row blocks: the same sums as one product
        out = flat.new_empty(flat.shape[0], self.fc2.out_features)  # (M, D_out)
        # under torch.compile inductor fuses fc1 and GELU itself (and lowers oneDNN's op only with frozen weights)
        fused = LINEAR_GELU is not None and x.dtype == torch.float32 and not torch.compiler.is_compiling()
        for i in range(0, flat.shape[0], rows):
            if fused:  # fc1 and GELU in one oneDNN call
                h = LINEAR_GELU(flat[i:i + rows], self.fc1.weight, self.fc1.bias, "gelu", [], "tanh")  # (m, hidden)
            else:
                h = self.fc1(flat[i:i + rows])  # (m, hidden)
                torch.ops.aten.gelu_(h, approximate="tanh")
            if self.fc2.bias is None:
                torch.mm(h, self.fc2.weight.t(), out=out[i:i + rows])
            else:
                torch.addmm(self.fc2.bias, h, self.fc2.weight.t(), out=out[i:i + rows])
        return out.view(*x.shape[:-1], -1)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample during training.

    The same computation as timm's ``DropPath`` (same Bernoulli draw, same 1/keep scaling); kept here because
    importing ``timm.layers`` costs about 2.5 s of CPU per process for these ten lines.
    """

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class ClassEmbedding(nn.Embedding):
    """Class embedding with a null class (row num_classes) that owns label dropout (DiT's LabelEmbedder).

    In training mode each label is replaced by the null class with probability ``dropout`` (classifier-free
    guidance); in eval mode labels pass unchanged. An nn.Embedding, so its state_dict key stays ``<name>.weight``.
    """

    def __init__(self, num_classes: int, dim: int, dropout: float = 0.0):
        super().__init__(num_classes + 1, dim)
        self.num_classes, self.dropout = num_classes, dropout

    def drop(self, labels: torch.Tensor) -> torch.Tensor:
        """labels (B,) -> labels with the null class where dropped (training only)."""
        if self.training and self.dropout > 0:
            dropped = torch.rand(labels.shape[0], device=labels.device) < self.dropout
            labels = torch.where(dropped, torch.full_like(labels, self.num_classes), labels)
        return labels

    def forward(self, labels: torch.Tensor, drop: bool = True) -> torch.Tensor:
        """labels (B,) -> (B, dim), after label dropout in training mode (``drop=False``: already dropped)."""
        return super().forward(self.drop(labels) if drop else labels)

    def with_null(self, labels: torch.Tensor) -> torch.Tensor:
        """labels (B,) -> [labels; null] (2B,): the batch that runs cond and uncond in one forward."""
        return torch.cat([labels, torch.full_like(labels, self.num_classes)])


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
    """Rotate consecutive channel pairs of x (B, H, N, Dh) by angles with cos/sin (N, Dh/2) or (B, N, Dh/2)."""
    if cos.dim() == 3:  # per-row positions: (B, N, Dh/2) -> (B, 1, N, Dh/2)
        cos, sin = cos[:, None], sin[:, None]
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

class CacheAccess(NamedTuple):
    """Where a forward pass writes its keys/values in the static cache and how much of it the queries read.

    slots: an int s (every row writes its n new entries at slots s..s+n-1) or an int64 tensor (B, n) of slots
    per row and input. kv_len: the queries attend over cache slots [0, kv_len) (None = the whole buffer, the
    static shape for compiled steps). The attention mask (if any) is over those kv_len slots.
    """

    slots: int | torch.Tensor
    kv_len: int | None = None


class KVCache:
    """Static per-layer K/V buffer (2, B, kv_heads, max_len, head_dim), written at explicit slots.

    Nothing is ever reallocated: ``write`` copies into the buffer (a slice for an int slot, ``index_put_`` for
    per-row slots) and ``view`` returns slices, so a decode step with fixed shapes allocates nothing new.
    Validity is the caller's contract: a query attends to the slots its mask (or the default causal-by-position
    mask) allows; rolling back a row is writing its next inputs at the rolled-back slots.
    """

    def __init__(self, batch_size: int, heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device=None, zero: bool = True):
        """zero=False leaves the buffer unfilled: only for callers that never read a slot they have not written."""
        # zeros by default: unwritten slots are masked out, but must not hold NaN/inf bit patterns
        alloc = torch.zeros if zero else torch.empty
        self.kv = alloc(2, batch_size, heads, max_len, head_dim, dtype=dtype, device=device)
        if self.kv.is_cuda:  # a fixed address: a compiled step mutates it in place inside a CUDA graph
            torch._dynamo.mark_static_address(self.kv)
        self.max_len = max_len
        self.rows = torch.arange(batch_size, device=device)[:, None]  # (B, 1) row index for per-row writes

    @property
    def batch_size(self) -> int:
        return self.kv.shape[1]

    def write(self, k: torch.Tensor, v: torch.Tensor, slots: int | torch.Tensor) -> None:
        """Store k, v (b, heads, n, head_dim) at ``slots`` (int start, or (b, n) per-row slots)."""
        b, n = k.shape[0], k.shape[2]
        if b > self.batch_size:
            raise RuntimeError(f"KV cache holds batch {self.batch_size}, got {b}")
        if isinstance(slots, int):
            if slots < 0 or slots + n > self.max_len:
                raise RuntimeError(f"KV cache overflow: slots {slots}..{slots + n - 1} outside max_len {self.max_len}")
            self.kv[0, :b, :, slots:slots + n] = k
            self.kv[1, :b, :, slots:slots + n] = v
        else:
            rows = self.rows[:b]  # (b, 1)
            # advanced indices on dims 0 and 2 -> the indexed view is (b, n, heads, head_dim)
            self.kv[0][rows, :, slots] = k.transpose(1, 2)
            self.kv[1][rows, :, slots] = v.transpose(1, 2)

    def view(self, b: int, kv_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v of the first b rows over slots [0, kv_len): 2 x (b, heads, kv_len, head_dim) views."""
        kv_len = self.max_len if kv_len is None else kv_len
        return self.kv[0, :b, :, :kv_len], self.kv[1, :b, :, :kv_len]

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy the entries at slots src (B, n) to slots dst (B, n) row by row (keep an accepted tree path)."""
        rows = self.rows[:src.shape[0]]
        for i in range(2):
            picked = self.kv[i][rows, :, src]  # (B, n, heads, head_dim), a copy: safe when src and dst overlap
            self.kv[i][rows, :, dst] = picked


#################################################################################
#                                  Attention                                    #
#################################################################################

def _l2_normalize_(x: torch.Tensor, gain: torch.Tensor | None = None, eps: float = 1e-12) -> torch.Tensor:
    """x (..., D) * gain / max(||x||, eps) in place (F.normalize's eps); the factor in float32 for any dtype of x."""
    factor = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32).clamp_min_(eps).reciprocal_()
    if gain is not None:
        factor.mul_(gain)  # (..., 1), gain broadcast over its leading dims
    return x.mul_(factor)


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
        sizes = [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim]
        if (cpu_inference(x) and b * n * sum(sizes) * x.element_size() > MMAP_THRESHOLD_BYTES
                and not keeping_freed_memory()):
            # three products instead of one output above glibc's mmap threshold (page faults on every call); with
            # utils/heap.keep_freed_memory nothing is mmapped and the one product is faster (VAR-d16: 3-10 %)
            ws = self.qkv.weight.split(sizes)
            bs = bias.split(sizes) if bias is not None else (None, None, None)
            q, k, v = (F.linear(x, w, bb) for w, bb in zip(ws, bs))  # (B, N, D), 2 x (B, N, kv_dim)
        else:
            qkv = F.linear(x, self.qkv.weight, bias)  # (B, N, D + 2 kv_dim)
            q, k, v = qkv.split(sizes, dim=-1)
        q = q.view(b, n, self.heads, self.head_dim).transpose(1, 2)  # (B, H, N, Dh)
        k = k.view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, N, Dh)
        v = v.view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def normalize_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """VAR's cosine attention: q (B, H, N, Dh) and k (B, Hkv, N, Dh) l2-normalised, q times the head's temperature.

        Outside autograd in place on the fresh projection, the temperature folded into q's factor: one read for
        the norms and one multiply per tensor (F.normalize and the product: three passes over q, two over k).
        """
        temperature = self.log_scale.clamp(max=self.max_log_scale).exp()  # (1, H, 1, 1)
        if torch.is_grad_enabled():
            return F.normalize(q, dim=-1) * temperature.to(q.dtype), F.normalize(k, dim=-1)
        return _l2_normalize_(q, temperature), _l2_normalize_(k)

    def repeat_kv(self, t: torch.Tensor) -> torch.Tensor:
        """(B, kv_heads, T, Dh) -> (B, heads, T, Dh): query head h reads kv head h // (heads / kv_heads)."""
        return t if self.kv_heads == self.heads else t.repeat_interleave(self.heads // self.kv_heads, dim=1)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                mask: torch.Tensor | None = None, is_causal: bool = False,
                cache: CacheAccess | None = None) -> torch.Tensor:
        """x (B, N, D) -> (B, N, D). mask: bool, True = may attend, broadcastable to (B, heads, N, T).

        Without ``cache`` the keys are x's own (T = N). With ``cache`` the new k/v are written to
        ``self.cache`` at ``cache.slots`` and the queries attend over cache slots [0, cache.kv_len) (T = kv_len).
        rope: cos/sin (N, head_dim/2), or (B, N, head_dim/2) for per-row positions.
        """
        b, n, d = x.shape
        q, k, v = self.project_qkv(x)  # (B, H, N, Dh), k and v (B, Hkv, N, Dh)
        scale = None
        if self.qk_l2_norm:
            q, k = self.normalize_qk(q, k)
            scale = 1.0
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            if self.cache is None:
                raise RuntimeError("a cached forward needs a cache: call setup_cache(...) first")
            self.cache.write(k.to(self.cache.kv.dtype), v.to(self.cache.kv.dtype), cache.slots)
            k, v = self.cache.view(b, cache.kv_len)  # (B, H, T, Dh)
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
    """setup / roll back / free the KV caches of ``self.blocks[i].attn`` (GPT, VAR and FlowAR's trunk).

    The subclass sets ``self.max_cache_len`` (the longest sequence it can decode). Besides the buffers the
    mixin keeps the cache length: ``cache_length`` (an int while every row holds the same number of slots,
    as after ``prefill`` and uniform steps; None after per-row steps) and ``cache_lengths`` ((B,) int64 on
    the device, always).
    """

    blocks: nn.ModuleList
    max_cache_len: int

    def setup_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None,
                    device=None, zero: bool = True) -> None:
        """Allocate a fresh static cache per layer: (2, batch_size, heads, max_len, head_dim).

        dtype defaults to the autocast dtype when autocast is on (so k/v are stored without casts),
        else to the parameters' dtype; max_len defaults to ``max_cache_len``. ``zero=False`` skips the zero
        fill, for a caller whose queries only ever read slots it has written (VAR's per-scale sampler).
        """
        ref = next(self.parameters())
        device = torch.device(device) if device is not None else ref.device
        if dtype is None:
            on = torch.is_autocast_enabled(device.type)
            dtype = torch.get_autocast_dtype(device.type) if on else ref.dtype
        max_len = max_len or self.max_cache_len
        for blk in self.blocks:
            attn = blk.attn
            attn.cache = KVCache(batch_size, attn.kv_heads, max_len, attn.head_dim, dtype, device, zero)
        self._slot_ids = torch.arange(max_len, device=device)  # (max_len,) for position masks
        self._lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,)
        self._uniform_length: int | None = 0

    def free_cache(self) -> None:
        """Drop every layer's cache (frees its memory)."""
        for blk in self.blocks:
            blk.attn.cache = None
        self._uniform_length = None

    @property
    def has_cache(self) -> bool:
        return self.blocks[0].attn.cache is not None

    @property
    def cache_length(self) -> int | None:
        """Valid slots when all rows agree (0 without a cache), None after a per-row step or rollback."""
        return self._uniform_length if self.has_cache else 0

    @property
    def cache_lengths(self) -> torch.Tensor:
        """(B,) int64: valid slots of every row."""
        self._check_cache()
        return self._lengths

    def truncate_cache(self, length: int) -> None:
        """Roll every row back to its first ``length`` slots (later slots are overwritten by the next step)."""
        self._check_cache()
        cur = self._uniform_length
        if length < 0 or (cur is not None and length > cur):
            raise ValueError(f"cannot truncate a cache of length {cur} to {length}")
        self._set_length(length)

    def rollback(self, lengths: torch.Tensor) -> None:
        """Per-row rollback: row b keeps slots [0, lengths[b]) ((B,) int64; no host sync).

        The next ``step`` of row b writes at positions starting at lengths[b]; with the default causal mask
        (key slot j visible to a query at position p iff j <= p) no stale slot is ever read.
        """
        self._check_cache()
        self._lengths.copy_(lengths)
        self._uniform_length = None

    def move_cache(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy cache entries at slots src (B, n) to slots dst (B, n) in every layer (keep an accepted tree path)."""
        self._check_cache()
        for blk in self.blocks:
            blk.attn.cache.move(src, dst)

    # -- used by the models' cached forwards ---------------------------------------------------------
    def _set_length(self, length: int) -> None:
        self._uniform_length = length
        self._lengths.fill_(length)

    def _check_cache(self) -> None:
        if not self.has_cache:
            raise RuntimeError("no KV cache: call setup_cache(batch_size, max_len, dtype, device) first")

    def _check_start(self, start: int) -> None:
        """A uniform step must start where every row's cache ends (truncate_cache first to roll back)."""
        self._check_cache()
        if self._uniform_length is not None and start != self._uniform_length:
            raise ValueError(f"a step at position {start}, but the cache holds {self._uniform_length} positions; "
                             f"roll back with truncate_cache({start}) first, or continue at {self._uniform_length}")

    def position_mask(self, positions: torch.Tensor, kv_len: int | None = None) -> torch.Tensor:
        """Causal mask by position for per-row queries: positions (B, n) -> bool (B, 1, n, kv_len).

        Key slot j is visible to a query at position p iff j <= p (slot j holds position j).
        """
        slots = self._slot_ids if kv_len is None else self._slot_ids[:kv_len]
        return (slots[None, None, :] <= positions[:, :, None])[:, None]  # (B, 1, n, T)


#################################################################################
#                              Forward-pass counting                            #
#################################################################################

def compiled_step(step, counted: nn.Module, mode: str | None = None, graphs: int = 1):
    """``step`` under torch.compile with fixed shapes (``mode`` as torch.compile's: "reduce-overhead" = CUDA graphs),
    each call recorded on ``counted``'s forward counter (a compiled graph runs no Python hooks).

    ``graphs``: how many shapes the step is called with (VAR: one per scale); dynamo's recompile limit is raised
    to fit them while the step runs, so no shape silently falls back to eager.
    """
    compiled = torch.compile(step, mode=mode, dynamic=False)
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"

    def run(*args, **kwargs):
        count_calls.record(counted)
        with config.patch(**{limit: max(getattr(config, limit), graphs + 1)}):
            return compiled(*args, **kwargs)
    return run


class count_calls:
    """Count the calls of a module inside a block: ``with count_calls(model.blocks[0]) as c: ...; c.count``.

    A hook, so the model keeps no per-call state; a [cond; uncond] batch is one call. A compiled step runs no
    Python hooks (tracing one that bumps an int recompiles on every call): the hook does nothing under
    torch.compile and the compiled step's caller counts its call with ``count_calls.record(module)``.
    """

    _active: "weakref.WeakKeyDictionary[nn.Module, list[count_calls]]" = weakref.WeakKeyDictionary()

    def __init__(self, module: nn.Module):
        self.module, self.count = module, 0

    def _hook(self, *_):
        if not torch.compiler.is_compiling():
            self.count += 1

    @classmethod
    def record(cls, module: nn.Module) -> None:
        """One call of ``module`` made inside a compiled graph: every open counter of it counts it."""
        for counter in cls._active.get(module, ()):
            counter.count += 1

    def __enter__(self):
        self.handle = self.module.register_forward_pre_hook(self._hook)
        count_calls._active.setdefault(self.module, []).append(self)
        return self

    def __exit__(self, *exc):
        self.handle.remove()
        count_calls._active[self.module].remove(self)
