"""Codebook usage and perplexity over a whole evaluation split (not a rolling buffer).

usage = |{k : n_k >= 1}| / K and perplexity = exp(H(n / sum n)), the definitions SimVQ and
Open-MAGVIT2 evaluate with; counts are summed across DDP ranks before either is computed.
"""
from __future__ import annotations

import torch
from torchmetrics import Metric

MAX_DENSE = 1 << 22  # above this many codes, count only the codes that occur


class CodebookUsage(Metric):
    """Accumulates code counts; compute() -> dict(usage, perplexity)."""

    higher_is_better = True
    full_state_update = False

    def __init__(self, codebook_size: int, **kwargs):
        super().__init__(**kwargs)
        self.codebook_size = int(codebook_size)
        self.dense = self.codebook_size <= MAX_DENSE
        if self.dense:
            self.add_state("counts", torch.zeros(self.codebook_size, dtype=torch.long), dist_reduce_fx="sum")
        else:  # huge binary codebooks: keep the indices seen, deduplicated at compute
            self.add_state("seen", [], dist_reduce_fx="cat")

    def update(self, indices) -> None:
        if isinstance(indices, (list, tuple)):  # multi-scale: every scale's codes count
            indices = torch.cat([i.reshape(-1) for i in indices])
        flat = indices.reshape(-1).long()
        if self.dense:
            self.counts += torch.bincount(flat, minlength=self.codebook_size)
        else:
            self.seen.append(flat)

    def compute(self) -> dict[str, torch.Tensor]:
        if self.dense:
            counts = self.counts
        else:
            seen = torch.cat(self.seen) if isinstance(self.seen, list) else self.seen
            counts = torch.unique(seen, return_counts=True)[1]
        p = counts.double() / counts.sum().clamp_min(1)
        entropy = -(p * torch.log(p.clamp_min(1e-300))).sum()
        used = (counts > 0).sum().double()
        return {"usage": (used / self.codebook_size).float(), "perplexity": entropy.exp().float()}
