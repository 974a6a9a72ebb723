"""utils/runs.py: one loader for every run kind; clear errors for corrupt, truncated and wrong-kind files."""
from __future__ import annotations

import hashlib

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.test_generator_training import make_tokenizer_run
from utils.checkpoint import CheckpointError
from utils.io import atomic_replace, file_mode, stale_temp_files
from utils.runs import load_run, load_tokenizer_of, read_checkpoint, resume_checkpoint


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer_run(tmp_path_factory.mktemp("runs") / "fsq", "fsq")


def test_load_run_from_the_folder_or_a_file_with_its_hash(tok):
    run = load_run(tok, "tokenizer")
    again = load_run(tok / "model.safetensors")
    assert run.kind == again.kind == "tokenizer" and run.path == tok.resolve()
    expected = hashlib.sha256((tok / "model.safetensors").read_bytes() + (tok / "config.yaml").read_bytes())
    assert run.hash == again.hash == expected.hexdigest()
    saved = load_file(str(tok / "model.safetensors"))
    for k, v in run.model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    assert not run.model.training and not any(p.requires_grad for p in run.model.parameters())
    images = torch.rand(2, 1, 16, 16) * 2 - 1  # the Python API the README shows: encode, decode
    assert run.model.decode(run.model.encode(images)).shape == images.shape


def test_garbage_and_truncated_files_name_the_file_and_the_fix(tmp_path, tok):
    """Issue 15.7: never torch's weights_only=False advice, never an error without the path."""
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"garbage!")  # 8 bytes
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(bad)
    assert str(bad) in str(err.value) and "weights_only" not in str(err.value) and "pass" in str(err.value)

    cut = tmp_path / "cut.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, cut)
    cut.write_bytes(cut.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as err:
        read_checkpoint(cut)
    assert str(cut) in str(err.value)

    run = tmp_path / "truncated"
    run.mkdir()
    (run / "config.yaml").write_text((tok / "config.yaml").read_text())
    (run / "model.safetensors").write_bytes((tok / "model.safetensors").read_bytes()[:-64])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as err:
        load_run(run)
    assert str(run / "model.safetensors") in str(err.value) and "ckpt_path=" in str(err.value)


def test_resume_takes_a_run_folder_or_says_which_file(tmp_path):
    """Issue 15.7: ckpt_path=<run folder> resumes its checkpoints/last.ckpt instead of IsADirectoryError."""
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(CheckpointError, match="without checkpoints/last.ckpt"):
        resume_checkpoint(tmp_path)
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert resume_checkpoint(tmp_path) == tmp_path / "checkpoints" / "last.ckpt"
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="only the EMA weights"):
        resume_checkpoint(tmp_path / "model.safetensors")

    from utils.hydra import run_dir

    assert run_dir("outputs", "tokenizer", str(tmp_path)) == str(tmp_path.resolve())  # resumed in its own folder


def test_a_generator_run_given_as_tokenizer_says_so(tmp_path, tok):
    """Issue 15.8: tokenizer_ckpt=<a generator run> is named a generator run, not a 'changed' tokenizer."""
    other = tmp_path / "other_gen"
    other.mkdir()
    (other / "config.yaml").write_text(yaml.safe_dump({"kind": "generator", "tokenizer": {"path": str(tok)}}))
    (other / "model.safetensors").write_bytes((tok / "model.safetensors").read_bytes())
    config = {"kind": "generator", "tokenizer": {"path": str(tok), "hash": "0" * 64}}
    with pytest.raises(CheckpointError, match="is a generator run, not a tokenizer run") as err:
        load_tokenizer_of(config, tmp_path / "gen", "cpu", tokenizer_path=str(other))
    assert "tokenizer_ckpt" in str(err.value) and "changed" not in str(err.value)
    with pytest.raises(CheckpointError, match="changed since the generator was trained"):  # the real tokenizer
        load_tokenizer_of(config, tmp_path / "gen", "cpu")


def test_atomic_writes_get_an_ordinary_files_mode_and_leave_recognisable_temp_files(tmp_path):
    """Issue 15.18 (mode) and 15.5 (what counts as a stale temp file)."""
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic_replace(lambda t: open(t, "w").write("y"), tmp_path / "model.safetensors")
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == file_mode()
    (tmp_path / ".best.ckpt.a1b2c3.tmp").write_bytes(b"half")
    (tmp_path / "last.ckpt").write_bytes(b"whole")
    (tmp_path / "notes.tmp").write_bytes(b"a user's file")
    assert [p.name for p in stale_temp_files(tmp_path)] == [".best.ckpt.a1b2c3.tmp"]


def test_resumed_loggers_continue_their_history(tmp_path):
    """Issue 15.1: TensorBoard drops the events after the checkpoint's step instead of repeating them, and wandb
    reopens the same run (an id fixed by the run folder)."""
    from omegaconf import OmegaConf
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from utils.loggers import instantiate_loggers, resume_kwargs

    node = {"tb": {"_target_": "lightning.pytorch.loggers.TensorBoardLogger", "save_dir": str(tmp_path),
                   "name": "tensorboard", "version": ""}}
    cfg = OmegaConf.create(node)
    (first,) = instantiate_loggers(cfg, tmp_path, None)
    for step in range(6):  # logged before a kill: steps 4 and 5 come after the checkpoint (resume at 4)
        first.log_metrics({"x": float(step)}, step=step)
    first.finalize("killed")
    (again,) = instantiate_loggers(cfg, tmp_path, 4)
    for step in range(4, 8):
        again.log_metrics({"x": 10.0 + step}, step=step)
    again.finalize("success")
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload().Scalars("x")
    assert [(e.step, e.value) for e in events] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0), (5, 15.0),
                                                  (6, 16.0), (7, 17.0)]

    wandb = OmegaConf.create({"_target_": "lightning.pytorch.loggers.WandbLogger", "id": None})
    same = resume_kwargs(wandb, tmp_path / "run", None), resume_kwargs(wandb, tmp_path / "run", 4)
    assert same[0]["id"] == same[1]["id"] and same[0]["resume"] == "allow"
    assert resume_kwargs(wandb, tmp_path / "other", None)["id"] != same[0]["id"]
