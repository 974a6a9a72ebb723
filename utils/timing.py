"""Device-aware timing: one place that synchronises CUDA around a measurement."""
from __future__ import annotations

import time

import torch


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA); a no-op on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Seconds of a block: CUDA events on CUDA (after a synchronize), perf_counter on CPU."""

    def __init__(self, device: torch.device | str):
        self.device, self.seconds = torch.device(device), 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            synchronize(self.device)
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.end.record()
            synchronize(self.device)
            self.seconds = self.start.elapsed_time(self.end) / 1000
        else:
            self.seconds = time.perf_counter() - self.t0
