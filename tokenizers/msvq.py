"""VAR's multi-scale residual VQ (Tian et al. 2024, arXiv 2404.02905; FoundationVision/VAR ``models/quant.py``).

One shared codebook quantizes the residual at a growing list of square scales; every scale's code map is
upsampled to full size, refined by a (partially shared) 3x3 conv phi and added to f_hat. Besides the
Quantizer contract this module is the VAR generator's interface: ``scales``, ``embed``, ``next_input``,
``teacher_inputs``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tokenizers.nearest_code import nearest_code
from tokenizers.quantizer import Quantizer, QuantizerOutput, batch_code_stats, fp32


def phi_ticks(n: int) -> list[float]:
    """VAR's tick positions of n shared phi convs on [0, 1]: np.linspace(m, 1 - m, n), m = 1/(3n) if n == 4 else 1/(2n).

    n = 4 gives linspace(1/12, 11/12, 4), the value VAR uses with its default ``share_quant_resi=4``. Computed in
    float64 exactly as numpy does (i * step + start, the last tick = stop), because the nearest-tick choice has
    float near-ties (10 scales: scales 2 and 7 sit halfway between two ticks; VAR picks 1 and 3).
    """
    if n == 1:
        return [0.5]
    start = 1 / 3 / n if n == 4 else 1 / 2 / n
    stop = 1 - start
    step = (stop - start) / (n - 1)
    return [i * step + start for i in range(n - 1)] + [stop]


class Phi(nn.Module):
    """phi(h) = (1 - r) h + r Conv3x3(h): VAR's refinement of an upsampled code map."""

    def __init__(self, dim: int, ratio: float):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)
        self.ratio = abs(ratio)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * (1 - self.ratio) + self.conv(h) * self.ratio


