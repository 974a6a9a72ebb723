"""Reconstruction and codebook metrics match their definitions."""
from __future__ import annotations

import math

import torch

from evaluation.codebook import CodebookUsage
from evaluation.reconstruction import PSNR, SSIM


def test_psnr_is_per_image_on_uint8():
    target = torch.full((2, 1, 4, 4), -1.0)  # uint8 0
    recon = target.clone()
    recon[0] += 10 / 127.5  # image 0 off by 10 grey levels everywhere -> MSE 100
    recon[1] += 20 / 127.5  # image 1 off by 20 -> MSE 400
    m = PSNR()
    m.update(recon, target)
    expected = (10 * math.log10(255**2 / 100) + 10 * math.log10(255**2 / 400)) / 2  # mean of per-image PSNRs
    assert abs(float(m.compute()) - expected) < 1e-3


def test_ssim_of_identical_images_is_one_and_falls_with_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.linspace(-0.8, 0.8, 32).expand(3, 1, 32, 32).contiguous()  # smooth images
    values = []
    for sigma in (0.0, 0.05, 0.2, 0.5):
        m = SSIM()
        m.update((x + sigma * torch.randn(x.shape, generator=g)).clamp(-1, 1), x)
        values.append(float(m.compute()))
    assert abs(values[0] - 1) < 1e-5
    assert values == sorted(values, reverse=True) and values[-1] < 0.5


def test_usage_and_perplexity_over_the_whole_split():
    m = CodebookUsage(8)
    m.update(torch.tensor([[0, 1], [1, 1]]))
    m.update(torch.tensor([2, 2, 2, 3]))  # batches accumulate
    out = m.compute()
    assert abs(float(out["usage"]) - 4 / 8) < 1e-6
    p = torch.tensor([1, 3, 3, 1], dtype=torch.float64) / 8
    assert abs(float(out["perplexity"]) - math.exp(float(-(p * p.log()).sum()))) < 1e-4


def test_usage_of_huge_codebooks_counts_distinct_codes():
    m = CodebookUsage(1 << 40)
    m.update(torch.tensor([5, 5, 1 << 35]))
    out = m.compute()
    assert float(out["usage"]) == 2 / (1 << 40)
    assert abs(float(out["perplexity"]) - math.exp(-(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)))) < 1e-4
