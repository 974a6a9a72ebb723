"""Reconstruction metrics on uint8 images, averaged per image, correct across DDP ranks."""
from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.functional.image import structural_similarity_index_measure

from data.transforms import float_to_uint8


class PSNR(Metric):
    """Mean per-image PSNR (dB) of images in [-1, 1], both rounded to uint8 first (LlamaGen's protocol)."""

    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, recon: torch.Tensor, target: torch.Tensor) -> None:
        a = float_to_uint8(recon).double()
        b = float_to_uint8(target).double()
        mse = ((a - b) ** 2).flatten(1).mean(1)  # (B,)
        psnr = 10 * torch.log10(255.0**2 / mse.clamp_min(1e-10))  # identical images: capped at 148 dB
        self.total += psnr.sum()
        self.count += psnr.numel()

    def compute(self) -> torch.Tensor:
        return (self.total / self.count.clamp_min(1)).float()


class SSIM(Metric):
    """Mean per-image SSIM on uint8 values (data_range 255, Gaussian window 11, sigma 1.5)."""

    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, recon: torch.Tensor, target: torch.Tensor) -> None:
        a = float_to_uint8(recon).float()
        b = float_to_uint8(target).float()
        ssim = structural_similarity_index_measure(a, b, data_range=255.0, reduction="none")  # (B,)
        self.total += ssim.double().sum()
        self.count += ssim.numel()

    def compute(self) -> torch.Tensor:
        return (self.total / self.count.clamp_min(1)).float()
