"""PatchGAN discriminator (pix2pix / VQGAN), its losses and VQGAN's adaptive generator weight.

VQGAN (Esser et al. 2021): L = rec + LPIPS + lambda * (-mean D(x_hat)) + L_vq, with
lambda = 0.8 * ||grad_last rec|| / (||grad_last G|| + 1e-4), clamped to [0, 1e4], where the
gradients are taken at the decoder's last conv weight; D is trained with the hinge loss.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------------------------


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":  # steadier than BatchNorm with tiny per-device batches
        return nn.GroupNorm(math.gcd(32, channels), channels)
    raise ValueError(f"discriminator norm={kind!r} is not available; choose batch or group")


class PatchGAN(nn.Module):
    """(B, C, H, W) images -> (B, 1, h, w) real/fake logits, one per overlapping patch."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, layers: int = 3, norm: str = "batch"):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]  # H/2
        c = ndf
        for n in range(1, layers + 1):
            c_out = ndf * min(2 ** n, 8)
            stride = 2 if n < layers else 1  # the last block keeps the size (minus one)
            blocks += [nn.Conv2d(c, c_out, 4, stride, 1, bias=False), _norm(norm, c_out), nn.LeakyReLU(0.2)]
            c = c_out
        blocks.append(nn.Conv2d(c, 1, 4, 1, 1))  # (B, 1, H/2^layers - 2, W/2^layers - 2)
        self.net = nn.Sequential(*blocks)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """N(0, 0.02) convs; norm scales N(1, 0.02), shifts 0 (DCGAN / pix2pix)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))."""
    return 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())


def non_saturating_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean softplus(-D(x)) + mean softplus(D(x_hat))): the logistic GAN loss."""
    return 0.5 * (F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean())


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """-mean D(x_hat)."""
    return -fake_logits.mean()


def non_saturating_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """mean softplus(-D(x_hat)) = -mean log sigmoid(D(x_hat))."""
    return F.softplus(-fake_logits).mean()


GAN_LOSSES = {  # name -> (discriminator loss, generator loss)
    "hinge": (hinge_d_loss, hinge_g_loss),
    "non_saturating": (non_saturating_d_loss, non_saturating_g_loss),
}


def gan_losses(name: str):
    """(d_loss(real_logits, fake_logits), g_loss(fake_logits)) for a config name."""
    if name not in GAN_LOSSES:
        raise ValueError(f"adversarial loss={name!r} is not available; choose one of {', '.join(GAN_LOSSES)}")
    return GAN_LOSSES[name]


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, scale: float = 0.8,
                    eps: float = 1e-4, max: float = 1e4) -> torch.Tensor:
    """scale * ||d rec / d last|| / (||d g / d last|| + eps), clamped to [0, max], detached (VQGAN).

    Both gradients are taken at `last_layer` (the decoder's conv_out.weight) without touching .grad;
    the graph is kept for the real backward pass.
    """
    rec_grad, = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    g_grad, = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
    weight = scale * rec_grad.norm() / (g_grad.norm() + eps)
    return weight.clamp(0.0, max).detach()
