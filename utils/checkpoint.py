"""Atomic checkpoint writes and the exported run folder (model.safetensors + config.yaml); loading is utils/runs.py.

A run folder looks like outputs/<task>/<time>/ with checkpoints/{last,best}.ckpt, and after
training model.safetensors (EMA weights) and config.yaml (the resolved config). Nothing is ever
unpickled: .ckpt files load with weights_only=True, weights from safetensors.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.fabric.plugins import TorchCheckpointIO
from safetensors.torch import save_model

from utils.io import atomic_replace  # noqa: F401 - re-exported: the one atomic write


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that writes to a temp file and renames it: a killed save leaves the old file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        atomic_replace(lambda tmp: torch.save(checkpoint, tmp), path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        from utils.runs import torch_checkpoint  # a corrupt file is a CheckpointError naming it

        return torch_checkpoint(path)


def export_run(model: torch.nn.Module, config: dict, run_dir: str | Path, kind: str) -> Path:
    """Write model.safetensors and config.yaml (with `kind`) into run_dir, atomically."""
    run_dir = Path(run_dir)
    config = dict(config, kind=kind)
    atomic_replace(lambda tmp: save_model(strip_compile_prefix(model), tmp), run_dir / "model.safetensors")
    atomic_replace(lambda tmp: Path(tmp).write_text(yaml.safe_dump(config, sort_keys=False)), run_dir / "config.yaml")
    return run_dir / "model.safetensors"


def strip_compile_prefix(model: torch.nn.Module) -> torch.nn.Module:
    """torch.compile wraps modules as _orig_mod; export the original."""
    return getattr(model, "_orig_mod", model)


class CheckpointError(ValueError):
    """A checkpoint that is missing, of the wrong kind, or incompatible with the settings."""
