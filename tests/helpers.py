"""Test-only callbacks, reachable from the command line through Hydra (+callbacks.kill._target_=...)."""
from __future__ import annotations

import os

import lightning as L


class KillAtStep(L.Callback):
    """Ends the process abruptly (like SIGKILL: no cleanup, no final save) after global step `step`."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            os._exit(137)
