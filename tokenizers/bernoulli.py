"""Bernoulli binary latents (Binary Latent Diffusion, Wang et al. 2023, arXiv 2304.04820; ``binaryae.py``)."""
from __future__ import annotations

import torch

from tokenizers.lfq import bits_to_indices, indices_to_bits
from tokenizers.quantizer import Quantizer, QuantizerOutput, batch_code_stats, check_enumerable, fp32


class BernoulliBinary(Quantizer):
    """The encoder gives one logit per bit, p = sigmoid(z); bits b ~ Bernoulli(p) in training, b = 1[p > 0.5] otherwise.

    ``quantized`` is the {0, 1} bit map itself (the tokenizer's post-quant 1x1 conv plays the role of the
    paper's bias-free ``nn.Embedding(C, D)`` sum); training uses the straight-through ``b + p - sg(p)``.
    Unlike the official code, eval is deterministic (``deterministic=True`` makes training so as well).
    Loss = ``prior_weight * mean(p (1 - p))`` (the paper's code_weight, default 0).
    Indices pack the bits little-endian into int64 like LFQ (channel 0 = least significant bit), so dim <= 62.
    """

    def __init__(self, dim: int, prior_weight: float = 0.0, deterministic: bool = False):
        super().__init__()
        if dim > 62:
            raise ValueError(f"BernoulliBinary indices are packed into int64; dim={dim} > 62 bits is not supported")
        self.in_channels = self.out_channels = dim
        self.codebook_size = 2 ** dim
        self.prior_weight = prior_weight
        self.deterministic = deterministic

    @fp32
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """z (B, C, H, W) logits -> quantized (B, C, H, W) bits in {0, 1}, indices (B, H, W)."""
        p = torch.sigmoid(z)  # (B, C, H, W)
        if self.training and not self.deterministic:
            bits = torch.bernoulli(p.detach())
        else:
            bits = (p > 0.5).float()
        quantized = bits + (p - p.detach())  # straight-through b + p - sg(p), value exactly the bits
        loss = self.prior_weight * (p * (1 - p)).mean()
        indices = bits_to_indices(bits.permute(0, 2, 3, 1) > 0.5)  # (B, H, W)
        return QuantizerOutput(quantized, indices, loss, batch_code_stats(indices, self.codebook_size))

    @fp32
    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (B, H, W) -> bits (B, C, H, W) in {0, 1}."""
        return self.decode_vectors(indices_to_bits(indices, self.in_channels).float())

    def codebook_vectors(self) -> torch.Tensor:
        """(2**dim, dim) in {0, 1}, row k = the little-endian bits of k. There is no argmin here; the deterministic
        code 1[p > 0.5] is the nearest corner of [0, 1]^d to p = sigmoid(z) in L2, so the bit space is the lookup
        space (and the output space)."""
        check_enumerable(self)
        return indices_to_bits(torch.arange(self.codebook_size), self.in_channels).float()
