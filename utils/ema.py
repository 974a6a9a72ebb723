"""Exponential moving average of a model's weights, used for evaluation and export."""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """Holds `shadow`, a frozen copy of a model whose parameters track an EMA of the live ones.

    The decay warms up as min(decay, (1 + n) / (10 + n)) so early averages are not dominated by
    the random init. Buffers (e.g. codebooks updated by EMA, BN stats) are copied, not averaged.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        super().__init__()
        self.decay = decay
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        n = int(self.num_updates)
        decay = min(self.decay, (1 + n) / (10 + n))
        for ema_p, p in zip(self.shadow.parameters(), model.parameters()):
            ema_p.lerp_(p.detach().to(ema_p.dtype), 1 - decay)
        for ema_b, b in zip(self.shadow.buffers(), model.buffers()):
            ema_b.copy_(b)
        self.num_updates += 1
