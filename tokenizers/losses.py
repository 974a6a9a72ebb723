"""Reconstruction losses for tokenizers: L1, L2 and 1 - MS-SSIM (Snell et al., arXiv 1511.06409)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def ms_ssim_loss(recon: torch.Tensor, target: torch.Tensor, kernel_size: int = 3) -> torch.Tensor:
    """1 - MS-SSIM on images in [-1, 1], with as many of the 5 standard scales as the image size allows.

    The standard 11x11 window needs images > 160 px; at 32-64 px we use a 3x3 window and drop the
    coarsest scales (renormalizing their weights), as the reference recommends.
    """
    side = min(recon.shape[-2:])
    scales = 1
    while scales < len(MS_SSIM_BETAS) and side // 2**scales > (kernel_size - 1):
        scales += 1
    betas = torch.tensor(MS_SSIM_BETAS[:scales])
    betas = tuple((betas / betas.sum()).tolist())
    msssim = multiscale_structural_similarity_index_measure(
        recon.float(), target.float(), data_range=2.0, gaussian_kernel=False, kernel_size=kernel_size, betas=betas,
        normalize="relu")  # a uniform 3x3 window
    return 1 - msssim


class ReconstructionLoss(torch.nn.Module):
    """Weighted sum of L1, L2 and 1 - MS-SSIM; returns (total, parts) so each part is logged."""

    def __init__(self, l1: float = 1.0, l2: float = 0.0, msssim: float = 0.0):
        super().__init__()
        if l1 < 0 or l2 < 0 or msssim < 0 or l1 + l2 + msssim == 0:
            raise ValueError(f"reconstruction weights must be >= 0 and not all zero (l1={l1}, l2={l2}, msssim={msssim})")
        self.weights = {"l1": l1, "l2": l2, "msssim": msssim}

    def forward(self, recon: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        parts = {}
        if self.weights["l1"]:
            parts["l1"] = F.l1_loss(recon, target)
        if self.weights["l2"]:
            parts["l2"] = F.mse_loss(recon, target)
        if self.weights["msssim"]:
            parts["msssim"] = ms_ssim_loss(recon, target)
        total = sum(self.weights[k] * v for k, v in parts.items())
        return total, parts
