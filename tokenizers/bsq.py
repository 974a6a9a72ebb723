"""Binary spherical quantization (Zhao et al. 2024, arXiv 2406.07548; bsq-vit's factorized entropy)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tokenizers.lfq import bits_to_indices, indices_to_bits
from tokenizers.quantizer import Quantizer, QuantizerOutput, batch_code_stats, check_enumerable, fp32, zero_loss


def binary_entropy_from_logits(x: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of Bernoulli(sigmoid(x)), elementwise and stable for large |x|."""
    p = torch.sigmoid(x)
    return p * F.softplus(-x) + (1 - p) * F.softplus(x)  # -p log p - (1-p) log(1-p)


class BSQ(Quantizer):
    """Project to the unit sphere, u = z/||z||, and quantize to q = sign(u)/sqrt(d) (unit norm); K = 2**dim.

    Same little-endian index as LFQ (channel 0 = least significant bit; bit i set iff u_i > 0).
    Loss = ``commitment_weight * mean_n ||sg(q_n) - u_n||^2`` (sum over channels)
    ``+ entropy_weight * (gamma0 * H_sample - gamma * H_codebook) * zeta / inv_temperature``, where, with
    the code logits ``2 tau u.c`` (tau = inv_temperature), H_sample is analytic per bit,
    ``sum_i H(sigmoid(-4 tau u_i / sqrt(d)))`` averaged over positions, and H_codebook is the sum over
    channel groups (``group_size`` bits each, the last group may be smaller) of the entropy of the
    batch-mean 2**g-way distribution: memory O(N * d * 2**g) instead of O(N * 2**d). Entropy in training only.
    """

    def __init__(self, dim: int, group_size: int = 9, entropy_weight: float = 0.1, commitment_weight: float = 0.0,
                 inv_temperature: float = 1.0, gamma0: float = 1.0, gamma: float = 1.0, zeta: float = 1.0):
        super().__init__()
        if dim > 62:
            raise ValueError(f"BSQ indices are packed into int64; dim={dim} > 62 bits is not supported")
        self.in_channels = self.out_channels = dim
        self.codebook_size = 2 ** dim
        self.group_size = min(group_size, dim)
        self.entropy_weight, self.commitment_weight = entropy_weight, commitment_weight
        self.inv_temperature = inv_temperature
        self.gamma0, self.gamma, self.zeta = gamma0, gamma, zeta
        self.groups = [self.group_size] * (dim // self.group_size) + ([dim % self.group_size] if dim % self.group_size else [])

    def group_codes(self, g: int, device) -> torch.Tensor:
        """The 2**g sub-codes of a g-bit group, (2**g, g) in {-1, +1}/sqrt(d), little-endian."""
        bits = indices_to_bits(torch.arange(2 ** g, device=device), g).float()
        return (bits * 2 - 1) / math.sqrt(self.in_channels)

    def entropy_penalty(self, u: torch.Tensor) -> torch.Tensor:
        """(N, d) unit vectors -> (gamma0 * H_sample - gamma * H_codebook) * zeta / tau."""
        tau, d = self.inv_temperature, self.in_channels
        sample_entropy = binary_entropy_from_logits(-4 * tau * u / math.sqrt(d)).sum(-1).mean()
        codebook_entropy, start = u.new_zeros(()), 0
        for g in self.groups:
            logits = 2 * tau * u[:, start:start + g] @ self.group_codes(g, u.device).t()  # (N, 2**g)
            avg = logits.softmax(-1).mean(0)  # (2**g,)
            codebook_entropy = codebook_entropy - (avg * avg.clamp_min(1e-10).log()).sum()
            start += g
        return (self.gamma0 * sample_entropy - self.gamma * codebook_entropy) * self.zeta / tau

    @fp32
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """z (B, C, H, W) -> quantized (B, C, H, W) in {-1, +1}/sqrt(C), indices (B, H, W)."""
        d = z.shape[1]
        u = F.normalize(z, dim=1)  # (B, C, H, W) on the unit sphere
        q = torch.where(u > 0, 1.0, -1.0) / math.sqrt(d)
        indices = bits_to_indices((u > 0).permute(0, 2, 3, 1))  # (B, H, W)
        loss = zero_loss(z)
        if self.commitment_weight:
            loss = loss + self.commitment_weight * (q - u).pow(2).sum(1).mean()
        if self.training and self.entropy_weight:
            flat = u.permute(0, 2, 3, 1).reshape(-1, d)  # (N, d)
            loss = loss + self.entropy_weight * self.entropy_penalty(flat)
        quantized = u + (q - u).detach()  # straight-through
        return QuantizerOutput(quantized, indices, loss, batch_code_stats(indices, self.codebook_size))

    @fp32
    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (B, H, W) -> quantized (B, C, H, W) in {-1, +1}/sqrt(C)."""
        return self.decode_vectors(self.corners(indices))

    def corners(self, indices: torch.Tensor) -> torch.Tensor:
        """(...) int64 indices -> (..., d) corners in {-1, +1}/sqrt(d), bit i of the index -> channel i."""
        return (indices_to_bits(indices, self.in_channels).float() * 2 - 1) / math.sqrt(self.in_channels)

    def codebook_vectors(self) -> torch.Tensor:
        """(2**dim, dim) in {-1, +1}/sqrt(dim) (unit norm), row k = the little-endian bits of k: the nearest
        corner to u = z/||z|| in L2, so this is the lookup space (the unit sphere), also the output space."""
        check_enumerable(self)
        return self.corners(torch.arange(self.codebook_size))
