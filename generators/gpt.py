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

from decoding.sampling import SamplingConfig, cfg_split_combine, sample_from_logits
from generators.objective import TokenObjective, token_loss
from generators.layers import (Attention, CacheAccess, CachedBlocksMixin, ClassEmbedding, RMSNorm, SwiGLU,
                               compiled_step, count_calls, rope_grid_angles, swiglu_hidden)


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

    def forward(self, x, rope, mask=None, is_causal=False, cache=None):
        x = x + self.attn(self.attn_norm(x), rope, mask, is_causal, cache)
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

        self.cls_embed = ClassEmbedding(num_classes, dim, class_dropout)  # row num_classes = null class
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

    # -- the generator interface (decoding/ar.py, the LightningModule and sample.py call only these) --------
    kind = "gpt"
    layout = "raster"  # token cache layout: (N, h*w) codes in raster order

    @staticmethod
    def check_tokenizer(quantizer, tokenizer_path) -> None:
        """A ValueError unless the tokenizer is single-scale and discrete (vq, fsq, lfq, ...)."""
        multiscale, continuous = getattr(quantizer, "multiscale", False), getattr(quantizer, "continuous", False)
        if multiscale or continuous or not quantizer.codebook_size:
            what = "multi-scale" if multiscale else "continuous"
            raise ValueError(f"generator=gpt needs a single-scale discrete tokenizer (vq, fsq, lfq, ...), but "
                             f"{tokenizer_path} is a {what} {type(quantizer).__name__} tokenizer; use generator=var "
                             "for msvq, generator=flowar for kl")

    @staticmethod
    def model_args(tokenizer, image_size: int, num_classes: int, model_cfg: dict) -> dict:
        """Constructor arguments from the tokenizer and the data: vocabulary, classes, the token grid."""
        h, w = tokenizer.token_shape(image_size)
        return {"vocab_size": int(tokenizer.quantizer.codebook_size), "num_classes": num_classes,
                "block_size": h * w, "grid_size": [h, w]}

    def loss(self, codes: torch.Tensor, labels: torch.Tensor, tokenizer=None, objective: TokenObjective | None = None):
        """Teacher-forced loss of cached codes (B, L) -> (loss, token accuracy); ``objective``: positions that
        count and/or distillation from a teacher GPT's logits (same dropped labels)."""
        tokens = codes.long()
        teacher = objective.teacher if objective is not None else None
        if teacher is None:
            return token_loss(self(tokens, labels), tokens, objective)  # logits (B, L, V)
        labels = self.cls_embed.drop(labels)  # one draw for student and teacher
        logits = self(tokens, labels, drop_labels=False)
        with torch.no_grad():
            teacher_logits = teacher(tokens, labels)
        return token_loss(logits, tokens, objective, teacher_logits)

    @staticmethod
    def describe_sampling(s: SamplingConfig) -> str:
        """The sampling settings that matter here, in one line."""
        interval = f" for tokens 0..{s.cfg_interval + 1}" if s.cfg_interval >= 0 else ""
        return f"cfg {s.cfg_scale:g}{interval}, temperature {s.temperature:g}, top-k {s.top_k}, top-p {s.top_p:g}"

    @property
    def num_tokens(self) -> int:
        """Tokens per generated sequence."""
        return self.block_size

    def forward_counter(self) -> count_calls:
        """Counts target forward passes (calls of the block stack)."""
        return count_calls(self.blocks[0])

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None = None,
               tokenizer=None, use_cache: bool = True, compile: bool = False) -> torch.Tensor:
        """The reference sampler: token-by-token raster sampling -> tokens (B, L) int64.

        ``use_cache=False`` reruns the full causal forward on the prefix every token (the naive reference);
        both draw from the generator identically, so they give the same tokens for the same seed.
        ``compile``: the one-token decode step runs with fixed shapes (per-row positions over the whole static
        cache) under ``torch.compile`` (on CUDA mode="reduce-overhead", i.e. captured as a CUDA graph; on CPU
        inductor's generated C++).
        """
        B, L = cond.shape[0], self.block_size
        guided = sampling.cfg_scale != 1.0
        labels = self.cls_embed.with_null(cond) if guided else cond  # (B',)
        tokens = torch.zeros(B, L, dtype=torch.long, device=cond.device)
        if use_cache:
            self.setup_cache(labels.shape[0], L, device=cond.device)  # class + L-1 fed tokens
        if compile:
            decode = self._compiled_decode_step(cond.device, use_cache)
            pos = torch.zeros(labels.shape[0], 1, dtype=torch.long, device=cond.device)  # (B', 1), static
        for i in range(L):
            # 1. logits of token i given the class and tokens < i
            if use_cache and i == 0:
                logits = self.prefill(labels)[:, -1]  # (B', V)
            elif use_cache:
                prev = tokens[:, i - 1:i].repeat(labels.shape[0] // B, 1)  # (B', 1): token i-1 sits at position i
                logits = (decode(prev, pos.fill_(i)) if compile else self.step(prev, i))[:, -1]
            else:
                prefix = tokens[:, :i + 1].repeat(labels.shape[0] // B, 1)  # (B', i+1); the last input is unused
                logits = self(prefix, labels)[:, i]  # (B', V)
            # 2. classifier-free guidance on the [cond; uncond] batch (optionally only for the first tokens)
            if guided:
                use_cfg = sampling.cfg_interval < 0 or i <= sampling.cfg_interval + 1  # LlamaGen's count
                logits = cfg_split_combine(logits, sampling.cfg_scale) if use_cfg else logits[:B]
            # 3. temperature / top-k / top-p, one seeded draw
            tokens[:, i] = sample_from_logits(logits, sampling.temperature, sampling.top_k, sampling.top_p, generator)
        if use_cache:
            self.free_cache()
        return tokens

    def _compiled_decode_step(self, device: torch.device, use_cache: bool):
        """step(x (B, 1), positions (B, 1)) compiled with fixed shapes: a CUDA graph on CUDA, inductor C++ on CPU."""
        if not use_cache:
            raise ValueError("decoding.compile=true compiles the cached one-token step: it needs use_cache=true")
        # reduce-overhead = CUDA graphs (static cache address); on CPU inductor's default mode
        return self.compiled_step("reduce-overhead" if device.type == "cuda" else None)

    def compiled_step(self, mode: str | None = None):
        """``step`` under torch.compile (fixed shapes; ``mode`` as torch.compile's), counted by ``forward_counter``."""
        return compiled_step(self.step, self.blocks[0], mode)

    @staticmethod
    def tokens_to_images(tokenizer, tokens: torch.Tensor, info: dict) -> torch.Tensor:
        """(B, L) raster codes -> images (B, C, H, W) through the tokenizer's decoder."""
        h, w = info["token_shape"]
        return tokenizer.decode(tokens.reshape(tokens.shape[0], h, w))

    # -- the network ------------------------------------------------------------------------------
    def _embed_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids (B, n) int -> embeddings (B, n, D); float inputs (B, n, D) are embeddings already."""
        return x if x.is_floating_point() else self.tok_embed(x)

    def _rope(self, positions: int | torch.Tensor, n: int):
        """cos/sin of n inputs at positions start..start+n-1 (int) -> (n, Dh/2), or per row (B, n) -> (B, n, Dh/2)."""
        if isinstance(positions, int):
            if positions + n > self.rope_cos.shape[0]:
                raise ValueError(f"positions up to {positions + n - 1} exceed block_size = {self.block_size}")
            return self.rope_cos[positions:positions + n], self.rope_sin[positions:positions + n]
        return self.rope_cos[positions], self.rope_sin[positions]

    def _run(self, x, positions, mask=None, is_causal=False, cache=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Blocks + norm + head on x (B, n, D) at ``positions`` -> (logits (B, n, V) float, hidden (B, n, D))."""
        rope = self._rope(positions, x.shape[1])
        for blk in self.blocks:
            x = blk(x, rope, mask, is_causal, cache)
        h = self.norm(x)  # (B, n, D)
        return self.head(h).float(), h

    # -- teacher forcing ----------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor | None, cond: torch.Tensor, embeds: torch.Tensor | None = None,
                return_hidden: bool = False, drop_labels: bool = True):
        """tokens (B, L) int64 raster order, cond (B,) -> logits (B, L, V); logits[:, i] predicts tokens[:, i].

        The input is [class, tokens[:, :-1]]: tokens[:, -1] is only a target. ``embeds`` (B, n, D), n <= L,
        replaces the token embeddings (a draft head or a distilled student drives the backbone): the input is
        then [class, embeds] and the logits are (B, n + 1, V). Labels are dropped to the null class with
        probability class_dropout in training mode. ``return_hidden``: also the final-norm hidden states.
        """
        inputs = self.tok_embed(tokens[:, :-1]) if embeds is None else embeds  # (B, n, D)
        x = torch.cat([self.cls_embed(cond, drop=drop_labels)[:, None], inputs], dim=1)  # (B, n+1, D)
        logits, h = self._run(self.tok_drop(x), 0, is_causal=True)
        return (logits, h) if return_hidden else logits

    # -- incremental decoding over the KV cache ------------------------------------------------
    # Positions: 0 is the class token, position p >= 1 holds image token p-1 (and predicts image token p).
    # Without a tree, cache slot = position.
    def prefill(self, cond: torch.Tensor, tokens: torch.Tensor | None = None, return_hidden: bool = False):
        """Reset the cache and feed [class, tokens]: cond (B,), tokens (B, n) ids or (B, n, D) embeddings or None
        -> logits (B, n+1, V); logits[:, j] predicts image token j. Afterwards every row holds n + 1 slots."""
        self._check_cache()
        x = self.cls_embed(cond)[:, None]  # (B, 1, D)
        if tokens is not None and tokens.shape[1] > 0:
            x = torch.cat([x, self._embed_inputs(tokens)], dim=1)  # (B, n+1, D)
        n = x.shape[1]
        logits, h = self._run(x, 0, is_causal=True, cache=CacheAccess(0, n))
        self._set_length(n)
        return (logits, h) if return_hidden else logits

    def step(self, x: torch.Tensor, positions: int | torch.Tensor, mask: torch.Tensor | None = None,
             slots: torch.Tensor | None = None, kv_len: int | None = None, return_hidden: bool = False):
        """Feed n inputs over the cache -> logits (B, n, V) (and hidden (B, n, D) with ``return_hidden``).

        x: image token ids (B, n) or input embeddings (B, n, D). positions: an int p (every row feeds
        positions p..p+n-1, i.e. image tokens p-1..p+n-2; p must equal the cache length) or per-row positions
        (B, n) int64 (rows at different lengths: speculative windows after per-row rollback; tree nodes share
        positions). logits[:, j] predicts the image token after the one at positions[:, j].
        slots: cache slots to write (default = positions; a draft tree writes its nodes at distinct slots).
        mask: bool over cache slots, (n, T) or (B, n, T), True = may attend (a tree mask); default: causal by
        position (slot j visible to a query at position p iff j <= p). kv_len: attend over slots [0, kv_len);
        default: positions + n for an int, the whole buffer for per-row positions (static shapes).
        """
        e = self._embed_inputs(x)  # (B, n, D)
        n = e.shape[1]
        if isinstance(positions, int):
            self._check_start(positions)
            kv_len = positions + n if kv_len is None else kv_len
            if mask is None and n > 1:  # causal inside the window
                mask = self._slot_ids[None, :kv_len] <= torch.arange(positions, positions + n,
                                                                     device=e.device)[:, None]  # (n, T)
            write = positions if slots is None else slots
        else:
            if mask is None:
                mask = self.position_mask(positions, kv_len)  # (B, 1, n, T)
            write = positions if slots is None else slots
        if mask is not None and mask.dim() == 3:
            mask = mask[:, None]  # (B, 1, n, T)
        logits, h = self._run(e, positions, mask=mask, cache=CacheAccess(write, kv_len))
        if isinstance(positions, int) and slots is None:
            self._set_length(positions + n)
        else:  # per-row (or tree) step: the caller rolls rows back to what they accept
            self._uniform_length = None
            if slots is None:
                self._lengths.copy_(positions[:, -1] + 1)
        return (logits, h) if return_hidden else logits


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
