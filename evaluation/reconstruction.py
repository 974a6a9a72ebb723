"""Reconstruction metrics on uint8 images, averaged per image, correct across DDP ranks."""
from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.functional.image import structural_similarity_index_measure

from data.transforms import float_to_uint8


class PerImageMean(Metric):
    """Mean over images of a per-image score; subclasses define `score(a, b) -> (B,)` on uint8 values."""

    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def score(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def update(self, recon: torch.Tensor, target: torch.Tensor) -> None:
        """recon, target (B, C, H, W) in [-1, 1], both rounded to uint8 first (LlamaGen's protocol)."""
        values = self.score(float_to_uint8(recon).double(), float_to_uint8(target).double())  # (B,)
        self.total += values.double().sum()
        self.count += values.numel()

    def compute(self) -> torch.Tensor:
        return (self.total / self.count.clamp_min(1)).float()


class PSNR(PerImageMean):
    """Mean per-image PSNR (dB); identical images are capped at 148 dB."""

    def score(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        mse = ((a - b) ** 2).flatten(1).mean(1)  # (B,)
        return 10 * torch.log10(255.0**2 / mse.clamp_min(1e-10))


class SSIM(PerImageMean):
    """Mean per-image SSIM on uint8 values (data_range 255, Gaussian window 11, sigma 1.5)."""

    def score(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return structural_similarity_index_measure(a.float(), b.float(), data_range=255.0, reduction="none")
