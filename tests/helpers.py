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


class SaveRankState(L.Callback):
    """Writes each rank's LightningModule state (+ a sum of its training batches) to dirpath/rank<r>.safetensors."""

    def __init__(self, dirpath: str):
        self.dirpath, self.data_sum = dirpath, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.data_sum += float(batch[0].double().sum())  # which samples this rank saw

    def on_train_end(self, trainer, pl_module) -> None:
        import torch
        from safetensors.torch import save_file

        state = {k: v.detach().cpu().clone().contiguous() for k, v in pl_module.state_dict().items()}
        state["__data_sum__"] = torch.tensor(self.data_sum, dtype=torch.float64)
        os.makedirs(self.dirpath, exist_ok=True)
        save_file(state, os.path.join(self.dirpath, f"rank{trainer.global_rank}.safetensors"))
