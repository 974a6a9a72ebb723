"""Loggers that survive a kill and a resume: the metric history up to the checkpoint is kept, never erased.

Lightning's CSVLogger deletes csv/metrics.csv when it starts in a folder that has one, TensorBoard appends
a second stream that repeats the steps after the checkpoint, and WandbLogger starts a new run. A resumed
tokar run instead keeps the CSV rows logged before its checkpoint's step, purges TensorBoard's events from
that step on, and reopens the same wandb run (its id is derived from the run folder). Loggers flush after every
checkpoint, so a kill loses no row the checkpoint already covers.
"""
from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from utils.io import atomic_replace


def checkpoint_step(ckpt: dict) -> int:
    """The first logging step of a run resumed from `ckpt`: Lightning saves `_batches_that_stepped` before it
    counts the batch being checkpointed and adds that 1 back on restart (training_epoch_loop.reset)."""
    try:
        return int(ckpt["loops"]["fit_loop"]["epoch_loop.state_dict"]["_batches_that_stepped"]) + 1
    except (KeyError, TypeError):
        return int(ckpt.get("global_step", 0))


def wandb_id(out: str | Path) -> str:
    """A wandb run id fixed by the run folder, so a resumed run logs into the same wandb run."""
    return "tokar-" + hashlib.sha256(str(Path(out).resolve()).encode()).hexdigest()[:16]


def resume_kwargs(node: DictConfig, out: Path, resume_step: int | None) -> dict:
    """Extra constructor arguments of a logger config node, by its target."""
    target = str(node.get("_target_", ""))
    if target.endswith("WandbLogger"):
        return {"id": node.get("id") or wandb_id(out), "resume": "allow"}
    if target.endswith("TensorBoardLogger") and resume_step is not None:
        return {"purge_step": resume_step}  # SummaryWriter drops the events at and after this step
    return {}


def instantiate_loggers(cfg: DictConfig | None, out: Path, resume_step: int | None) -> list:
    """The loggers of cfg.logger; resuming (resume_step set), each continues its history up to that step."""
    loggers = []
    for node in (cfg or {}).values():
        if isinstance(node, DictConfig) and "_target_" in node:
            loggers.append(instantiate(node, **resume_kwargs(node, out, resume_step)))
    if resume_step is not None:
        for lg in loggers:
            if isinstance(lg, L.pytorch.loggers.CSVLogger):
                keep_csv_history(lg, resume_step)
    return loggers


def keep_csv_history(logger, resume_step: int) -> None:
    """Start the CSV logger, keeping the rows of its metrics.csv logged before `resume_step`."""
    path = Path(logger.log_dir) / "metrics.csv"
    header, rows = [], []
    if path.is_file():
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = [r for r in reader if r.get("step") not in (None, "") and int(float(r["step"])) < resume_step]
    writer = logger.experiment  # Lightning's writer deletes metrics.csv here
    if not rows:
        return

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            out = csv.DictWriter(f, fieldnames=header)
            out.writeheader()
            out.writerows(rows)

    atomic_replace(write, path)
    writer.metrics_keys = sorted(header)  # later saves append under this header (and widen it for new keys)


class FlushLogsOnCheckpoint(L.Callback):
    """Writes the loggers' buffered rows once a checkpoint's step is logged: a kill then loses no row the
    checkpoint covers. (Lightning logs a step's row after the callbacks that save at that step, so the flush
    waits for the next batch to start.)"""

    def __init__(self):
        self.pending = False

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.pending = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.pending:
            for lg in trainer.loggers:
                lg.save()
            self.pending = False
