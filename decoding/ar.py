"""The plain reference sampler (``decoding=ar``): every acceleration is tested against it.

``generate(model, cond, sampling, generator, tokenizer=None) -> (tokens, stats)`` dispatches on the model:
- GPT: one token per forward. ``use_cache=True`` prefills the class token and steps one token at a time
  over the KV cache; ``use_cache=False`` reruns the full causal forward on the prefix every step (the naive
  reference). Both draw from the generator identically, so they give the same tokens for the same seed.
- VAR: ``VAR.generate`` (one cached forward per scale, CFG ramp); needs the multi-scale tokenizer.
- FlowAR: ``FlowAR.sample`` (one trunk forward per scale, Euler steps of the head); returns latents.
stats = dict(forward_passes, tokens, wall_time): forward passes of the target network (a [cond; uncond]
batch counts once), tokens per sequence, seconds.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from decoding.sampling import cfg_split_combine, sample_from_logits
from generators.flowar import FlowAR
from generators.gpt import GPT
from generators.var import VAR


@dataclass
class SamplingConfig:
    """Sampling knobs shared by every decoding method."""

    cfg_scale: float = 1.0  # GPT/FlowAR: u + s (c - u), 1 = off. VAR: ramp t = s k/(K-1), 0 = off
    temperature: float = 1.0  # <= 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    use_cache: bool = True  # GPT only: False reruns the full forward every token (reference)
    cfg_interval: int = -1  # GPT only, LlamaGen's: guidance for tokens 0..N+1 (off after decode step N), -1 = all
    num_steps: int = 25  # FlowAR: Euler steps per scale
    guidance_until: float = 1.0  # FlowAR: guidance only while t <= this

    @classmethod
    def from_any(cls, sampling) -> "SamplingConfig":
        """A SamplingConfig, a dict or a DictConfig (unknown keys, e.g. a method's own, are ignored)."""
        if isinstance(sampling, cls):
            return sampling
        if sampling is None:
            return cls()
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in dict(sampling).items() if k in names})


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate(model, cond: torch.Tensor, sampling=None, generator: torch.Generator | None = None, tokenizer=None):
    """Sample with the reference decoder -> (tokens, stats).

    cond: (B,) labels. tokens: GPT (B, L) int64; VAR a list of (B, s_k, s_k) maps; FlowAR latents (B, C, S, S).
    tokenizer: the multi-scale VQ, required for VAR.
    """
    cfg = SamplingConfig.from_any(sampling)
    was_training = model.training
    model.eval()  # important! (no label dropout)
    _sync(cond.device)
    t0 = time.perf_counter()
    try:
        if isinstance(model, VAR):
            if tokenizer is None:
                raise ValueError("VAR sampling needs tokenizer=<the multi-scale VQ>")
            tokens = model.generate(tokenizer, cond, cfg.cfg_scale, cfg.temperature, cfg.top_k, cfg.top_p, generator)
            forwards, n_tokens = len(model.scales), model.L
        elif isinstance(model, FlowAR):
            tokens = model.sample(cond, cfg.num_steps, cfg.cfg_scale, cfg.guidance_until, generator)
            forwards, n_tokens = len(model.scales), model.L
        elif isinstance(model, GPT):
            tokens, forwards = _generate_gpt(model, cond, cfg, generator)
            n_tokens = model.block_size
        else:
            raise TypeError(f"no reference sampler for {type(model).__name__}")
    finally:
        model.train(was_training)
    _sync(cond.device)
    return tokens, dict(forward_passes=forwards, tokens=n_tokens, wall_time=time.perf_counter() - t0)


def _generate_gpt(model: GPT, cond: torch.Tensor, cfg: SamplingConfig, generator):
    """Token-by-token raster sampling -> (tokens (B, L), forward passes)."""
    B, L = cond.shape[0], model.block_size
    guided = cfg.cfg_scale != 1.0
    labels = torch.cat([cond, torch.full_like(cond, model.num_classes)]) if guided else cond  # (B',)
    tokens = torch.zeros(B, L, dtype=torch.long, device=cond.device)
    if cfg.use_cache:
        model.setup_cache(labels.shape[0], L, device=cond.device)  # class + L-1 fed tokens
    for i in range(L):
        # 1. logits of token i given the class and tokens < i
        if cfg.use_cache:
            if i == 0:
                logits = model.prefill(labels)[:, -1]  # (B', V)
            else:
                prev = tokens[:, i - 1:i].repeat(labels.shape[0] // B, 1)  # (B', 1)
                logits = model.step(prev, i - 1)[:, -1]
        else:
            # the naive reference: full causal forward over [class, tokens < i]; the last input is unused
            prefix = tokens[:, :i + 1].repeat(labels.shape[0] // B, 1)  # (B', i+1)
            logits = model(prefix, labels)[:, i]  # (B', V)
        # 2. classifier-free guidance on the [cond; uncond] batch (optionally only for the first tokens)
        if guided:
            use_cfg = cfg.cfg_interval < 0 or i <= cfg.cfg_interval + 1  # LlamaGen: decode step i-1 > N stops it
            logits = cfg_split_combine(logits, cfg.cfg_scale) if use_cfg else logits[:B]
        # 3. temperature / top-k / top-p, one seeded draw
        tokens[:, i] = sample_from_logits(logits, cfg.temperature, cfg.top_k, cfg.top_p, generator)
    if cfg.use_cache:
        model.free_cache()
    return tokens, L
