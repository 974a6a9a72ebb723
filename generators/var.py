"""VAR: class-conditional next-scale prediction over a multi-scale residual VQ (Tian et al. 2024).

Token layout: scales s_0 < ... < s_{K-1}, flattened raster order per scale and concatenated, L = sum s_k^2.
Scale 0's input is the start-of-sequence (class embedding + pos_start); the input of scale k >= 1 is
continuous: the tokenizer's accumulated f_hat area-downsampled to s_k (``msvq.next_input`` /
``msvq.teacher_inputs``), through ``word_embed = Linear(code_dim -> C)``. Attention is block-causal: full
within a scale, causal across scales. The class embedding drives AdaLN in every block and before the head.
The tokenizer (``tokenizers/msvq.py``) is passed to sampling, never owned, so two VARs can share one.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from decoding.sampling import sample_from_logits
from generators.layers import (Attention, CachedBlocksMixin, DropPath, Mlp, block_causal_mask, scale_bounds,
                               scale_levels)


#################################################################################
#                                   AdaLN blocks                                #
#################################################################################

class AdaLNSelfAttnBlock(nn.Module):
    """VAR block: LayerNorm (no affine) modulated by the class, gated attention and FFN."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, attn_l2_norm: bool = True,
                 drop_path: float = 0.0, norm_eps: float = 1e-6, zero_k_bias: bool = False):
        super().__init__()
        self.dim = dim
        self.ln = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.attn = Attention(dim, heads, qkv_bias=True, qk_l2_norm=attn_l2_norm, zero_k_bias=zero_k_bias)
        self.ffn = Mlp(dim, round(dim * mlp_ratio))
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.drop_path = DropPath(drop_path)

    def forward(self, x, c, mask=None, use_cache=False):
        # x (B, N, C), c (B, C) -> 6 x (B, 1, C)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.ada_lin(c).view(-1, 1, 6, self.dim).unbind(2)
        x = x + self.drop_path(self.attn(self.ln(x) * (1 + scale1) + shift1, mask=mask, use_cache=use_cache) * gamma1)
        return x + self.drop_path(self.ffn(self.ln(x) * (1 + scale2) + shift2) * gamma2)


class AdaLNBeforeHead(nn.Module):
    """LayerNorm (no affine) with class-driven scale and shift, before the output head."""

    def __init__(self, dim: int, norm_eps: float = 1e-6):
        super().__init__()
        self.dim = dim
        self.ln = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        scale, shift = self.ada_lin(c).view(-1, 1, 2, self.dim).unbind(2)  # 2 x (B, 1, C)
        return self.ln(x) * (1 + scale) + shift


#################################################################################
#                                       VAR                                     #
#################################################################################

