"""The plain reference sampler (``decoding=ar``): every acceleration is tested against it.

Each generator owns its reference sampler (``model.sample``): GPT draws one token per forward (over the KV
cache, or with ``use_cache=False`` the naive full causal forward on the prefix every token; both give the
same tokens for the same seed); VAR runs one cached forward per scale with the CFG ramp (needs the msvq
tokenizer); FlowAR one trunk forward per scale plus Euler steps of its head (returns latents).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from decoding.registry import get_decoder, register
from decoding.sampling import SamplingConfig  # noqa: F401  (re-exported: the sampling knobs every decoder takes)


@dataclass
class ArSettings:
    """decoding=ar's own settings."""

    use_cache: bool = True  # GPT only: False reruns the full causal forward every token (the naive reference)
    compile: bool = False  # GPT: the one-token step, VAR: each scale's step, compiled (CUDA graphs on CUDA)


@register("ar", applies_to=("gpt", "var", "flowar"), settings=ArSettings)
def _ar(model, cond, sampling, generator, tokenizer, settings: ArSettings):
    return model.sample(cond, sampling, generator, tokenizer, use_cache=settings.use_cache,
                        compile=settings.compile), {}


def generate(model, cond: torch.Tensor, sampling=None, generator: torch.Generator | None = None, tokenizer=None,
             **settings):
    """Sample with the reference decoder -> (tokens, stats); ``settings``: ArSettings fields (use_cache).

    cond: (B,) labels. tokens: GPT (B, L) int64; VAR a list of (B, s_k, s_k) maps; FlowAR latents (B, C, S, S).
    tokenizer: the msvq tokenizer (or its quantizer), required for VAR. stats: forward_passes (counted, a
    [cond; uncond] batch counts once), tokens per sequence, wall_time in seconds.
    """
    return get_decoder("ar").run(model, cond, sampling, generator, tokenizer, settings)
