"""Convolutional encoder/decoder (VQGAN-style ResBlocks) and the Tokenizer that puts encoder -> quantizer ->
decoder together behind one contract.

The defaults are tokar's own small layout (no attention, one middle ResBlock, symmetric stride-2 padding).
The taming/VQGAN layout of the official VAR and LlamaGen tokenizers is configuration of the same modules:
``attn_levels=[n-1]`` (single-head attention after every ResBlock of the lowest-resolution level),
``mid_attn=True`` (middle = ResBlock, attention, ResBlock), ``downsample_pad="asymmetric"`` (zero-pad right
and bottom by one, then a 3x3 stride-2 conv without padding) and ``decoder_res_blocks=num_res_blocks + 1``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tokenizers.quantizer import Quantizer, QuantizerOutput


def norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups that divide the channel count."""
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)


class AttnBlock(nn.Module):
    """Single-head spatial self-attention (taming): x + proj_out(softmax(q k^T / sqrt(C)) v) on GroupNorm(x)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)  # output channels [q | k | v]
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, 1, c, h * w).transpose(-1, -2).unbind(1)  # 3 x (B, 1, HW, C)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C), scale C^-1/2
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, h, w))


def downsample_layers(channels: int, pad: str) -> list[nn.Module]:
    """Halve H, W: a 3x3 stride-2 conv, padded 1 on every side ("symmetric") or only right/bottom ("asymmetric")."""
    if pad == "symmetric":
        return [nn.Conv2d(channels, channels, 3, stride=2, padding=1)]
    if pad == "asymmetric":  # taming / VAR / LlamaGen
        return [nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(channels, channels, 3, stride=2, padding=0)]
    raise ValueError(f"downsample_pad={pad!r}; use 'symmetric' (tokar) or 'asymmetric' (taming, VAR, LlamaGen)")


def middle_layers(channels: int, attention: bool, dropout: float) -> list[nn.Module]:
    """The lowest-resolution middle: one ResBlock, or ResBlock, attention, ResBlock (taming)."""
    if not attention:
        return [ResBlock(channels, channels, dropout)]
    return [ResBlock(channels, channels, dropout), AttnBlock(channels), ResBlock(channels, channels, dropout)]


class ResBlock(nn.Module):
    """Pre-activation residual block: (GN, SiLU, conv) x 2 plus a 1x1 skip when widths differ."""

    def __init__(self, c_in: int, c_out: int, dropout: float = 0.0):
        super().__init__()
        self.block = nn.Sequential(
            norm(c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1),
            norm(c_out), nn.SiLU(), nn.Dropout(dropout), nn.Conv2d(c_out, c_out, 3, padding=1),
        )
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.block(x)


class Encoder(nn.Module):
    """(B, in_ch, H, W) -> (B, z_channels, H/f, W/f) with f = 2**(len(ch_mult) - 1)."""

    def __init__(self, in_channels: int = 1, ch: int = 64, ch_mult=(1, 2, 2), num_res_blocks: int = 1,
                 z_channels: int = 64, dropout: float = 0.0, attn_levels=(), mid_attn: bool = False,
                 downsample_pad: str = "symmetric"):
        super().__init__()
        widths = [ch * m for m in ch_mult]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1)]
        c = widths[0]
        for level, w in enumerate(widths):  # level 0 = full resolution
            for _ in range(num_res_blocks):
                layers.append(ResBlock(c, w, dropout))
                c = w
                if level in attn_levels:
                    layers.append(AttnBlock(c))
            if level < len(widths) - 1:
                layers += downsample_layers(c, downsample_pad)  # halve H, W
        layers += [*middle_layers(c, mid_attn, dropout), norm(c), nn.SiLU(), nn.Conv2d(c, z_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, out_ch, h*f, w*f), the mirror of Encoder."""

    def __init__(self, out_channels: int = 1, ch: int = 64, ch_mult=(1, 2, 2), num_res_blocks: int = 1,
                 z_channels: int = 64, dropout: float = 0.0, attn_levels=(), mid_attn: bool = False):
        super().__init__()
        widths = [ch * m for m in ch_mult][::-1]
        c = widths[0]
        layers: list[nn.Module] = [nn.Conv2d(z_channels, c, 3, padding=1), *middle_layers(c, mid_attn, dropout)]
        for i, w in enumerate(widths):  # from the lowest resolution up; i is level len(widths) - 1 - i
            for _ in range(num_res_blocks):
                layers.append(ResBlock(c, w, dropout))
                c = w
                if len(widths) - 1 - i in attn_levels:
                    layers.append(AttnBlock(c))
            if i < len(widths) - 1:
                layers += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(c, c, 3, padding=1)]
        layers += [norm(c), nn.SiLU()]
        self.net = nn.Sequential(*layers)
        self.conv_out = nn.Conv2d(c, out_channels, 3, padding=1)  # VQGAN's adaptive weight reads this

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.net(z))

    @property
    def last_layer(self) -> torch.Tensor:
        return self.conv_out.weight