class VAR(CachedBlocksMixin, nn.Module):
    """Next-scale prediction transformer with block-causal attention and a per-scale KV cache."""

    def __init__(self, vocab_size: int, num_classes: int, scales, code_dim: int, depth: int = 16,
                 width: int | None = None, heads: int | None = None, mlp_ratio: float = 4.0,
                 class_dropout: float = 0.1, attn_l2_norm: bool = True, drop_path: float = 0.0,
                 init_adaln: float = 0.5, init_adaln_gamma: float = 1e-3, init_head: float = 0.02,
                 init_std: float | None = None, zero_k_bias: bool = False):
        """zero_k_bias: the official VAR attention bias (learned q and v biases, no k bias), set by the importer."""
        super().__init__()
        self.vocab_size, self.num_classes, self.code_dim = vocab_size, num_classes, code_dim
        self.scales = tuple(int(s) for s in scales)
        self.width = C = width or 64 * depth
        self.heads = heads or depth
        self.depth, self.class_dropout = depth, class_dropout
        self.bounds = scale_bounds(self.scales)  # [(begin, end)] per scale
        self.L = self.max_cache_len = self.bounds[-1][1]
        self.first_l = self.scales[0] ** 2

        self.class_emb = nn.Embedding(num_classes + 1, C)  # row num_classes = null class
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, C))
        self.pos_embed = nn.Parameter(torch.empty(1, self.L, C))  # learned absolute position per token
        self.lvl_embed = nn.Embedding(len(self.scales), C)
        self.word_embed = nn.Linear(code_dim, C)
        dpr = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList([
            AdaLNSelfAttnBlock(C, self.heads, mlp_ratio, attn_l2_norm, dpr[i], zero_k_bias=zero_k_bias)
            for i in range(depth)])
        self.head_nm = AdaLNBeforeHead(C)
        self.head = nn.Linear(C, vocab_size)

        self.register_buffer("lvl", scale_levels(self.scales), persistent=False)  # (L,)
        self.register_buffer("attn_mask", block_causal_mask(self.scales), persistent=False)  # (L, L) bool

        self._cond_emb: torch.Tensor | None = None  # (B, C) class embedding of the cached sequence
        self.last_hidden: torch.Tensor | None = None  # (B, n, C): input of `head` at the last call's tokens
        self.initialize_weights(init_adaln, init_adaln_gamma, init_head, init_std)

    def initialize_weights(self, init_adaln=0.5, init_adaln_gamma=1e-3, init_head=0.02, init_std=None):
        # VAR: truncated normal std sqrt(1/(3C)); head x0.02; AdaLN x0.5 with the gamma rows x init_adaln_gamma;
        # proj and fc2 scaled by 1/sqrt(2 depth)
        std = init_std or math.sqrt(1 / self.width / 3)

        def _init(m):
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        self.apply(_init)
        for p in (self.pos_start, self.pos_embed):
            nn.init.trunc_normal_(p, std=std, a=-2 * std, b=2 * std)
        with torch.no_grad():
            self.head.weight.mul_(init_head)
            self.head_nm.ada_lin[-1].weight.mul_(init_adaln)
            C, depth = self.width, self.depth
            for blk in self.blocks:
                blk.attn.proj.weight.div_(math.sqrt(2 * depth))
                blk.ffn.fc2.weight.div_(math.sqrt(2 * depth))
                blk.ada_lin[-1].weight[2 * C:].mul_(init_adaln)
                blk.ada_lin[-1].weight[:2 * C].mul_(init_adaln_gamma)

    # -- helpers ------------------------------------------------------------------------------
    def drop_labels(self, cond: torch.Tensor) -> torch.Tensor:
        """Replace labels by the null class with probability class_dropout (training only)."""
        if self.training and self.class_dropout > 0:
            drop = torch.rand(cond.shape[0], device=cond.device) < self.class_dropout
            cond = torch.where(drop, torch.full_like(cond, self.num_classes), cond)
        return cond

    @staticmethod
    def flatten_indices(indices) -> torch.Tensor:
        """[(B, s_k, s_k)] per scale -> (B, L) int64 targets in the model's token order."""
        if torch.is_tensor(indices):
            return indices
        return torch.cat([idx.reshape(idx.shape[0], -1) for idx in indices], dim=1)

    def _check_end(self, end: int) -> None:
        if end not in [e for _, e in self.bounds]:
            raise ValueError(f"{end} tokens is not a scale boundary of {self.scales}")

    def _embed(self, c: torch.Tensor, inputs: torch.Tensor | None) -> torch.Tensor:
        """SOS from c (B, C) plus word_embed(inputs (B, n, code_dim)) -> (B, first_l + n, C) with positions."""
        x = c[:, None] + self.pos_start  # (B, first_l, C)
        if inputs is not None and inputs.shape[1] > 0:
            x = torch.cat([x, self.word_embed(inputs)], dim=1)  # (B, T, C)
        T = x.shape[1]
        self._check_end(T)
        return x + self.lvl_embed(self.lvl[:T]) + self.pos_embed[:, :T]

    def _run(self, x, c, mask=None, use_cache=False) -> torch.Tensor:
        """Blocks + AdaLN + head on x (B, n, C) -> logits (B, n, V) float."""
        for blk in self.blocks:
            x = blk(x, c, mask=mask, use_cache=use_cache)
        h = self.head_nm(x, c)  # (B, n, C)
        self.last_hidden = h
        return self.head(h).float()  # (B, n, V)

    # -- teacher forcing ----------------------------------------------------------------------
    def forward(self, tokens, cond: torch.Tensor, teacher_inputs: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (B, T, V); logits[:, i] predicts flattened token i.

        tokens: [(B, s_k, s_k)] or (B, T) ground-truth indices (only checked against T; they are the CE
        targets, ``flatten_indices(tokens)``), or None. cond: (B,) labels (dropped to the null class with
        probability class_dropout in training). teacher_inputs: (B, T - s_0^2, code_dim) =
        ``msvq.teacher_inputs(indices)``. T = L, or any scale boundary when training on a prefix of scales.
        """
        cond = self.drop_labels(cond)
        c = self.class_emb(cond)  # (B, C)
        x = self._embed(c, teacher_inputs)  # (B, T, C)
        T = x.shape[1]
        if tokens is not None and self.flatten_indices(tokens).shape[1] != T:
            raise ValueError(f"tokens hold {self.flatten_indices(tokens).shape[1]} positions, inputs give {T}")
        return self._run(x, c, mask=self.attn_mask[:T, :T])

    # -- incremental decoding over the KV cache ------------------------------------------------
    def prefill(self, cond: torch.Tensor, inputs: torch.Tensor | None = None) -> torch.Tensor:
        """Reset the cache and run scales 0..N in one block-causal pass -> logits (B, end_N, V).

        cond (B,); inputs (B, n, code_dim) = the inputs of scales 1..N (n = end_N - s_0^2), or None for
        scale 0 only. The last s_N^2 rows of the logits predict scale N. The class embedding is kept for
        the following ``step`` calls.
        """
        self.truncate_cache(0)
        c = self.class_emb(cond)  # (B, C)
        self._cond_emb = c
        x = self._embed(c, inputs)  # (B, T, C)
        T = x.shape[1]
        return self._run(x, c, mask=self.attn_mask[:T, :T] if T > self.first_l else None, use_cache=True)

    def step(self, inputs: torch.Tensor, scale: int) -> torch.Tensor:
        """One whole scale k >= 1: inputs (B, s_k^2, code_dim) -> logits (B, s_k^2, V).

        The cache must hold exactly scales 0..k-1 (``truncate_cache(bounds[k][0])`` to roll back).
        """
        begin, end = self.bounds[scale]
        if scale < 1 or self.cache_length != begin or self._cond_emb is None:
            raise ValueError(f"step(scale={scale}) needs a cache holding {begin} tokens (scales 0..{scale - 1}), "
                             f"it holds {self.cache_length}; use prefill for scale 0")
        x = self.word_embed(inputs) + self.lvl_embed(self.lvl[begin:end]) + self.pos_embed[:, begin:end]  # (B, s^2, C)
        # queries of scale k see every cached token of scales < k and their own scale: no mask needed
        return self._run(x, self._cond_emb, use_cache=True)

    @torch.no_grad()
    def scale_inputs(self, msvq, indices_prefix) -> tuple[torch.Tensor, torch.Tensor]:
        """N index maps (B, s_k, s_k) of scales 0..N-1 -> (f_hat (B, Cv, S, S), inputs of scales 1..N (B, n, Cv))."""
        f_hat, chunks = None, []
        for k, idx in enumerate(indices_prefix):
            f_hat, nxt = msvq.next_input(f_hat, k, idx)
            chunks.append(nxt.flatten(2).transpose(1, 2))  # (B, s_{k+1}^2, Cv)
        return f_hat, torch.cat(chunks, dim=1)

    @torch.no_grad()
    def prefill_scales(self, cond: torch.Tensor, indices_prefix, msvq) -> tuple[torch.Tensor, torch.Tensor]:
        """Fill the cache with scales 0..N from N given index maps in one pass (collaborative decoding).

        cond (B',) labels, B' = B or 2B (cond and uncond halves share the prefix); indices_prefix: N maps
        (B, s_k, s_k), 1 <= N < K. Returns (logits of scale N (B', s_N^2, V), f_hat (B, Cv, S, S)).
        """
        if not 1 <= len(indices_prefix) < len(self.scales):
            raise ValueError(f"prefix must hold 1..{len(self.scales) - 1} scales, got {len(indices_prefix)}")
        f_hat, inputs = self.scale_inputs(msvq, indices_prefix)  # (B, n, Cv)
        inputs = inputs.repeat(cond.shape[0] // inputs.shape[0], 1, 1)  # (B', n, Cv)
        logits = self.prefill(cond, inputs.to(self.word_embed.weight.dtype))
        s = self.scales[len(indices_prefix)]
        return logits[:, -s * s:], f_hat

    # -- sampling -------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, msvq, cond: torch.Tensor, cfg: float = 1.5, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, generator: torch.Generator | None = None, indices_prefix=None) -> list:
        """Sample index maps [(B, s_k, s_k)] for labels cond (B,), one cached forward per scale.

        CFG ramps with the scale: t = cfg * k / (K-1), logits = (1+t) cond - t uncond (scale 0 unguided;
        cfg = 0 runs no unconditional half). With ``indices_prefix`` (N maps) scales 0..N are prefilled in
        one pass and sampling continues at scale N.
        """
        B, K = cond.shape[0], len(self.scales)
        guided = cfg != 0
        labels = torch.cat([cond, torch.full_like(cond, self.num_classes)]) if guided else cond  # (B',)
        self.setup_cache(labels.shape[0], self.L, device=cond.device)
        # 1. prefill: scale 0 from the class, or scales 0..N from a given prefix
        if indices_prefix:
            logits, f_hat = self.prefill_scales(labels, indices_prefix, msvq)
            indices, start = list(indices_prefix), len(indices_prefix)
        else:
            logits, f_hat, indices, start = self.prefill(labels), None, [], 0
        for k in range(start, K):
            s = self.scales[k]
            # 2. one forward over the whole scale (already done for the first one)
            if k > start:
                logits = self.step(next_in, k)  # (B', s^2, V)
            # 3. guidance ramp, then top-k / top-p multinomial sampling
            if guided:
                t = cfg * k / max(K - 1, 1)
                logits = (1 + t) * logits[:B] - t * logits[B:]  # (B, s^2, V)
            idx = sample_from_logits(logits, temperature, top_k, top_p, generator).view(B, s, s)
            indices.append(idx)
            # 4. add the scale to f_hat; the next scale's input is f_hat area-downsampled
            f_hat, nxt = msvq.next_input(f_hat, k, idx)
            if nxt is not None:
                next_in = nxt.flatten(2).transpose(1, 2).to(self.word_embed.weight.dtype)  # (B, s_{k+1}^2, Cv)
                next_in = next_in.repeat(labels.shape[0] // B, 1, 1)  # (B', s_{k+1}^2, Cv)
        self.free_cache()
        return indices


#################################################################################
#                                   VAR Configs                                 #
#################################################################################

VAR_models = {
    "VAR-d16": dict(depth=16),  # 310M, width 1024
    "VAR-d20": dict(depth=20),
    "VAR-d24": dict(depth=24),
    "VAR-d30": dict(depth=30),  # 2.0B
    "VAR-d6": dict(depth=6),  # ~18M, one-GPU experiments
    "VAR-demo": dict(depth=4),  # width 256, CPU demo
}


def build_var(name: str, **kwargs) -> VAR:
    """VAR_models[name] merged with kwargs (vocab_size, num_classes, scales, code_dim, ...)."""
    return VAR(**{**VAR_models[name], **kwargs})
