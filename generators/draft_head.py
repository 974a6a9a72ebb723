"""EAGLE-style draft head for a raster GPT (LANTERN's drafter, ../shared/reference/decoding.md §2).

Alignment (GPT slots): the target's final-norm hidden state F[:, i] (``forward(..., return_hidden=True)``)
sits at slot i and predicts image token i (slot 0 is the class token). The head's input at i is
cat(F[:, i], embed(token i)) -> Linear(2D -> D) -> one pre-norm Llama block (causal, the target's 2D RoPE
at slot i) -> F̂[:, i + 1], the predicted hidden state of slot i + 1; the target's frozen ``head`` turns it
into the draft logits of token i + 1. The token embedding is the target's (frozen, shared).

Loss (EAGLE): SmoothL1(F̂, F) + 0.1 x cross-entropy of the draft logits against the target's distribution
softmax(head(F)) (soft labels). Feature noise: F + U(-a, a) with a = std x sqrt(3), i.e. uniform noise whose
*standard deviation* is ``noise_std`` (0.2 by default). "Uniform noise with std 0.2" is read literally here;
EAGLE's training code (as recalled, not re-checked) names its parameter std but scales a centred U(0, 1) draw by
0.2 x 512 / sequence length, i.e. a width rather than a standard deviation.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from generators.gpt import GPT, Block
from generators.layers import CacheAccess, CachedBlocksMixin


class DraftHead(CachedBlocksMixin, nn.Module):
    """One transformer layer over (target feature, next-token embedding) pairs predicting the next feature."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, norm_eps: float = 1e-6, multiple_of: int = 8,
                 kv_heads: int | None = None):
        super().__init__()
        self.dim = dim
        self.fc = nn.Linear(2 * dim, dim, bias=True)
        self.block = Block(dim, heads, mlp_ratio, 0.0, norm_eps, multiple_of, kv_heads)

    @property
    def blocks(self) -> tuple:
        """The layers whose KV caches CachedBlocksMixin manages (one; ``block`` keeps the checkpoint keys)."""
        return (self.block,)

    @classmethod
    def for_target(cls, target: GPT) -> DraftHead:
        """A head of the target's width and attention heads (its own SwiGLU width: mlp_ratio 4)."""
        attn = target.blocks[0].attn
        return cls(target.dim, attn.heads, kv_heads=attn.kv_heads)

    def forward(self, target: GPT, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """features (B, n, D) = F[:, 0:n], tokens (B, n) int64 = tokens 0..n-1 -> predicted F̂[:, 1:n+1] (B, n, D).

        Causal over the n inputs; n <= block_size + 1.
        """
        x = self.fc(torch.cat([features, target.tok_embed(tokens).to(features.dtype)], dim=-1))  # (B, n, D)
        x = self.block(x, target._rope(0, x.shape[1]), None, True, None)
        return x

    def step(self, target: GPT, features: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
             slots: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Feed n inputs over the head's KV cache -> predicted next features (B, n, D).

        features (B, n, D), tokens (B, n) int64: the inputs (F[:, i], token i); positions (B, n) int64: their input
        indices i (RoPE); slots (B, n) int64: the cache slots they are written at. mask: bool over the cache
        slots, (B, n, T) True = may attend (a draft tree); default causal by position (slot j visible to a query
        at position p iff j <= p, slot = position). Static shapes: attends over the whole buffer.
        """
        x = self.fc(torch.cat([features, target.tok_embed(tokens).to(features.dtype)], dim=-1))  # (B, n, D)
        mask = self.position_mask(positions) if mask is None else mask[:, None]  # (B, 1, n, T)
        return self.block(x, target._rope(positions, x.shape[1]), mask, False, CacheAccess(slots, None))

    def logits(self, target: GPT, predicted: torch.Tensor) -> torch.Tensor:
        """Draft logits through the target's frozen final head: (B, n, D) -> (B, n, V) float."""
        return target.head(predicted).float()


def drafter_loss(head: DraftHead, target: GPT, tokens: torch.Tensor, labels: torch.Tensor, *,
                 noise_std: float = 0.2, ce_weight: float = 0.1, null_prob: float = 0.1,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
    """EAGLE loss on teacher-forced target features: tokens (B, L) int64, labels (B,) -> (loss, parts).

    Labels are replaced by the null class with probability ``null_prob`` (conditional and unconditional
    features, for CFG). The target runs frozen (no grad, eval mode semantics: no dropout).
    """
    B = tokens.shape[0]
    if null_prob > 0:
        drop = torch.rand(B, device=labels.device, generator=generator) < null_prob
        labels = torch.where(drop, torch.full_like(labels, target.num_classes), labels)
    with torch.no_grad():
        _, feats = target(tokens, labels, return_hidden=True, drop_labels=False)  # (B, L, D): F[:, i] predicts tok i
        feats = feats.float()
        soft = target.head(feats[:, 1:]).float().softmax(-1)  # (B, L-1, V) the target's next-token distribution
    inp = feats[:, :-1]  # (B, L-1, D)
    if noise_std > 0:
        a = noise_std * math.sqrt(3.0)  # U(-a, a) has std a / sqrt(3)
        inp = inp + (torch.rand(inp.shape, device=inp.device, generator=generator) * 2 - 1) * a
    pred = head(target, inp, tokens[:, :-1])  # (B, L-1, D) predicts F[:, 1:]
    feat_loss = F.smooth_l1_loss(pred, feats[:, 1:])
    logp = F.log_softmax(head.logits(target, pred), -1)  # (B, L-1, V)
    ce = -(soft * logp).sum(-1).mean()
    loss = feat_loss + ce_weight * ce
    return loss, {"feature_loss": feat_loss.detach(), "ce": ce.detach()}
