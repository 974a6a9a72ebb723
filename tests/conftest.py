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


def distill_kill_resume_then_sample(tmp_path: Path, common: list[str], teacher_from: int) -> tuple[dict, dict]:
    """task=distill once straight (ref/) and once killed after step 5 then resumed (run/): the two exports must match;
    then sample.py decoding=distilled steps=2 from the resumed run -> (ref's config.yaml, the sample's metrics.json)."""
    import json

    import yaml
    from safetensors.torch import load_file

    env = {"OMP_NUM_THREADS": "1"}
    ref = run_entry("train.py", common + [f"hydra.run.dir={tmp_path / 'ref'}"], env=env)
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    cfg = yaml.safe_load((tmp_path / "ref" / "config.yaml").read_text())

    run_dir = tmp_path / "run"
    killed = run_entry("train.py", common + [f"hydra.run.dir={run_dir}", "+callbacks.kill._target_=tests.helpers.KillAtStep",
                                            "+callbacks.kill.step=5"], env=env)
    assert killed.returncode == 137, killed.stderr[-2000:]
    last = run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3
    resumed = run_entry("train.py", common + [f"ckpt_path={last}"], env=env)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    a, b = load_file(tmp_path / "ref" / "model.safetensors"), load_file(run_dir / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k

    out = tmp_path / "sample"
    sampled = run_entry("sample.py", [f"ckpt={run_dir}", "decoding=distilled", "decoding.steps=2",
                                      f"decoding.teacher_from={teacher_from}", "samples_per_class=2", "classes=[0,1]",
                                      "device=cpu", f"hydra.run.dir={out}"], env=env)
    assert sampled.returncode == 0, sampled.stdout[-3000:] + sampled.stderr[-3000:]
    return cfg, json.loads((out / "metrics.json").read_text())


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: tiny tensors on a shared 2-core machine only lose to threading."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
