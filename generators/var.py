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

from decoding.sampling import SamplingConfig, sample_from_logits
from generators.objective import TokenObjective, token_loss
from generators.layers import (Attention, CacheAccess, CachedBlocksMixin, ClassEmbedding, DropPath, Mlp,
                               block_causal_mask, compiled_step, count_calls, scale_bounds, scale_levels)


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

    def forward(self, x, c, mask=None, cache=None):
        # x (B, N, C), c (B, C) -> 6 x (B, 1, C)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.ada_lin(c).view(-1, 1, 6, self.dim).unbind(2)
        if torch.is_grad_enabled() or (self.training and self.drop_path.p > 0):
            x = x + self.drop_path(self.attn(self.ln(x) * (1 + scale1) + shift1, mask=mask, cache=cache) * gamma1)
            return x + self.drop_path(self.ffn(self.ln(x) * (1 + scale2) + shift2) * gamma2)
        # inference: each modulation and each gated residual as one addcmul pass (shift + y * scale, x + out * gamma;
        # AVX fused multiply-add: within 1e-6 relative of the separate mul and add), in place on fresh tensors
        y = self.ln(x)  # (B, N, C)
        x = torch.addcmul(x, self.attn(torch.addcmul(shift1, y, 1 + scale1, out=y), mask=mask, cache=cache), gamma1)
        y = self.ln(x)
        return x.addcmul_(self.ffn(torch.addcmul(shift2, y, 1 + scale2, out=y)), gamma2)


