"""FlowAR: scale-wise autoregression over continuous VAE latents with a flow-matching head (Ren et al. 2024).

A latent x (B, C, S, S) is seen at scales s_0 < ... < s_{K-1} = S (doubling): the target of scale k is
area_down(x, s_k). The trunk input of scale k+1 is the scale-k latent bicubic-upsampled to S, then
area-resized to s_{k+1}; scale 0's input is the class embedding. The trunk is a block-causal transformer
(RMSNorm, SwiGLU, 2D RoPE, learned positions, AdaLN from the class) with the same KV cache as VAR. A small
AdaLN transformer head, conditioned per token on the trunk output and on the time, predicts the flow
velocity of the whole scale: x_t = (1-t) x + t eps, v = eps - x, sampled with Euler from t=1 to t=0.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from decoding.sampling import SamplingConfig
from generators.layers import (Attention, CacheAccess, CachedBlocksMixin, ClassEmbedding, Mlp, RMSNorm, SwiGLU,
                               block_causal_mask, count_calls, modulate, rope_grid_angles, scale_bounds, scale_levels,
                               swiglu_hidden)


#################################################################################
#                                  Euler sampler                                #
#################################################################################

@torch.no_grad()
def euler_sample(velocity_fn: Callable[[torch.Tensor, float], torch.Tensor], noise: torch.Tensor,
                 num_steps: int = 25, timesteps: Sequence[float] | None = None) -> torch.Tensor:
    """Integrate dx/dt = v(x, t) from t=1 (noise) to t=0 (data) with Euler steps.

    velocity_fn(x, t) -> v with x's shape, t a Python float. ``timesteps`` (decreasing, from 1 to 0)
    overrides the uniform grid of ``num_steps`` steps.
    """
    ts = list(timesteps) if timesteps is not None else torch.linspace(1.0, 0.0, num_steps + 1).tolist()
    x = noise
    for t, t_next in zip(ts[:-1], ts[1:]):
        x = x + (t_next - t) * velocity_fn(x, t)  # dt < 0
    return x


#################################################################################
#                            Flow-matching head                                 #
#################################################################################

class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of 1000 t followed by a two-layer MLP (DiT)."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = 1000.0 * t.float()[:, None] * freqs[None]  # (B, half)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, freq_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))  # (B, dim)


class HeadBlock(nn.Module):
    """Head transformer block with per-token AdaLN-Zero modulation from SiLU(t_emb + c)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(width, round(width * mlp_ratio))
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x, cc):
        # x, cc (B, n, W) -> 6 x (B, n, W)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada_lin(cc).chunk(6, dim=-1)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FlowHead(nn.Module):
    """Velocity v(x_t, t | z) of one scale's tokens: AdaLN transformer over the scale, zero-initialized output."""

    def __init__(self, channels: int, cond_dim: int, width: int = 256, depth: int = 2, heads: int | None = None,
                 mlp_ratio: float = 4.0):
        super().__init__()
        self.channels = channels
        self.x_proj = nn.Linear(channels, width)
        self.c_proj = nn.Linear(cond_dim, width)
        self.t_embed = TimestepEmbedder(width)
        self.blocks = nn.ModuleList([HeadBlock(width, heads or max(1, width // 64), mlp_ratio) for _ in range(depth)])
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.out = nn.Linear(width, channels)
        self.initialize_weights()

    def initialize_weights(self):
        def _init(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.apply(_init)
        nn.init.normal_(self.t_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[2].weight, std=0.02)
        for lin in [blk.ada_lin[-1] for blk in self.blocks] + [self.final_ada[-1], self.out]:  # AdaLN-Zero
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """x (B, n, C) noisy tokens, t (B,) in [0, 1], z (B, n, D) trunk outputs -> velocity (B, n, C)."""
        cc = self.t_embed(t)[:, None] + self.c_proj(z)  # (B, n, W)
        h = self.x_proj(x)  # (B, n, W)
        for blk in self.blocks:
            h = blk(h, cc)
        shift, scale = self.final_ada(cc).chunk(2, dim=-1)
        return self.out(modulate(self.final_norm(h), shift, scale))  # (B, n, C)

    def loss(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Flow-matching MSE for clean tokens x (B, n, C) given z (B, n, D): t ~ U(0,1) per sample -> (B,)."""
        t = torch.rand(x.shape[0], device=x.device)
        eps = torch.randn_like(x)
        tt = t.view(-1, 1, 1).to(x.dtype)
        x_t = (1 - tt) * x + tt * eps
        v = self.forward(x_t, t, z)
        return (v.float() - (eps - x).float()).pow(2).mean(dim=(1, 2))  # (B,)

    @torch.no_grad()
    def sample(self, z: torch.Tensor, num_steps: int = 25, cfg: float = 1.0, guidance_until: float = 1.0,
               generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
               timesteps: Sequence[float] | None = None) -> torch.Tensor:
        """Euler-sample tokens (B, n, C) given z: (B, n, D), or (2B, n, D) = [cond; uncond] when cfg != 1.

        Guidance v = v_u + cfg (v_c - v_u) is applied while t <= guidance_until; above it only the
        conditional half runs.
        """
        guided = cfg != 1.0
        B = z.shape[0] // 2 if guided else z.shape[0]
        if noise is None:
            noise = torch.randn(B, z.shape[1], self.channels, generator=generator, device=z.device, dtype=z.dtype)

        def velocity(x, t):
            if guided and t <= guidance_until:
                v = self.forward(torch.cat([x, x]), torch.full((2 * B,), t, device=x.device), z)  # (2B, n, C)
                v_c, v_u = v.chunk(2)
                return v_u + cfg * (v_c - v_u)
            return self.forward(x, torch.full((B,), t, device=x.device), z[:B])

        return euler_sample(velocity, noise, num_steps, timesteps)


#################################################################################
#                                   Trunk blocks                                #
#################################################################################

class AdaLNBlock(nn.Module):
    """Llama block (RMSNorm, RoPE attention, SwiGLU) with class-driven AdaLN-Zero modulation."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.norm1 = RMSNorm(dim, affine=False)
        self.attn = Attention(dim, heads, proj_dropout=dropout)
        self.norm2 = RMSNorm(dim, affine=False)
        self.ffn = SwiGLU(dim, swiglu_hidden(dim, mlp_ratio), dropout)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, rope, mask=None, cache=None):
        # x (B, N, D), c (B, D) -> 6 x (B, D)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada_lin(c).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1), rope, mask, cache=cache)
        return x + gate2[:, None] * self.ffn(modulate(self.norm2(x), shift2, scale2))


#################################################################################
#                                     FlowAR                                    #
#################################################################################

class FlowAR(CachedBlocksMixin, nn.Module):
    """Scale-wise autoregressive flow matching: block-causal trunk + per-scale flow head."""

    def __init__(self, latent_channels: int, num_classes: int, scales=(1, 2, 4, 8), dim: int = 768, depth: int = 12,
                 heads: int = 12, head_depth: int = 2, head_dim: int = 1024, class_dropout: float = 0.1,
                 mlp_ratio: float = 4.0, dropout: float = 0.0, scale_weights: Sequence[float] | None = None,
                 rope_base: float = 10000.0):
        super().__init__()
        self.latent_channels, self.num_classes = latent_channels, num_classes
        self.scales = tuple(int(s) for s in scales)
        if any(b != 2 * a for a, b in zip(self.scales, self.scales[1:])):
            raise ValueError(f"FlowAR scales must double, got {self.scales}")
        self.dim, self.class_dropout = dim, class_dropout
        self.bounds = scale_bounds(self.scales)
        self.L = self.max_cache_len = self.bounds[-1][1]
        self.first_l = self.scales[0] ** 2
        K = len(self.scales)
        weights = torch.ones(K) if scale_weights is None else torch.as_tensor(scale_weights, dtype=torch.float32)
        self.register_buffer("scale_weights", weights / weights.sum(), persistent=False)  # (K,)

        self.class_emb = ClassEmbedding(num_classes, dim, class_dropout)  # row num_classes = null class
        self.pos_start = nn.Parameter(torch.zeros(1, self.first_l, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.L, dim))
        self.lvl_embed = nn.Embedding(K, dim)
        self.input_proj = nn.Linear(latent_channels, dim)
        self.blocks = nn.ModuleList([AdaLNBlock(dim, heads, mlp_ratio, dropout) for _ in range(depth)])
        self.norm = RMSNorm(dim)
        self.head = FlowHead(latent_channels, dim, head_dim, head_depth)

        # 2D RoPE per scale, positions at the cell centres in finest-grid units so scales line up
        head_d, S = dim // heads, self.scales[-1]
        angles = torch.cat([rope_grid_angles(s, s, head_d, rope_base, step=S / s, offset=(S / s - 1) / 2)
                            for s in self.scales])  # (L, head_d/2)
        self.register_buffer("rope_cos", angles.cos().float(), persistent=False)
        self.register_buffer("rope_sin", angles.sin().float(), persistent=False)
        self.register_buffer("lvl", scale_levels(self.scales), persistent=False)  # (L,)
        self.register_buffer("attn_mask", block_causal_mask(self.scales), persistent=False)  # (L, L) bool

        self._cond_emb: torch.Tensor | None = None  # (B, D) class embedding of the cached sequence
        self.initialize_weights()

    def initialize_weights(self):
        def _init(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for module in (self.input_proj, self.blocks):
            module.apply(_init)
        for emb in (self.class_emb, self.lvl_embed):
            nn.init.normal_(emb.weight, std=0.02)
        for p in (self.pos_start, self.pos_embed):
            nn.init.normal_(p, std=0.02)
        for blk in self.blocks:  # AdaLN-Zero
            nn.init.zeros_(blk.ada_lin[-1].weight)
            nn.init.zeros_(blk.ada_lin[-1].bias)
        self.head.initialize_weights()

    # -- the generator interface (decoding/ar.py, the LightningModule and sample.py call only these) --------
    kind = "flowar"
    layout = "latent"  # token cache layout: (N, C, h, w) latents times the tokenizer's scale factor

    @staticmethod
    def check_tokenizer(quantizer, tokenizer_path) -> None:
        """A ValueError unless the tokenizer is continuous (tokenizer=kl)."""
        if not getattr(quantizer, "continuous", False):
            raise ValueError(f"generator=flowar needs a continuous tokenizer (tokenizer=kl), but {tokenizer_path} is "
                             f"a {type(quantizer).__name__} tokenizer")

    @staticmethod
    def model_args(tokenizer, image_size: int, num_classes: int, model_cfg: dict) -> dict:
        """Constructor arguments from the tokenizer and the data: latent channels, classes."""
        h, w = tokenizer.token_shape(image_size)
        scales = list(model_cfg.get("scales") or [])
        if h != w or (scales and scales[-1] != h):
            raise ValueError(f"generator.model.scales={scales} must end at the kl tokenizer's latent size {h}x{w} "
                             f"(square latents only), e.g. scales=[1,2,4,{h}]")
        return {"latent_channels": int(tokenizer.quantizer.out_channels), "num_classes": num_classes}

    def loss(self, codes: torch.Tensor, labels: torch.Tensor, tokenizer=None, objective=None):
        """Flow-matching loss of cached latents (B, C, S, S) -> (loss, None): no token accuracy."""
        if objective is not None:
            raise ValueError("FlowAR has no token logits: train_scales and distillation apply to GPT and VAR")
        return self(codes.float(), labels), None

    @staticmethod
    def describe_sampling(s: SamplingConfig) -> str:
        """The sampling settings that matter here, in one line."""
        return f"cfg {s.cfg_scale:g}, {s.num_steps} Euler steps, guidance while t <= {s.guidance_until:g}"

    def head_evaluations(self, forward_passes: int, sampling: SamplingConfig) -> int:
        """Flow-head evaluations behind ``forward_passes`` trunk passes (one Euler integration per scale)."""
        return forward_passes * sampling.num_steps

    @property
    def num_tokens(self) -> int:
        """Tokens per generated sequence."""
        return self.L

    def forward_counter(self) -> count_calls:
        """Counts target forward passes (trunk calls; the head's Euler evaluations are not trunk passes)."""
        return count_calls(self.blocks[0])

    @staticmethod
    def tokens_to_images(tokenizer, tokens: torch.Tensor, info: dict) -> torch.Tensor:
        """Scaled latents (B, C, S, S) -> images (B, C, H, W) through the kl decoder."""
        return tokenizer.decode(tokens.float() / info.get("scale_factor", 1.0))

    # -- scales of a latent ---------------------------------------------------------------------
    def scale_targets(self, latent: torch.Tensor) -> list[torch.Tensor]:
        """latent (B, C, S, S) -> [area_down(latent, s_k) (B, C, s_k, s_k)] for every scale."""
        return [latent if s == latent.shape[-1] else F.interpolate(latent, size=(s, s), mode="area")
                for s in self.scales]

    def next_input(self, x_k: torch.Tensor, k: int) -> torch.Tensor:
        """Scale-k latent (B, C, s_k, s_k) -> trunk input of scale k+1 (B, C, s_{k+1}, s_{k+1})."""
        S, s = self.scales[-1], self.scales[k + 1]
        up = F.interpolate(x_k, size=(S, S), mode="bicubic", align_corners=False)  # (B, C, S, S)
        return up if s == S else F.interpolate(up, size=(s, s), mode="area")

    def teacher_inputs(self, latent: torch.Tensor) -> torch.Tensor:
        """latent (B, C, S, S) -> trunk inputs of scales 1..K-1 from the true coarser scales (B, L - s_0^2, C)."""
        targets = self.scale_targets(latent)
        return torch.cat([self.next_input(targets[k], k).flatten(2).transpose(1, 2)
                          for k in range(len(self.scales) - 1)], dim=1)

    # -- trunk ----------------------------------------------------------------------------------
    def _embed(self, c, inputs, begin: int) -> torch.Tensor:
        """Tokens [begin, begin+n) from the SOS (when begin == 0) and inputs (B, m, C_lat) -> (B, n, D)."""
        parts = [c[:, None] + self.pos_start] if begin == 0 else []  # (B, first_l, D)
        if inputs is not None and inputs.shape[1] > 0:
            parts.append(self.input_proj(inputs))  # (B, m, D)
        x = torch.cat(parts, dim=1)
        end = begin + x.shape[1]
        if end not in [e for _, e in self.bounds]:
            raise ValueError(f"tokens [{begin}, {end}) do not end on a scale boundary of {self.scales}")
        return x + self.lvl_embed(self.lvl[begin:end]) + self.pos_embed[:, begin:end]

    def _run(self, x, c, begin: int, mask=None, cache=None) -> torch.Tensor:
        """Trunk blocks on x (B, n, D) at tokens [begin, begin+n) -> z (B, n, D), the head's condition."""
        rope = (self.rope_cos[begin:begin + x.shape[1]], self.rope_sin[begin:begin + x.shape[1]])
        for blk in self.blocks:
            x = blk(x, c, rope, mask=mask, cache=cache)
        return self.norm(x)

    def trunk(self, inputs: torch.Tensor | None, cond: torch.Tensor) -> torch.Tensor:
        """Teacher-forced trunk: inputs (B, T - s_0^2, C_lat) of scales 1.., cond (B,) -> z (B, T, D)."""
        c = self.class_emb(cond)  # (B, D), label dropout in training
        x = self._embed(c, inputs, 0)  # (B, T, D)
        T = x.shape[1]
        return self._run(x, c, 0, mask=self.attn_mask[:T, :T])

    def prefill(self, cond: torch.Tensor, inputs: torch.Tensor | None = None) -> torch.Tensor:
        """Reset the cache and run scales 0..N in one block-causal pass.

        cond (B,), inputs (B, n, C_lat) of scales 1..N or None -> z (B, T, D), T = end of scale N.
        """
        self._check_cache()
        c = self.class_emb(cond)
        self._cond_emb = c
        x = self._embed(c, inputs, 0)
        T = x.shape[1]
        z = self._run(x, c, 0, mask=self.attn_mask[:T, :T] if T > self.first_l else None, cache=CacheAccess(0, T))
        self._set_length(T)
        return z

    def step(self, inputs: torch.Tensor, scale: int) -> torch.Tensor:
        """One scale k >= 1 over the cache (holding scales 0..k-1): inputs (B, s_k^2, C_lat) -> z (B, s_k^2, D)."""
        begin, end = self.bounds[scale]
        if scale < 1 or self.cache_length != begin or self._cond_emb is None:
            raise ValueError(f"step(scale={scale}) needs a cache holding {begin} tokens, it holds {self.cache_length}")
        z = self._run(self._embed(self._cond_emb, inputs, begin), self._cond_emb, begin, cache=CacheAccess(begin, end))
        self._set_length(end)
        return z

    # -- training -------------------------------------------------------------------------------
    def flow_loss(self, latent: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Flow-matching loss of latents (B, C, S, S) with labels (B,): per-scale MSE, weighted by scale_weights."""
        targets = self.scale_targets(latent)
        z = self.trunk(self.teacher_inputs(latent), cond)  # (B, L, D)
        total = latent.new_zeros((), dtype=torch.float32)
        for k, (begin, end) in enumerate(self.bounds):
            x_k = targets[k].flatten(2).transpose(1, 2)  # (B, s_k^2, C)
            total = total + self.scale_weights[k] * self.head.loss(x_k, z[:, begin:end]).mean()
        return total

    def forward(self, latent: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Training loss (a scalar); flow matching has no logits."""
        return self.flow_loss(latent, cond)

    # -- sampling -------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, cond: torch.Tensor, sampling: SamplingConfig | None = None,
               generator: torch.Generator | None = None, tokenizer=None, return_all: bool = False,
               num_steps: int | None = None, cfg: float | None = None, guidance_until: float | None = None,
               use_cache: bool = True, compile: bool = False):
        """The reference sampler: latents (B, C, S, S) for labels cond (B,) (every scale's with ``return_all``).

        ``num_steps``, ``cfg``, ``guidance_until`` override the SamplingConfig's num_steps, cfg_scale and
        guidance_until.

        One cached trunk pass per scale, then ``num_steps`` Euler steps of the head. Guidance ramps per
        scale, w_k = (cfg - 1) k / (K-1) + 1 (scale 0 unguided), applied while t <= guidance_until.
        """
        if not use_cache or compile:
            raise ValueError("FlowAR samples over its KV cache, eagerly (use_cache=false and compile=true apply to "
                             "GPT)")
        sampling = sampling or SamplingConfig()
        cfg = sampling.cfg_scale if cfg is None else cfg
        num_steps = sampling.num_steps if num_steps is None else num_steps
        guidance_until = sampling.guidance_until if guidance_until is None else guidance_until
        B, K = cond.shape[0], len(self.scales)
        guided = cfg != 1.0
        labels = self.class_emb.with_null(cond) if guided else cond  # (B',)
        self.setup_cache(labels.shape[0], self.L, device=cond.device)
        outs = []
        for k, s in enumerate(self.scales):
            # 1. trunk over the whole scale: the class SOS first, then the upsampled previous latent
            z = self.prefill(labels) if k == 0 else self.step(next_in.repeat(labels.shape[0] // B, 1, 1), k)
            # 2. the head integrates the scale's tokens from noise with a guidance ramp
            w = (cfg - 1) * k / max(K - 1, 1) + 1 if guided else 1.0
            zz = z if w != 1.0 else z[:B]
            x = self.head.sample(zz, num_steps, w, guidance_until, generator)  # (B, s^2, C)
            x = x.transpose(1, 2).reshape(B, self.latent_channels, s, s)  # (B, C, s, s)
            outs.append(x)
            # 3. the next scale's input: bicubic to full size, area down to s_{k+1}
            if k + 1 < K:
                next_in = self.next_input(x, k).flatten(2).transpose(1, 2)  # (B, s_{k+1}^2, C)
        self.free_cache()
        return outs if return_all else outs[-1]


#################################################################################
#                                  FlowAR Configs                               #
#################################################################################

FlowAR_models = {
    "FlowAR-S": dict(dim=768, depth=12, heads=12, head_depth=2, head_dim=1024),
    "FlowAR-L": dict(dim=1024, depth=16, heads=16, head_depth=12, head_dim=1024),
    "FlowAR-H": dict(dim=1536, depth=30, heads=24, head_depth=12, head_dim=1536),
    "FlowAR-demo": dict(dim=128, depth=4, heads=4, head_depth=2, head_dim=128),
}


def build_flowar(name: str, **kwargs) -> FlowAR:
    """FlowAR_models[name] merged with kwargs (latent_channels, num_classes, scales, ...)."""
    return FlowAR(**{**FlowAR_models[name], **kwargs})
