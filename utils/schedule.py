"""Learning-rate schedules as LambdaLR multipliers."""
from __future__ import annotations

import math


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float = 0.1):
    """Linear warmup from 0 to 1 over `warmup_steps`, then cosine decay to `min_ratio` at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def rampdown(multiplier: float, steps: int):
    """A loss-weight factor that starts at `multiplier` and falls linearly to 1 at `steps` (bsq-vit's codebook
    ramp: ``r = min(step, steps) / steps``, factor ``r + multiplier (1 - r)``); constant 1 when steps is 0."""

    def factor(step: int) -> float:
        if steps <= 0:
            return 1.0
        r = min(step, steps) / steps
        return r + multiplier * (1 - r)

    return factor