class Tokenizer(nn.Module):
    """images in [-1, 1] -> encoder -> quant conv -> quantizer -> post-quant conv -> decoder."""

    def __init__(self, quantizer: Quantizer, image_channels: int = 1, ch: int = 64, ch_mult=(1, 2, 2),
                 num_res_blocks: int = 1, z_channels: int = 64, dropout: float = 0.0,
                 quant_conv_kernel: int = 1, downsample: int | None = None, attn_levels=(), mid_attn: bool = False,
                 downsample_pad: str = "symmetric", decoder_res_blocks: int | None = None):
        """attn_levels, mid_attn, downsample_pad, decoder_res_blocks (None = num_res_blocks): the taming/VQGAN
        layout options (see the module docstring); the defaults are tokar's layout."""
        super().__init__()
        factor = 2 ** (len(ch_mult) - 1)
        if downsample is not None and downsample != factor:
            raise ValueError(f"downsample={downsample} does not match ch_mult={list(ch_mult)}, which downsamples by "
                             f"{factor}; use {int(math.log2(downsample)) + 1} entries in ch_mult")
        self.downsample = factor
        self.image_channels = image_channels
        attn_levels = tuple(int(i) for i in attn_levels)
        if any(not 0 <= i < len(ch_mult) for i in attn_levels):
            raise ValueError(f"attn_levels={list(attn_levels)} must index the {len(ch_mult)} levels of ch_mult")
        self.encoder = Encoder(image_channels, ch, ch_mult, num_res_blocks, z_channels, dropout, attn_levels, mid_attn,
                               downsample_pad)
        self.decoder = Decoder(image_channels, ch, ch_mult, decoder_res_blocks or num_res_blocks, z_channels, dropout,
                               attn_levels, mid_attn)
        pad = quant_conv_kernel // 2
        self.quant_conv = nn.Conv2d(z_channels, quantizer.in_channels, quant_conv_kernel, padding=pad)
        self.post_quant_conv = nn.Conv2d(quantizer.out_channels, z_channels, quant_conv_kernel, padding=pad)
        self.quantizer = quantizer

    # -- training path ---------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        """images (B, C, H, W) -> reconstruction (B, C, H, W), quantizer output."""
        q = self.quantizer(self.quant_conv(self.encoder(images)))  # quantized (B, Cq, H/f, W/f)
        return self.decode_latent(q.quantized), q

    # -- the tokenizer contract --------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor):
        """images (B, C, H, W) -> indices (B, h, w), a list per scale, or latents for continuous quantizers."""
        q = self.quantizer(self.quant_conv(self.encoder(images)))
        return q.quantized if self.quantizer.continuous else q.indices

    @torch.no_grad()
    def decode(self, indices) -> torch.Tensor:
        """indices (or latents) -> images (B, C, H, W) in [-1, 1] (not clamped)."""
        latent = indices if self.quantizer.continuous else self.quantizer.decode_indices(indices)
        return self.decode_latent(latent)

    def decode_latent(self, quantized: torch.Tensor) -> torch.Tensor:
        """quantized (B, Cq, h, w) -> images (B, C, h*f, w*f)."""
        return self.decoder(self.post_quant_conv(quantized))

    def token_shape(self, image_size: int | tuple[int, int]):
        """The token grid for an image size: (h, w), or a list of (h, w) per scale."""
        hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if hw[0] % self.downsample or hw[1] % self.downsample:
            raise ValueError(f"image size {hw} is not divisible by the tokenizer's downsampling factor {self.downsample}")
        return self.quantizer.token_shape((hw[0] // self.downsample, hw[1] // self.downsample))
