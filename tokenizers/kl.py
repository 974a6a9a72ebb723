"""Diagonal-Gaussian continuous latents with a KL prior (the KL-f autoencoder of Latent Diffusion, arXiv 2112.10752)."""
from __future__ import annotations

import torch

from tokenizers.quantizer import Quantizer, QuantizerOutput, fp32


class KLGaussian(Quantizer):
    """The encoder gives (mean, logvar); training samples mean + std * eps, eval returns the mean; no indices.

    Loss = ``kl_weight * KL(N(mu, sigma^2) || N(0, 1))``, the KL summed over C, H, W and averaged over the
    batch (the LDM convention). The persistent buffer ``scale_factor`` maps latents to unit variance for
    a generator: ``to_model_latent(z) = z * scale_factor``, ``from_model_latent(x) = x / scale_factor``;
    ``fit_scale_factor`` sets it to 1/std of a batch of latents.
    """

    continuous = True

    def __init__(self, dim: int, kl_weight: float = 1e-6, scale_factor: float = 1.0,
                 logvar_clamp: tuple[float, float] = (-30.0, 20.0)):
        super().__init__()
        self.in_channels = 2 * dim
        self.out_channels = dim
        self.codebook_size = None
        self.kl_weight = kl_weight
        self.logvar_clamp = tuple(float(v) for v in logvar_clamp)
        self.register_buffer("scale_factor", torch.tensor(float(scale_factor)))

    @staticmethod
    def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """KL(N(mean, exp(logvar)) || N(0, 1)) summed over C, H, W and averaged over the batch."""
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)  # (B, C, H, W)
        return kl.sum(dim=(1, 2, 3)).mean()

    @fp32
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """z (B, 2C, H, W) = (mean, logvar) -> latents (B, C, H, W), indices None."""
        mean, logvar = z.chunk(2, dim=1)  # (B, C, H, W) each
        logvar = logvar.clamp(*self.logvar_clamp)
        std = torch.exp(0.5 * logvar)
        latents = mean + std * torch.randn_like(mean) if self.training else mean
        kl = self.kl_divergence(mean, logvar)
        stats = {"kl": kl.detach(), "posterior_std": std.detach().mean()}
        return QuantizerOutput(latents, None, self.kl_weight * kl, stats)

    def decode_indices(self, latents: torch.Tensor) -> torch.Tensor:
        """Continuous latents need no lookup: returns them unchanged."""
        return latents

    def codebook_vectors(self) -> torch.Tensor:
        """Continuous latents have no codebook: always raises."""
        raise ValueError("KLGaussian latents are continuous: there is no finite codebook, so no codebook_vectors(). "
                         "Code neighbourhoods and other codebook methods need a discrete tokenizer (vq, fsq, lfq, ...)")

    @torch.no_grad()
    def fit_scale_factor(self, latents: torch.Tensor) -> torch.Tensor:
        """Set scale_factor = 1 / std(latents) (over all elements) and return it."""
        self.scale_factor.copy_(1.0 / latents.float().flatten().std())
        return self.scale_factor

    def to_model_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Tokenizer latents -> unit-variance latents for a generator."""
        return z * self.scale_factor

    def from_model_latent(self, x: torch.Tensor) -> torch.Tensor:
        """Generator latents -> tokenizer latents (inverse of to_model_latent)."""
        return x / self.scale_factor