class AdaLNBeforeHead(nn.Module):
    """LayerNorm (no affine) with class-driven scale and shift, before the output head."""

    def __init__(self, dim: int, norm_eps: float = 1e-6):
        super().__init__()
        self.dim = dim
        self.ln = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        scale, shift = self.ada_lin(c).view(-1, 1, 2, self.dim).unbind(2)  # 2 x (B, 1, C)
        return torch.addcmul(shift, self.ln(x), 1 + scale)  # (B, N, C): shift + ln(x) * (1 + scale) in one pass


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

        self.class_emb = ClassEmbedding(num_classes, C, class_dropout)  # row num_classes = null class
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

    # -- the generator interface (decoding/ar.py, the LightningModule and sample.py call only these) --------
    kind = "var"
    layout = "multiscale"  # token cache layout: (N, L) codes, the per-scale maps flattened and concatenated

    @staticmethod
    def check_tokenizer(quantizer, tokenizer_path) -> None:
        """A ValueError unless the tokenizer is VAR's multi-scale residual VQ (tokenizer=msvq)."""
        if not getattr(quantizer, "multiscale", False):
            raise ValueError(f"generator=var needs a multi-scale VQ tokenizer (tokenizer=msvq), but {tokenizer_path} "
                             f"is a {type(quantizer).__name__} tokenizer")

    @staticmethod
    def model_args(tokenizer, image_size: int, num_classes: int, model_cfg: dict) -> dict:
        """Constructor arguments from the tokenizer and the data: vocabulary, classes, scales, code width."""
        scales = [int(s) for s, _ in tokenizer.token_shape(image_size)]
        if model_cfg.get("scales") is not None and list(model_cfg["scales"]) != scales:
            raise ValueError(f"generator.model.scales={list(model_cfg['scales'])} differ from the msvq tokenizer's "
                             f"scales {scales}; drop the setting (VAR takes the tokenizer's)")
        q = tokenizer.quantizer
        return {"vocab_size": int(q.codebook_size), "num_classes": num_classes, "scales": scales,
                "code_dim": int(q.out_channels)}

    def loss(self, codes: torch.Tensor, labels: torch.Tensor, tokenizer, objective: TokenObjective | None = None):
        """Teacher-forced loss of cached codes (B, L) (inputs from the frozen msvq) -> (loss, accuracy).

        ``objective``: cross-entropy on some scales only, or distillation from a teacher VAR's logits (the
        teacher sees the same inputs and the same dropped labels).
        """
        tokens = codes.long()
        with torch.no_grad():
            inputs = tokenizer.quantizer.teacher_inputs(self.split_scales(tokens))  # (B, L - s_0^2, Cv)
        teacher = objective.teacher if objective is not None else None
        if teacher is None:
            return token_loss(self(None, labels, inputs), tokens, objective)  # logits (B, L, V)
        labels = self.class_emb.drop(labels)  # one draw for student and teacher
        logits = self(None, labels, inputs, drop_labels=False)  # (B, L, V)
        with torch.no_grad():
            teacher_logits = teacher(None, labels, inputs)  # (B, L, V), eval mode
        return token_loss(logits, tokens, objective, teacher_logits)

    def scale_positions(self, scales) -> torch.Tensor:
        """(L,) bool: the token positions of the given scale indices (negative indices count from the end)."""
        K = len(self.scales)
        chosen = sorted({int(k) % K for k in scales})
        if any(not -K <= int(k) < K for k in scales):
            raise ValueError(f"train_scales {list(scales)} outside the {K} scales {self.scales} (0..{K - 1})")
        return torch.isin(self.lvl, torch.tensor(chosen, device=self.lvl.device))

    @staticmethod
    def describe_sampling(s: SamplingConfig) -> str:
        """The sampling settings that matter here, in one line."""
        return f"cfg ramp {s.cfg_scale:g}, temperature {s.temperature:g}, top-k {s.top_k}, top-p {s.top_p:g}"

    @property
    def num_tokens(self) -> int:
        """Tokens per generated sequence."""
        return self.L

    def forward_counter(self) -> count_calls:
        """Counts target forward passes (calls of the block stack)."""
        return count_calls(self.blocks[0])

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None = None,
               tokenizer=None, use_cache: bool = True, compile: bool = False) -> list:
        """The reference sampler: one cached forward per scale -> index maps [(B, s_k, s_k)].

        ``compile``: each scale's step runs under torch.compile with fixed shapes (one graph per scale; on CUDA
        mode="reduce-overhead", i.e. captured as CUDA graphs; on CPU inductor's generated C++).
        """
        if not use_cache:
            raise ValueError("VAR samples over its KV cache (use_cache=false applies to GPT)")
        if tokenizer is None:
            raise ValueError("VAR sampling needs tokenizer=<the msvq tokenizer (or its quantizer)>")
        msvq = getattr(tokenizer, "quantizer", tokenizer)
        return self.generate(msvq, cond, sampling.cfg_scale, sampling.temperature, sampling.top_k,
                             sampling.top_p, generator, compile=compile)

    @staticmethod
    def tokens_to_images(tokenizer, tokens, info: dict) -> torch.Tensor:
        """Index maps [(B, s_k, s_k)] (or (B, L) flattened) -> images (B, C, H, W) through the msvq decoder."""
        if torch.is_tensor(tokens):
            tokens = split_scales(tokens, [s for s, _ in info["token_shape"]])
        return tokenizer.decode(list(tokens))

    def split_scales(self, codes: torch.Tensor) -> list[torch.Tensor]:
        """(B, L) codes -> [(B, s_k, s_k)] per scale."""
        return split_scales(codes, self.scales)

    @staticmethod
    def flatten_indices(indices) -> torch.Tensor:
        """[(B, s_k, s_k)] per scale -> (B, L) int64 targets in the model's token order."""
        if torch.is_tensor(indices):
            return indices
        return torch.cat([idx.reshape(idx.shape[0], -1) for idx in indices], dim=1)

    # -- the network ------------------------------------------------------------------------------
    def _check_end(self, end: int) -> None:
        if end not in [e for _, e in self.bounds]:
            raise ValueError(f"{end} tokens is not a scale boundary of {self.scales}")

    def _embed(self, c: torch.Tensor, inputs: torch.Tensor | None, embeds: torch.Tensor | None = None) -> torch.Tensor:
        """SOS from c (B, C) plus word_embed(inputs (B, n, code_dim)) -> (B, first_l + n, C) with positions.

        ``embeds`` (B, T, C) replaces the whole input embedding (SOS included): a distilled student or a
        draft head drives the backbone; the level and position embeddings are still added.
        """
        if embeds is not None:
            x = embeds
        else:
            x = c[:, None] + self.pos_start  # (B, first_l, C)
            if inputs is not None and inputs.shape[1] > 0:
                x = torch.cat([x, self.word_embed(inputs)], dim=1)  # (B, T, C)
        T = x.shape[1]
        self._check_end(T)
        return x + self.lvl_embed(self.lvl[:T]) + self.pos_embed[:, :T]

    def _run(self, x, c, mask=None, cache=None, guidance: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Blocks + AdaLN + head on x (B, n, C) -> (logits (B, n, V) float, hidden (B, n, C)).

        ``guidance`` t: x is a [cond; uncond] batch (2B, n, C) and the logits are VAR's ramped CFG (1+t) cond -
        t uncond (B, n, V), mixed before the head: the head is affine and (1+t) - t = 1, so head((1+t) h_c - t h_u)
        gives the same logits up to rounding, at half the head's FLOPs and without the (2B, n, V) raw logits.
        The hidden states returned are the mixed ones (B, n, C).
        """
        for blk in self.blocks:
            x = blk(x, c, mask=mask, cache=cache)
        h = self.head_nm(x, c)  # (B', n, C)
        if guidance is not None:
            cond_h, uncond_h = h.chunk(2)
            h = cond_h.mul(1 + guidance).sub_(uncond_h.mul(guidance))  # (B, n, C): the three roundings of VAR's mix
        return self.head(h).float(), h

    # -- teacher forcing ----------------------------------------------------------------------
    def forward(self, tokens, cond: torch.Tensor, teacher_inputs: torch.Tensor | None = None,
                embeds: torch.Tensor | None = None, return_hidden: bool = False, drop_labels: bool = True):
        """Teacher-forced logits (B, T, V); logits[:, i] predicts flattened token i.

        tokens: [(B, s_k, s_k)] or (B, T) ground-truth indices (only checked against T; they are the CE
        targets, ``flatten_indices(tokens)``), or None. cond: (B,) labels (dropped to the null class with
        probability class_dropout in training). teacher_inputs: (B, T - s_0^2, code_dim) =
        ``msvq.teacher_inputs(indices)``; or ``embeds`` (B, T, C) in place of the whole input embedding.
        T = L, or any scale boundary when training on a prefix of scales. ``return_hidden``: also the hidden
        states before the head (B, T, C). ``drop_labels=False``: cond is already label-dropped.
        """
        c = self.class_emb(cond, drop=drop_labels)  # (B, C), label dropout in training
        x = self._embed(c, teacher_inputs, embeds)  # (B, T, C)
        T = x.shape[1]
        if tokens is not None and self.flatten_indices(tokens).shape[1] != T:
            raise ValueError(f"tokens hold {self.flatten_indices(tokens).shape[1]} positions, inputs give {T}")
        logits, h = self._run(x, c, mask=self.attn_mask[:T, :T])
        return (logits, h) if return_hidden else logits

    # -- incremental decoding over the KV cache ------------------------------------------------
    def prefill(self, cond: torch.Tensor, inputs: torch.Tensor | None = None, embeds: torch.Tensor | None = None,
                return_hidden: bool = False, guidance: float | None = None):
        """Reset the cache and run scales 0..N in one block-causal pass -> logits (B, end_N, V).

        cond (B,); inputs (B, n, code_dim) = the inputs of scales 1..N (n = end_N - s_0^2), or None for
        scale 0 only (or ``embeds`` (B, end_N, C)). The last s_N^2 rows of the logits predict scale N. The
        class embedding is kept for the following ``step`` calls. ``guidance`` t: cond is a [cond; uncond]
        batch (2B,) and the logits (B, end_N, V) are CFG-mixed with t at every row (see ``_run``).
        """
        self._check_cache()
        c = self.class_emb(cond)  # (B, C)
        self._cond_emb = c
        x = self._embed(c, inputs, embeds)  # (B, T, C)
        T = x.shape[1]
        mask = self.attn_mask[:T, :T] if T > self.first_l else None
        logits, h = self._run(x, c, mask=mask, cache=CacheAccess(0, T), guidance=guidance)
        self._set_length(T)
        return (logits, h) if return_hidden else logits

    def step(self, inputs: torch.Tensor | None, scale: int, embeds: torch.Tensor | None = None,
             return_hidden: bool = False, guidance: float | None = None):
        """One whole scale k >= 1: inputs (B, s_k^2, code_dim) (or ``embeds`` (B, s_k^2, C)) -> logits (B, s_k^2, V).

        ``guidance`` t: a [cond; uncond] batch (2B rows) gives CFG-mixed logits (B, s_k^2, V) (see ``_run``).
        The cache must hold exactly scales 0..k-1 (``truncate_cache(bounds[k][0])`` to roll back).
        """
        begin, end = self.bounds[scale]
        if scale < 1 or self.cache_length != begin or self._cond_emb is None:
            raise ValueError(f"step(scale={scale}) needs a cache holding {begin} tokens (scales 0..{scale - 1}), "
                             f"it holds {self.cache_length}; use prefill for scale 0")
        x = self.word_embed(inputs) if embeds is None else embeds
        x = x + self.lvl_embed(self.lvl[begin:end]) + self.pos_embed[:, begin:end]  # (B, s^2, C)
        # queries of scale k see every cached token of scales < k and their own scale: no mask needed
        logits, h = self._run(x, self._cond_emb, cache=CacheAccess(begin, end), guidance=guidance)
        self._set_length(end)
        return (logits, h) if return_hidden else logits

    @torch.no_grad()
    def prefill_scales(self, cond: torch.Tensor, indices_prefix, msvq,
                       guidance: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Fill the cache with scales 0..N from N given index maps in one pass (collaborative decoding).

        cond (B',) labels, B' = B or 2B (cond and uncond halves share the prefix); indices_prefix: N maps
        (B, s_k, s_k), 1 <= N < K. Returns (logits of scale N (B', s_N^2, V), f_hat (B, Cv, S, S)); with
        ``guidance`` t (B' = 2B) the logits are CFG-mixed (B, s_N^2, V).
        """
        if not 1 <= len(indices_prefix) < len(self.scales):
            raise ValueError(f"prefix must hold 1..{len(self.scales) - 1} scales, got {len(indices_prefix)}")
        inputs, f_hat = msvq.teacher_inputs(indices_prefix, with_f_hat=True)  # (B, n, Cv)
        inputs = inputs.repeat(cond.shape[0] // inputs.shape[0], 1, 1)  # (B', n, Cv)
        logits = self.prefill(cond, inputs.to(self.word_embed.weight.dtype), guidance=guidance)
        s = self.scales[len(indices_prefix)]
        return logits[:, -s * s:], f_hat

    # -- sampling -------------------------------------------------------------------------------
    def cfg_ramp(self, cfg: float) -> list[float | None]:
        """VAR's guidance of each scale k, t_k = cfg k / (K-1), for ``guidance=``; cfg = 0: None everywhere (no
        unconditional half is run)."""
        K = len(self.scales)
        return [cfg * k / max(K - 1, 1) if cfg != 0 else None for k in range(K)]

    @torch.no_grad()
    def generate(self, msvq, cond: torch.Tensor, cfg: float = 1.5, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, generator: torch.Generator | None = None, indices_prefix=None,
                 stop: int | None = None, compile: bool = False) -> list:
        """Sample index maps [(B, s_k, s_k)] for labels cond (B,), one cached forward per scale.

        CFG ramps with the scale: t = cfg * k / (K-1), logits = (1+t) cond - t uncond, mixed before the head
        (``_run``; scale 0 unguided; cfg = 0 runs no unconditional half). With ``indices_prefix`` (N maps) scales
        0..N are prefilled in one pass and sampling continues at scale N. ``stop``: return after scale stop-1 (the
        first ``stop`` maps; collaborative decoding's drafter). ``compile``: the per-scale steps compiled (see
        ``sample``), one graph per scale, whose ramp value t_k is a constant of its graph (another cfg in the same
        process recompiles).
        """
        B = cond.shape[0]
        step = (compiled_step(self.step, self.blocks[0], "reduce-overhead" if cond.device.type == "cuda" else None,
                              graphs=len(self.scales)) if compile else self.step)
        K = len(self.scales) if stop is None else stop
        guided = cfg != 0
        labels = self.class_emb.with_null(cond) if guided else cond  # (B',)
        # no zero fill (6 x 67 MB at VAR-d6 batch 16): every scale attends over exactly the slots written so far
        self.setup_cache(labels.shape[0], self.L, device=cond.device, zero=False)
        ramp = self.cfg_ramp(cfg)  # t_k, applied by the forward before the head (_run): logits arrive as (B, s^2, V)
        # 1. prefill: scale 0 from the class, or scales 0..N from a given prefix
        if indices_prefix:
            logits, f_hat = self.prefill_scales(labels, indices_prefix, msvq, guidance=ramp[len(indices_prefix)])
            indices, start = list(indices_prefix), len(indices_prefix)
        else:
            logits, f_hat, indices, start = self.prefill(labels, guidance=ramp[0]), None, [], 0
        for k in range(start, K):
            s = self.scales[k]
            # 2. one forward over the whole scale (already done for the first one), guided by t_k
            if k > start:
                logits = step(next_in, k, guidance=ramp[k])  # (B, s^2, V)
            # 3. top-k / top-p multinomial sampling
            idx = sample_from_logits(logits, temperature, top_k, top_p, generator).view(B, s, s)
            indices.append(idx)
            # 4. add the scale to f_hat; the next scale's input is f_hat area-downsampled
            if k + 1 == K:
                break
            f_hat, nxt = msvq.next_input(f_hat, k, idx)
            if nxt is not None:
                next_in = nxt.flatten(2).transpose(1, 2).to(self.word_embed.weight.dtype)  # (B, s_{k+1}^2, Cv)
                next_in = next_in.repeat(labels.shape[0] // B, 1, 1)  # (B', s_{k+1}^2, Cv)
        self.free_cache()
        return indices


def split_scales(codes: torch.Tensor, scales) -> list[torch.Tensor]:
    """(B, L) multi-scale codes -> [(B, s, s)] per scale."""
    out, begin = [], 0
    for s in scales:
        out.append(codes[:, begin:begin + s * s].reshape(codes.shape[0], s, s))
        begin += s * s
    return out


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
