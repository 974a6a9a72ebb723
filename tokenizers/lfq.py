"""Lookup-free quantization (MAGVIT-v2, Yu et al. 2023, arXiv 2310.05737; Open-MAGVIT2's formulation)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenizers.quantizer import Quantizer, QuantizerOutput, batch_code_stats, fp32, zero_loss

MAX_LFQ_DIM = 16


def bits_to_indices(bits: torch.Tensor) -> torch.Tensor:
    """(..., d) bool/0-1 bits -> (...) int64, little-endian: channel i contributes 2**i."""
    weights = 2 ** torch.arange(bits.shape[-1], device=bits.device, dtype=torch.int64)
    return (bits.long() * weights).sum(-1)


def indices_to_bits(indices: torch.Tensor, d: int) -> torch.Tensor:
    """(...) int64 -> (..., d) 0/1 int64 bits, little-endian (the inverse of bits_to_indices)."""
    shifts = torch.arange(d, device=indices.device, dtype=torch.int64)
    return (indices.unsqueeze(-1) >> shifts) & 1


class LFQ(Quantizer):
    """Each channel quantized to its sign, q = where(z > 0, +1, -1); the code is the bit pattern, K = 2**dim.

    Index order is little-endian: channel 0 is the least significant bit, index = sum_i 1[q_i > 0] * 2**i
    (lucidrains is big-endian; Open-MAGVIT2 is little-endian like us).
    Loss = ``commitment_weight * mse(z, sg(q)) + entropy_weight * (w_s * mean_n H(p_n) - w_c * H(mean_n p_n))``
    with ``p_n = softmax(inv_temperature * 2 z_n . c_k)`` over all K codes and ``(w_s, w_c) =
    sample_minus_codebook``; the entropy term is computed in training only. Its memory is O(N * 2**dim), so
    dim is capped at 16: use ``tokenizers.bsq.BSQ`` (factorized entropy) for more bits.
    """

    def __init__(self, dim: int, entropy_weight: float = 0.1, commitment_weight: float = 0.25,
                 inv_temperature: float = 100.0, sample_minus_codebook: tuple[float, float] = (1.0, 1.0)):
        super().__init__()
        if dim > MAX_LFQ_DIM:
            raise ValueError(f"LFQ with dim={dim} needs an (N, 2**{dim}) entropy matrix (memory O(N*2^d)); "
                             f"use dim <= {MAX_LFQ_DIM} or tokenizers.bsq.BSQ, whose grouped entropy is O(N*d*2^g)")
        self.in_channels = self.out_channels = dim
        self.codebook_size = 2 ** dim
        self.entropy_weight = entropy_weight
        self.commitment_weight = commitment_weight
        self.inv_temperature = inv_temperature
        self.sample_weight, self.codebook_weight = (float(w) for w in sample_minus_codebook)
        codes = indices_to_bits(torch.arange(self.codebook_size), dim).float() * 2 - 1  # (K, d) in {-1, +1}
        self.register_buffer("codes", codes, persistent=False)

    def entropy_loss(self, flat: torch.Tensor) -> torch.Tensor:
        """(N, d) continuous z -> w_s * mean per-sample entropy - w_c * entropy of the batch-mean distribution."""
        logits = 2 * flat @ self.codes.t() * self.inv_temperature  # (N, K)
        log_probs = F.log_softmax(logits, dim=-1)
        probs = log_probs.exp()
        sample_entropy = -(probs * log_probs).sum(-1).mean()
        avg = probs.mean(0)  # (K,)
        codebook_entropy = -(avg * avg.clamp_min(1e-10).log()).sum()
        return self.sample_weight * sample_entropy - self.codebook_weight * codebook_entropy

    @fp32
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """z (B, C, H, W) -> quantized (B, C, H, W) in {-1, +1}, indices (B, H, W)."""
        q = torch.where(z > 0, 1.0, -1.0)  # (B, C, H, W)
        indices = bits_to_indices((z > 0).permute(0, 2, 3, 1))  # (B, H, W)
        loss = zero_loss(z)
        if self.commitment_weight:
            loss = loss + self.commitment_weight * F.mse_loss(z, q)
        if self.training and self.entropy_weight:
            flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (N, d)
            loss = loss + self.entropy_weight * self.entropy_loss(flat)
        quantized = z + (q - z).detach()  # straight-through
        return QuantizerOutput(quantized, indices, loss, batch_code_stats(indices, self.codebook_size))

    @fp32
    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (B, H, W) -> quantized (B, C, H, W) in {-1, +1}."""
        return self.decode_vectors(indices_to_bits(indices, self.in_channels).float() * 2 - 1)

    def codebook_vectors(self) -> torch.Tensor:
        """(2**dim, dim) in {-1, +1}, row k = the little-endian bits of k (bit i -> channel i): the sign is the
        nearest grid point in L2, so this is the lookup space, which is also the output space."""
        return self.codes.clone()
