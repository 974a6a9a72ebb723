"""The quantizer contract shared by every tokenizer in tokar.

Every quantizer maps an encoder feature map ``z: (B, C, H, W)`` to a
``QuantizerOutput`` and can rebuild the quantized map from its indices.
Quantization always runs in fp32, whatever autocast says (bf16 costs FSQ half
its codes, lucidrains/vector-quantize-pytorch#114).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn


class QuantizerOutput(NamedTuple):
    """What every quantizer's forward returns."""

    quantized: torch.Tensor  # (B, C_out, H, W), straight-through in training
    indices: Any  # (B, H, W) int64; a list of (B, h_k, w_k) for multi-scale; None for continuous
    loss: torch.Tensor  # scalar; a zero tensor (never None) when the method has no loss
    stats: dict  # scalar tensors worth logging (e.g. batch perplexity), may be empty


def fp32(fn):
    """Run a quantizer method with autocast off and floating inputs cast to fp32."""

    def wrapped(self, z, *args, **kwargs):
        device_type = z.device.type if z.device.type in ("cuda", "cpu") else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            return fn(self, z.float() if z.is_floating_point() else z, *args, **kwargs)

    wrapped.__doc__ = fn.__doc__
    wrapped.__name__ = fn.__name__
    return wrapped


class Quantizer(nn.Module):
    """Base class: subclasses set ``in_channels``, ``out_channels`` and ``codebook_size``.

    ``in_channels`` is what the encoder's quant conv must produce, ``out_channels``
    what ``quantized`` has (they differ only for the KL posterior, whose input holds
    mean and log-variance). ``codebook_size`` is None for continuous latents.
    """

    in_channels: int
    out_channels: int
    codebook_size: int | None
    multiscale: bool = False
    continuous: bool = False

    def forward(self, z: torch.Tensor) -> QuantizerOutput:  # pragma: no cover - interface
        raise NotImplementedError

    def decode_indices(self, indices) -> torch.Tensor:  # pragma: no cover - interface
        """indices (as returned by forward) -> quantized map (B, C_out, H, W)."""
        raise NotImplementedError

    def token_shape(self, latent_hw: tuple[int, int]):
        """The index grid for a latent of size (h, w): (h, w), or a list per scale."""
        return tuple(latent_hw)

    def codebook_vectors(self) -> torch.Tensor:  # pragma: no cover - interface
        """All K code vectors, (K, d) fp32, row k = code k, in the space the nearest-code lookup runs in.

        That is the space where L2 distance decides which code an encoder vector gets (after any input
        projection and normalization), implicit grids enumerated (FSQ, LFQ, BSQ, Bernoulli). For single-scale
        quantizers ``decode_indices(i) == decode_vectors(codebook_vectors()[i])``. Continuous quantizers have
        no codebook and raise.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement codebook_vectors()")

    @fp32
    def decode_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        """Code vectors (B, H, W, d) in the lookup space -> quantized map (B, C_out, H, W) (single-scale only).

        This default is for quantizers whose lookup space is their output space (SimVQ, LFQ, BSQ, Bernoulli);
        those with an output projection (VQ, FSQ) apply it.
        """
        return vectors.permute(0, 3, 1, 2)


def zero_loss(ref: torch.Tensor) -> torch.Tensor:
    """A scalar zero on ref's device that still takes part in autograd graphs."""
    return ref.new_zeros(())


def batch_code_stats(indices: torch.Tensor, codebook_size: int) -> dict:
    """Per-batch 'active %' and perplexity of the code histogram (for logging only)."""
    flat = indices.reshape(-1)
    if codebook_size <= 1 << 22:
        counts = torch.bincount(flat, minlength=codebook_size).float()
    else:
        counts = torch.unique(flat, return_counts=True)[1].float()
    probs = counts / counts.sum().clamp_min(1)
    entropy = -(probs * torch.log(probs.clamp_min(1e-10))).sum()
    return {"active": (counts > 0).sum().float() / codebook_size, "perplexity": entropy.exp()}


MAX_ENUMERATED_CODES = 1 << 22  # an implicit grid enumerated by codebook_vectors(): 4M rows at most


def check_enumerable(quantizer: Quantizer) -> None:
    """Raise a clear error when an implicit grid is too large to enumerate as a (K, d) tensor."""
    k = quantizer.codebook_size
    if k > MAX_ENUMERATED_CODES:
        raise ValueError(f"{type(quantizer).__name__} has {k} codes (2^{k.bit_length() - 1}); codebook_vectors() would "
                         f"enumerate all of them as a (K, d) tensor, and the limit is {MAX_ENUMERATED_CODES} "
                         f"(2^{MAX_ENUMERATED_CODES.bit_length() - 1}). Use a smaller code (fewer bits or levels)")

