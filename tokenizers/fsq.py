"""Finite scalar quantization (Mentzer et al. 2023, arXiv 2309.15505, Appendix A.1)."""
from __future__ import annotations

import math

import torch
from torch import nn

from tokenizers.quantizer import Quantizer, QuantizerOutput, batch_code_stats, check_enumerable, fp32, zero_loss


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round with a straight-through gradient."""
    return x + (x.round() - x).detach()


class FSQ(Quantizer):
    """Bound each channel with tanh, round it to one of L_i levels; no codebook, no loss.

    ``levels`` follow FSQ Table 1 (e.g. [8, 5, 5, 5] ~ 2^10 codes). With ``dim`` other
    than ``len(levels)`` a 1x1 projection goes in and out, as in the paper.
    Index order: channel 0 is the least significant digit (basis = cumprod([1] + L[:-1])).
    """

    def __init__(self, levels: list[int], dim: int | None = None, eps: float = 1e-3):
        super().__init__()
        levels = [int(level) for level in levels]
        if any(level < 2 for level in levels):
            raise ValueError(f"FSQ levels must all be >= 2, got {levels}")
        if 2 in levels:
            # L=2 bounds to a single point {0}+-0.5 asymmetrically and wastes the level.
            raise ValueError(f"FSQ levels of 2 need preserve_symmetry, which tokar does not implement; got {levels}")
        self.levels_list = levels
        d = len(levels)
        self.in_channels = self.out_channels = dim or d
        self.codebook_size = math.prod(levels)
        self.eps = eps
        self.register_buffer("levels", torch.tensor(levels, dtype=torch.float32), persistent=False)
        basis = torch.cumprod(torch.tensor([1] + levels[:-1], dtype=torch.int64), 0)
        self.register_buffer("basis", basis, persistent=False)
        needs_proj = self.in_channels != d
        self.project_in = nn.Conv2d(self.in_channels, d, 1) if needs_proj else nn.Identity()
        self.project_out = nn.Conv2d(d, self.in_channels, 1) if needs_proj else nn.Identity()

    # -- core maps on channel-last codes (..., d) ----------------------------------------------
    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """(..., d) -> values in (-L/2, L/2) shifted so that rounding gives exactly L levels."""
        half_l = (self.levels - 1) * (1 + self.eps) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half_l)
        return torch.tanh(z + shift) * half_l - offset

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """(..., d) -> codes on the grid {k / (L//2)}, straight-through."""
        half_width = torch.div(self.levels, 2, rounding_mode="floor")
        return round_ste(self.bound(z)) / half_width

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """(..., d) codes -> (...) int64 indices."""
        half_width = torch.div(self.levels, 2, rounding_mode="floor")
        digits = (codes * half_width + half_width).round().long()
        return (digits * self.basis).sum(-1)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """(...) int64 indices -> (..., d) codes in [-1, 1]."""
        half_width = torch.div(self.levels, 2, rounding_mode="floor")
        digits = (indices.unsqueeze(-1) // self.basis) % self.levels.long()
        return (digits.float() - half_width) / half_width

    # -- the contract -------------------------------------------------------------------------
    @fp32
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """z (B, C, H, W) -> quantized (B, C, H, W), indices (B, H, W)."""
        h = self.project_in(z).permute(0, 2, 3, 1)  # (B, H, W, d)
        codes = self.quantize(h)
        indices = self.codes_to_indices(codes)  # (B, H, W)
        quantized = self.project_out(codes.permute(0, 3, 1, 2))  # (B, C, H, W)
        return QuantizerOutput(quantized, indices, zero_loss(z), batch_code_stats(indices, self.codebook_size))

    @fp32
    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (B, H, W) -> quantized (B, C, H, W)."""
        return self.decode_vectors(self.indices_to_codes(indices))

    def codebook_vectors(self) -> torch.Tensor:
        """(K, len(levels)): the implicit grid, row k = the code of index k, values k_i / (L_i // 2) in [-1, 1].

        The space is the rounding space after ``project_in`` (rounding to the nearest grid point is the lookup).
        """
        check_enumerable(self)
        return self.indices_to_codes(torch.arange(self.codebook_size, device=self.basis.device))

    @fp32
    def decode_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        """(B, H, W, len(levels)) grid codes -> quantized (B, C, H, W) through ``project_out``."""
        return self.project_out(vectors.permute(0, 3, 1, 2))
