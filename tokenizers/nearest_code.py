"""The nearest-code search shared by every quantizer with a codebook (VQ, SimVQ, multi-scale VQ)."""
from __future__ import annotations

import torch

MAX_BLOCK_ELEMENTS = 1 << 24  # distance entries per block: 64 MiB in fp32


@torch.no_grad()
def nearest_code(x: torch.Tensor, codebook: torch.Tensor, max_block: int = MAX_BLOCK_ELEMENTS) -> torch.Tensor:
    """(N, d), (K, d) -> (N,) int64 argmin_k ||x - e_k||^2, the first such k on ties; no gradient.

    The distance is computed as ``|e_k|^2 - 2 x.e_k`` (``|x|^2`` is the same for every k, so it cannot change the
    argmin). Rows go through in blocks of at most ``max_block`` distance entries, so memory stays at
    O(max(max_block, K)) whatever N is. Cosine lookups pass l2-normalized x and codebook.
    """
    sq = codebook.pow(2).sum(1)  # (K,)
    rows = max(1, max_block // max(1, codebook.shape[0]))
    out = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    for start in range(0, x.shape[0], rows):
        block = x[start:start + rows]  # (n, d)
        out[start:start + rows] = torch.addmm(sq, block, codebook.t(), alpha=-2).argmin(1)  # (n, K) -> (n,)
    return out