class MultiScaleVQ(Quantizer):
    """Residual VQ over scales s_1 < ... < s_K (the last = latent size), indices a list of (B, s_k, s_k) maps.

    Per scale k: r = area_down(f_rest, s_k), idx = nearest code (cosine if ``l2_norm``), h = phi_k(bicubic_up(E[idx])),
    f_hat += h, f_rest -= h (f_rest starts from sg(f)). Loss = mean over scales of
    ``beta * mse(sg(f_hat_k), f) + mse(f_hat_k, sg(f))``; output f + sg(f_hat - f).
    ``share_quant_resi`` = n convs shared by nearest tick (``phi_ticks``) to k/(K-1); 0 means one per scale.
    ``quant_resi`` = 0 makes phi the identity.
    """

    multiscale = True

    def __init__(self, dim: int, codebook_size: int, scales=(1, 2, 3, 4, 6, 8), beta: float = 0.25,
                 quant_resi: float = 0.5, share_quant_resi: int = 4, l2_norm: bool = False):
        super().__init__()
        self.scales = [int(s) for s in scales]
        if any(a >= b for a, b in zip(self.scales, self.scales[1:])):
            raise ValueError(f"MultiScaleVQ scales must be strictly increasing, got {self.scales}")
        self.in_channels = self.out_channels = dim
        self.codebook_size = codebook_size
        self.beta, self.l2_norm = beta, l2_norm
        self.embedding = nn.Embedding(codebook_size, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        n = share_quant_resi or len(self.scales)
        self.phis = nn.ModuleList([Phi(dim, quant_resi) if abs(quant_resi) > 1e-6 else nn.Identity() for _ in range(n)])
        ticks = phi_ticks(n)
        last = max(len(self.scales) - 1, 1)
        # scale k uses the phi whose tick is nearest k/(K-1) (first one on ties, like np.argmin)
        self.phi_index = [min(range(n), key=lambda i: (abs(ticks[i] - k / last), i)) for k in range(len(self.scales))]

    # -- building blocks --------------------------------------------------------------------------
    @property
    def full_size(self) -> int:
        return self.scales[-1]

    def token_shape(self, latent_hw: tuple[int, int]):
        """[(s_k, s_k) for each scale]; the last scale must equal the latent size."""
        if tuple(latent_hw) != (self.full_size, self.full_size):
            raise ValueError(f"MultiScaleVQ's last scale is {self.full_size} but the latent grid is {tuple(latent_hw)}; "
                             f"set scales[-1] = {latent_hw[0]} (square latents only)")
        return [(s, s) for s in self.scales]

    def phi(self, k: int) -> nn.Module:
        """The refinement conv used at scale index k."""
        return self.phis[self.phi_index[k]]

    def upsample(self, h: torch.Tensor) -> torch.Tensor:
        """(B, C, s, s) -> (B, C, S, S) bicubic, S the last scale (identity when s == S)."""
        s = self.full_size
        return h if h.shape[-1] == s else F.interpolate(h, size=(s, s), mode="bicubic")

    @staticmethod
    def downsample(f: torch.Tensor, s: int) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, s, s) area interpolation (identity when already s)."""
        return f if f.shape[-1] == s and f.shape[-2] == s else F.interpolate(f, size=(s, s), mode="area")

    def lookup(self, r: torch.Tensor) -> torch.Tensor:
        """(B, C, s, s) residual -> (B, s, s) nearest code indices (no gradient)."""
        b, c, h, w = r.shape
        x = r.detach().permute(0, 2, 3, 1).reshape(-1, c)  # (N, C)
        if self.l2_norm:
            x = F.normalize(x, dim=-1)
        return nearest_code(x, self.codebook_vectors()).view(b, h, w)

    def codebook_vectors(self) -> torch.Tensor:
        """(V, C) codes the lookup compares residuals against: E, or E l2-normalized with ``l2_norm`` (cosine
        lookup, as VAR's ``using_znorm``); detached. Each scale's contribution is built from the raw E[idx]
        (``embed``), so with ``l2_norm`` the decoder sees E, not these vectors."""
        e = self.embedding.weight.detach().float()  # (V, C)
        return F.normalize(e, dim=-1) if self.l2_norm else e

    def decode_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        """Not defined for multi-scale maps: a code's vector enters f_hat through ``contribution`` (upsampling, phi)."""
        raise NotImplementedError("MultiScaleVQ decodes lists of per-scale index maps: use decode_indices, or embed / "
                                  "contribution for one scale's code vectors")

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, s, s) (or flattened (B, s*s)) -> code vectors (B, C, s, s)."""
        if idx.dim() == 2:
            s = math.isqrt(idx.shape[1])
            idx = idx.view(idx.shape[0], s, s)
        return self.embedding(idx).permute(0, 3, 1, 2).float()  # (B, C, s, s)

    def contribution(self, k: int, idx_k: torch.Tensor) -> torch.Tensor:
        """Scale k's term of f_hat: phi_k(bicubic_up(E[idx_k])), (B, C, S, S)."""
        return self.phi(k)(self.upsample(self.embed(idx_k)))

    # -- the contract -------------------------------------------------------------------------
    @fp32
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """z (B, C, S, S) -> quantized (B, C, S, S), indices [(B, s_k, s_k) for each scale]."""
        if z.shape[-2:] != (self.full_size, self.full_size):
            raise ValueError(f"MultiScaleVQ with scales {self.scales} needs a {self.full_size}x{self.full_size} "
                             f"latent, got {tuple(z.shape[-2:])}")
        z_detached = z.detach()
        f_rest = z_detached  # residual bookkeeping never carries gradient
        f_hat = torch.zeros_like(z)
        loss, indices = z.new_zeros(()), []
        for k, s in enumerate(self.scales):
            idx = self.lookup(self.downsample(f_rest, s))  # (B, s, s)
            h = self.contribution(k, idx)  # (B, C, S, S)
            f_hat = f_hat + h
            f_rest = f_rest - h.detach()
            loss = loss + self.beta * F.mse_loss(f_hat.detach(), z) + F.mse_loss(f_hat, z_detached)
            indices.append(idx)
        loss = loss / len(self.scales)
        quantized = z + (f_hat - z).detach()  # straight-through
        flat = torch.cat([i.reshape(-1) for i in indices])
        return QuantizerOutput(quantized, indices, loss, batch_code_stats(flat, self.codebook_size))

    def decode_indices(self, indices) -> torch.Tensor:
        """[(B, s_k, s_k) for k < n] for the full list or any prefix of scales -> f_hat (B, C, S, S)."""
        if not 0 < len(indices) <= len(self.scales):
            raise ValueError(f"expected 1 to {len(self.scales)} index maps, got {len(indices)}")
        with torch.autocast(device_type=indices[0].device.type, enabled=False):
            f_hat = 0
            for k, idx in enumerate(indices):
                f_hat = f_hat + self.contribution(k, idx)
            return f_hat

    # -- the VAR generator's interface ------------------------------------------------------
    def next_input(self, f_hat: torch.Tensor | None, k: int, idx_k: torch.Tensor):
        """Add scale k's term to f_hat (B, C, S, S) (zeros or None at k = 0); return (f_hat_new, next_in).

        next_in = area_down(f_hat_new, scales[k+1]), (B, C, s_{k+1}, s_{k+1}), or None after the last scale.
        f_hat is not modified in place.
        """
        with torch.autocast(device_type=idx_k.device.type, enabled=False):
            h = self.contribution(k, idx_k)  # (B, C, S, S)
            f_hat = h if f_hat is None else f_hat.float() + h
            next_in = self.downsample(f_hat, self.scales[k + 1]) if k + 1 < len(self.scales) else None
            return f_hat, next_in

    def teacher_inputs(self, indices, with_f_hat: bool = False):
        """Index maps of the first N scales -> (B, n, C) inputs of scales 1..min(N, K-1), n = their token count.

        The concatenated, flattened next_in of those scales: with all K (or the first K-1) ground-truth maps,
        VAR's teacher-forcing input (``idxBl_to_var_input``, n = L - s_0**2); with a prefix of N < K sampled maps,
        the input that prefills scales 0..N at once (collaborative decoding). ``with_f_hat``: also return f_hat
        (B, C, S, S) after those scales.
        """
        b = indices[0].shape[0]
        with torch.autocast(device_type=indices[0].device.type, enabled=False):
            f_hat, chunks = None, []
            for k in range(min(len(indices), len(self.scales) - 1)):
                f_hat, next_in = self.next_input(f_hat, k, indices[k])
                chunks.append(next_in.flatten(2).transpose(1, 2))  # (B, s_{k+1}^2, C)
            inputs = (torch.cat(chunks, dim=1) if chunks
                      else self.embedding.weight.new_zeros(b, 0, self.in_channels).float())
            return (inputs, f_hat) if with_f_hat else inputs
