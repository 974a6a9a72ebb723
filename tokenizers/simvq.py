"""SimVQ (Zhu et al. 2024, arXiv 2411.02038): a frozen random codebook reparameterized by one learned linear map."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenizers.nearest_code import nearest_code
from tokenizers.quantizer import Quantizer, QuantizerOutput, batch_code_stats, fp32


class SimVQ(Quantizer):
    """Nearest neighbour against the effective codebook W(C): C ~ N(0, dim^-0.5) frozen, W = Linear(dim, dim) learned.

    Loss (paper form, ``legacy: false``): ``beta * ||sg(z_q) - z||^2 + ||z_q - sg(z)||^2``; W learns through the
    second term. ``decode_indices`` uses W(C)[idx], not the raw C[idx] of the official ``get_codebook_entry``.
    """

    def __init__(self, dim: int, codebook_size: int, beta: float = 0.25):
        super().__init__()
        self.in_channels = self.out_channels = dim
        self.codebook_size = codebook_size
        self.beta = beta
        self.register_buffer("frozen_codebook", torch.randn(codebook_size, dim) * dim ** -0.5)  # C: (K, d)
        self.proj = nn.Linear(dim, dim)  # W, with bias

    @property
    def codebook(self) -> torch.Tensor:
        """The effective codebook W(C): (K, d), recomputed at every call."""
        return self.proj(self.frozen_codebook)

    @fp32
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """z (B, C, H, W) -> quantized (B, C, H, W), indices (B, H, W)."""
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)  # (N, d)
        codebook = self.codebook  # (K, d)
        idx = nearest_code(flat.detach(), codebook.detach())  # (N,)
        codes = codebook[idx]  # (N, d), differentiable w.r.t. W
        loss = self.beta * F.mse_loss(flat, codes.detach()) + F.mse_loss(codes, flat.detach())
        quantized = flat + (codes - flat).detach()  # straight-through
        quantized = quantized.view(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, H, W)
        indices = idx.view(b, h, w)
        return QuantizerOutput(quantized, indices, loss, batch_code_stats(indices, self.codebook_size))

    @fp32
    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (B, H, W) -> quantized (B, C, H, W), from W(C)."""
        return self.decode_vectors(self.codebook[indices])

    def codebook_vectors(self) -> torch.Tensor:
        """(K, d): the effective codebook W(C) that the argmin runs against (not the frozen C), detached."""
        with torch.no_grad(), torch.autocast(device_type=self.frozen_codebook.device.type, enabled=False):
            return self.codebook.float()
