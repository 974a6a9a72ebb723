"""Learning-rate schedules as LambdaLR multipliers.

Each schedule is a ``functools.partial`` of a module-level function, not a closure, so a module or
optimizer holding one pickles (``trainer.strategy=ddp_spawn`` sends the LightningModule to its workers).
"""
from __future__ import annotations

import math
from functools import partial


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float = 0.1):
    """Linear warmup from 0 to 1 over `warmup_steps`, then cosine decay to `min_ratio` at `total_steps`."""
    return partial(warmup_cosine_factor, warmup_steps, total_steps, min_ratio)


def warmup_cosine_factor(warmup_steps: int, total_steps: int, min_ratio: float, step: int) -> float:
    """The multiplier of `warmup_cosine` at `step`."""
    if step < warmup_steps:
        return (step + 1) / max(1, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def rampdown(multiplier: float, steps: int):
    """A loss-weight factor that starts at `multiplier` and falls linearly to 1 at `steps` (bsq-vit's codebook
    ramp: ``r = min(step, steps) / steps``, factor ``r + multiplier (1 - r)``); constant 1 when steps is 0."""
    return partial(rampdown_factor, multiplier, steps)


def rampdown_factor(multiplier: float, steps: int, step: int) -> float:
    """The factor of `rampdown` at `step`."""
    if steps <= 0:
        return 1.0
    r = min(step, steps) / steps
    return r + multiplier * (1 - r)
