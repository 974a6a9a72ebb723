"""Shared fixtures: composed configs for fast CPU runs on the synthetic set, written under tmp_path."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = str(ROOT / "configs")

torch.set_num_threads(min(2, os.cpu_count() or 1))

# A tiny autoencoder and a short budget: what every end-to-end test trains.
TINY = [
    "data=synthetic", "data.batch_size=8", "data.eval_batch_size=16", "data.size=64",
    "tokenizer.autoencoder.ch=16", "tokenizer.autoencoder.ch_mult=[1,2]", "tokenizer.autoencoder.z_channels=16",
    "tokenizer.eval.grid_images=8", "trainer.accelerator=cpu", "trainer.max_steps=6", "trainer.val_check_interval=3",
    "trainer.limit_val_batches=1", "trainer.limit_test_batches=2", "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false", "logger=csv",
]


def compose_config(config_name: str, overrides: list[str], output_dir: Path):
    """compose() with the hydra node and output folder set (the LHT conftest pattern)."""
    from utils.hydra import compose_with_hydra

    return compose_with_hydra(config_name, overrides, output_dir)


@pytest.fixture
def tiny_overrides() -> list[str]:
    return list(TINY)


def run_entry(script: str, args: list[str], cwd: Path = ROOT, timeout: int = 600, env: dict | None = None):
    """Run train.py / sample.py as a user would; returns the CompletedProcess."""
    import subprocess

    full_env = dict(os.environ, PYTHONUNBUFFERED="1", HYDRA_FULL_ERROR="1", **(env or {}))
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: tiny tensors on a shared 2-core machine only lose to threading."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
