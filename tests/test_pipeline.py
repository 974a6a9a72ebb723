"""scripts/pipeline.py (what `make demo` runs): tokenizer -> generator -> grid + FID, each stage through its
entry point, on the synthetic set with tiny models; a second call on the same root redoes nothing."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from PIL import Image

from tests.conftest import ROOT, TINY

SIZE = 16
TOKENIZER = TINY + [
    f"data.image_size={SIZE}", "tokenizer.autoencoder.ch=8", "tokenizer.autoencoder.ch_mult=[1,2,2]",
    "tokenizer.autoencoder.z_channels=8", "tokenizer.quantizer.scales=[1,2,4]", "tokenizer.quantizer.dim=8",
    "tokenizer.quantizer.codebook_size=32", "trainer.max_steps=4", "callbacks.model_checkpoint=null",
]
GENERATOR = TINY + [f"data.image_size={SIZE}", "+generator.model.depth=2", "generator.eval.grid_per_class=2",
                    "callbacks.model_checkpoint=null"]


def _pipeline(root, data_dir):
    data = [f"paths.data_dir={data_dir}"]
    argv = [sys.executable, str(ROOT / "scripts" / "pipeline.py"), "--root", str(root), "--fid-samples", "8",
            "--reference-images", "8", "--tokenizer-args", *TOKENIZER, *data, "--generator-args", *GENERATOR, *data,
            "--sample-args", "samples_per_class=2", "batch_size=8"]
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # tiny models: one thread is faster


def test_pipeline_runs_every_stage_and_resumes_without_redoing(tmp_path):
    root = tmp_path / "pipe"
    first = _pipeline(root, tmp_path / "data")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    out = first.stdout
    for stage in ("tokenizer", "generator", "sample"):  # each stage printed the command it ran
        assert f"[{stage}] " in out and str(root / stage) in out
    assert "experiment=demo tokenizer=msvq" in out and "experiment=demo_generator generator=var" in out
    summary = json.loads((root / "pipeline.json").read_text())
    assert summary["tokenizer"] == "msvq" and summary["generator"] == "var"
    fid = summary["sample_run"]["fid"]
    assert fid["fid"] > 0 and fid["num_samples"] == 8
    assert summary["tokenizer_run"]["metrics"]["test/usage"] > 0
    with Image.open(summary["sample_run"]["grid"]) as grid:  # 4 classes x 2 samples of 16px images
        assert grid.height == 4 * SIZE + 5 and grid.width > 2 * SIZE + 3  # + the margin naming the rows
    assert "FID " in out and "rows = classes" in out and str(root / "pipeline.json") in out

    again = _pipeline(root, tmp_path / "data")  # finished stages are skipped, nothing is retrained
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done already") == 3 and "train.py" not in again.stdout.split("done already")[-1]
    assert json.loads((root / "pipeline.json").read_text())["sample_run"] == summary["sample_run"]
