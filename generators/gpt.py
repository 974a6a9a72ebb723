"""Raster-order class-conditional GPT over image tokens (LlamaGen-style: RMSNorm, SwiGLU, 2D RoPE).

Sequence layout (the same for training and for the KV cache): slot 0 is the class token, slot p >= 1 holds
image token p-1, and the output at slot p predicts image token p. The class token's RoPE angles are zero
(identity rotation); image token t is rotated by its (row, col) on the h x w grid. The null class id
``num_classes`` is the unconditional label for classifier-free guidance.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from generators.layers import Attention, CachedBlocksMixin, RMSNorm, SwiGLU, rope_grid_angles, swiglu_hidden


#################################################################################
#                                    Blocks                                     #
#################################################################################

class Block(nn.Module):
    """Pre-norm Llama block: x + attn(norm(x)), then x + swiglu(norm(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0, norm_eps: float = 1e-6,
                 multiple_of: int = 8, kv_heads: int | None = None):
        super().__init__()
        self.attn_norm = RMSNorm(dim, norm_eps)
        self.attn = Attention(dim, heads, proj_dropout=dropout, proj_bias=False, kv_heads=kv_heads)
        self.ffn_norm = RMSNorm(dim, norm_eps)
        self.ffn = SwiGLU(dim, swiglu_hidden(dim, mlp_ratio, multiple_of), dropout)

    def forward(self, x, rope, mask=None, is_causal=False, use_cache=False):
        x = x + self.attn(self.attn_norm(x), rope, mask, is_causal, use_cache)
        return x + self.ffn(self.ffn_norm(x))


#################################################################################
#                                     GPT                                       #
#################################################################################

class GPT(CachedBlocksMixin, nn.Module):
    """Class-conditional raster GPT with a static KV cache for incremental and windowed decoding."""

    def __init__(self, vocab_size: int, num_classes: int, block_size: int, dim: int = 768, depth: int = 12,
                 heads: int = 12, mlp_ratio: float = 4.0, class_dropout: float = 0.1, dropout: float = 0.0,
                 grid_size: tuple[int, int] | None = None, rope_base: float = 10000.0, norm_eps: float = 1e-6,
                 multiple_of: int = 8, kv_heads: int | None = None, class_rope: str = "identity"):
        """norm_eps, multiple_of (SwiGLU width rounding), kv_heads (GQA) and class_rope ("identity": the class slot
        is not rotated; "zero": LlamaGen's all-zero cos/sin row, which zeroes the class token's q and k) are the
        knobs an imported LlamaGen model sets (1e-5, 256, n_kv_head, "zero")."""
        super().__init__()
        if class_rope not in ("identity", "zero"):
            raise ValueError(f"class_rope={class_rope!r}; use 'identity' (tokar) or 'zero' (LlamaGen)")
        if grid_size is None:
            side = math.isqrt(block_size)
            if side * side != block_size:
                raise ValueError(f"block_size {block_size} is not a square; pass grid_size=(h, w)")
            grid_size = (side, side)
        if grid_size[0] * grid_size[1] != block_size:
            raise ValueError(f"grid_size {grid_size} does not hold block_size {block_size} tokens")
        self.vocab_size, self.num_classes, self.block_size = vocab_size, num_classes, block_size
        self.grid_size, self.dim, self.class_dropout = tuple(grid_size), dim, class_dropout
        self.max_cache_len = block_size + 1  # class token + every image token (the last one only in windows)

        self.cls_embed = nn.Embedding(num_classes + 1, dim)  # row num_classes = null class
        self.tok_embed = nn.Embedding(vocab_size, dim)
        self.tok_drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio, dropout, norm_eps, multiple_of, kv_heads)
                                     for _ in range(depth)])
        self.norm = RMSNorm(dim, norm_eps)
        self.head = nn.Linear(dim, vocab_size, bias=False)

        # RoPE per slot: slot 0 (class) identity (or all-zero cos/sin), slot p >= 1 the grid position of image token p-1
        head_dim = dim // heads
        angles = torch.cat([torch.zeros(1, head_dim // 2, dtype=torch.float64),
                            rope_grid_angles(*self.grid_size, head_dim, rope_base)])  # (block_size+1, head_dim/2)
        cos = angles.cos()
        if class_rope == "zero":
            cos[0] = 0.0
        self.register_buffer("rope_cos", cos.float(), persistent=False)
        self.register_buffer("rope_sin", angles.sin().float(), persistent=False)

        self.last_hidden: torch.Tensor | None = None  # (B, n, dim): input of `head` at the last call's slots
        self.initialize_weights()

    def initialize_weights(self):
        # LlamaGen: normal(0, 0.02) for linears and embeddings, zero output head
        def _init(m):
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        self.apply(_init)
        nn.init.zeros_(self.head.weight)

    # -- helpers ------------------------------------------------------------------------------
    def drop_labels(self, cond: torch.Tensor) -> torch.Tensor:
        """Replace labels by the null class with probability class_dropout (training only)."""
        if self.training and self.class_dropout > 0:
            drop = torch.rand(cond.shape[0], device=cond.device) < self.class_dropout
            cond = torch.where(drop, torch.full_like(cond, self.num_classes), cond)
        return cond

    def _rope(self, start: int, end: int):
        return self.rope_cos[start:end], self.rope_sin[start:end]  # (n, head_dim/2) each

    def _run(self, x, start, mask=None, is_causal=False, use_cache=False) -> torch.Tensor:
        """Blocks + norm + head on x (B, n, D) occupying slots [start, start+n) -> logits (B, n, V) float."""
        if start + x.shape[1] > self.rope_cos.shape[0]:
            raise ValueError(f"slots up to {start + x.shape[1]} exceed block_size + 1 = {self.rope_cos.shape[0]}")
        rope = self._rope(start, start + x.shape[1])
        for blk in self.blocks:
            x = blk(x, rope, mask, is_causal, use_cache)
        h = self.norm(x)  # (B, n, D)
        self.last_hidden = h
        return self.head(h).float()  # (B, n, V)

    # -- teacher forcing ----------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """tokens (B, L) int64 raster order, cond (B,) -> logits (B, L, V); logits[:, i] predicts tokens[:, i].

        The input is [class, tokens[:, :-1]]: tokens[:, -1] is only a target. Labels are dropped to the
        null class with probability class_dropout in training mode.
        """
        cond = self.drop_labels(cond)
        x = torch.cat([self.cls_embed(cond)[:, None], self.tok_embed(tokens[:, :-1])], dim=1)  # (B, L, D)
        return self._run(self.tok_drop(x), 0, is_causal=True)

    # -- incremental decoding over the KV cache ------------------------------------------------
    @property
    def num_cached_tokens(self) -> int:
        """Image tokens in the cache (cache length minus the class slot)."""
        return max(self.cache_length - 1, 0)

    def prefill(self, cond: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Reset the cache and feed [class, tokens]: cond (B,), tokens (B, n) or None -> logits (B, n+1, V).

        logits[:, j] predicts image token j; the last row is the next token's distribution. Afterwards
        the cache length is n + 1.
        """
        self.truncate_cache(0)
        x = self.cls_embed(cond)[:, None]  # (B, 1, D)
        if tokens is not None and tokens.shape[1] > 0:
            x = torch.cat([x, self.tok_embed(tokens)], dim=1)  # (B, n+1, D)
        return self._run(x, 0, is_causal=True, use_cache=True)

    def step(self, tokens: torch.Tensor, start: int | None = None) -> torch.Tensor:
        """Feed a window of image tokens (B, n) = tokens start..start+n-1 -> logits (B, n, V).

        logits[:, j] predicts image token start+j+1 given everything before it (causal within the window,
        so a Jacobi window of drafts gets every position's distribution in one pass). ``start`` defaults to
        the cached token count and must equal it: roll back first with ``truncate_cache(start + 1)``.
        """
        cached = self.num_cached_tokens
        start = cached if start is None else start
        if self.cache_length == 0 or start != cached:
            raise ValueError(f"step(start={start}) but the cache holds {cached} image tokens "
                             f"(cache length {self.cache_length}); prefill or truncate_cache(start + 1) first")
        n, slot = tokens.shape[1], self.cache_length
        mask = None
        if n > 1:  # query slot+i sees keys 0..slot+i
            keys = torch.arange(slot + n, device=tokens.device)
            mask = keys[None, :] <= (slot + torch.arange(n, device=tokens.device))[:, None]  # (n, slot+n)
        return self._run(self.tok_embed(tokens), slot, mask=mask, use_cache=True)


#################################################################################
#                                   GPT Configs                                 #
#################################################################################

GPT_models = {
    "GPT-B": dict(depth=12, dim=768, heads=12),  # LlamaGen-B, 111M
    "GPT-L": dict(depth=24, dim=1024, heads=16),  # LlamaGen-L, 343M
    "GPT-XL": dict(depth=36, dim=1280, heads=20),  # LlamaGen-XL, 775M
    "GPT-XXL": dict(depth=48, dim=1536, heads=24),  # LlamaGen-XXL, 1.4B
    "GPT-S": dict(depth=8, dim=512, heads=8),  # small, for one-GPU experiments
    "GPT-demo": dict(depth=4, dim=128, heads=4),  # CPU demo and tests
}


def build_gpt(name: str, **kwargs) -> GPT:
    """GPT_models[name] merged with kwargs (vocab_size, num_classes, block_size, ...)."""
    return GPT(**{**GPT_models[name], **kwargs})
