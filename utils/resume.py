"""Exact resume for the LightningModules that draw from the global RNG while training (generators, draft heads)."""
from __future__ import annotations

import torch


class ExactResumeMixin:
    """Checkpoints ``batches_seen`` (the resumable data order) and the global CPU/CUDA RNG, restored right before the
    first resumed batch so nothing Lightning draws on the way shifts the stream (label dropout, dropout, flow and
    feature noise all draw from it)."""

    batches_seen: int = 0
    _resume_rng: dict | None = None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["batches_seen"] = self.batches_seen
        checkpoint["rng_cpu"] = torch.get_rng_state()
        if torch.cuda.is_available():
            checkpoint["rng_cuda"] = torch.cuda.get_rng_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.batches_seen = int(checkpoint.get("batches_seen", 0))
        self._resume_rng = {k: checkpoint[k] for k in ("rng_cpu", "rng_cuda") if k in checkpoint}

    def on_train_batch_start(self, batch, batch_idx) -> None:
        rng = self._resume_rng
        if rng:
            torch.set_rng_state(rng["rng_cpu"])
            if "rng_cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["rng_cuda"])
            self._resume_rng = None
