"""task=drafter end to end: train on a GPT run's token cache and on self-generated data, kill and resume equals
an uninterrupted run, a drafter paired with another generator is refused (naming both), decoding=lantern runs
on the pair through the registry."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import TINY, compose_config
from tests.test_generator_training import NO_CALLBACKS, SIZE, Killed, gen_overrides, make_tokenizer_run
from utils.checkpoint import CheckpointError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def gpt_runs(tmp_path_factory):
    """Two tiny GPT runs (2 steps, different seeds) on one untrained FSQ tokenizer."""
    from train import train

    root = tmp_path_factory.mktemp("lantern")
    tok = make_tokenizer_run(root / "tok", "fsq")
    runs = []
    for seed in (0, 1):
        train(compose_config("train", gen_overrides("gpt", tok, root / "data") + NO_CALLBACKS + [
            "trainer.max_steps=2", f"seed={seed}"], root / f"gpt{seed}"))
        runs.append(root / f"gpt{seed}")
    return runs, root


def drafter_overrides(gpt, root, *extra):
    return (TINY + [f"data.image_size={SIZE}", "task=drafter", f"generator_ckpt={gpt}", f"paths.data_dir={root / 'data'}",
               "drafter.optimizer.lr=3e-3"] + NO_CALLBACKS + list(extra))


def test_drafter_kill_resume_equals_uninterrupted_and_lowers_loss(gpt_runs, tmp_path):
    from train import train

    (gpt, _), root = gpt_runs
    run = drafter_overrides(gpt, root, "trainer.max_steps=9", "callbacks.last_checkpoint.every_n_train_steps=5",
                            "trainer.val_check_interval=9", "trainer.log_every_n_steps=1")
    train(compose_config("train", run, tmp_path / "ref"))
    kill = ["+callbacks.kill._target_=tests.test_generator_training.RaiseAtStep", "+callbacks.kill.step=7"]
    with pytest.raises(Killed):
        train(compose_config("train", run + kill, tmp_path / "run"))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    _, objects = train(compose_config("train", run + [f"ckpt_path={last}"], tmp_path / "run"))
    assert objects["trainer"].global_step == 9
    ref, got = load_file(str(tmp_path / "ref" / "model.safetensors")), load_file(str(tmp_path / "run" / "model.safetensors"))
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.allclose(ref[k], got[k], atol=1e-5), k
    # the live head's training loss went down over the run (lr 3e-3, 9 steps)
    import csv
    with open(next((tmp_path / "ref").rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 9 and sum(losses[-3:]) < 0.8 * sum(losses[:3]), losses


def test_self_data_and_pairing_and_decoding(gpt_runs, tmp_path):
    from decoding.registry import get_decoder
    from train import train
    from utils.runs import load_generator

    (gpt, other), root = gpt_runs
    train(compose_config("train", drafter_overrides(gpt, root, "trainer.max_steps=2", "drafter.data=self",
                                                    "drafter.self_samples=12", "drafter.self_chunk=5"),
                         tmp_path / "d"))
    chunks = sorted((tmp_path / "d" / "self_data").glob("chunk_*.safetensors"))
    assert len(chunks) == 3 and load_file(str(tmp_path / "d" / "self_data" / "train.safetensors"))["codes"].shape[0] == 12
    model, _, config = load_generator(gpt)
    dec = get_decoder("lantern")
    settings = dec.prepare({"drafter_ckpt": str(tmp_path / "d"), "delta": 0.0, "k": 0, "depth": 3}, config, "cpu")
    tokens, stats = dec.run(model, torch.tensor([0, 1, 2]), {"cfg_scale": 2.0}, torch.Generator().manual_seed(0),
                            None, settings)
    assert tokens.shape == (3, model.num_tokens) and stats["step_compression"] >= 1.0
    assert stats["forward_passes"] == stats["target_forwards"]
    other_model, _, other_config = load_generator(other)
    settings = dec.prepare({"drafter_ckpt": str(tmp_path / "d"), "delta": 0.0, "k": 0}, other_config, "cpu")
    with pytest.raises(CheckpointError, match=f"{gpt.name}.*not for the generator being sampled"):
        dec.run(other_model, torch.tensor([0]), {"cfg_scale": 2.0}, None, None, settings)
    with pytest.raises(CheckpointError, match="trained for the generator"):
        train(compose_config("train", drafter_overrides(other, root, "trainer.max_steps=2",
                                                        f"ckpt_path={tmp_path / 'd' / 'checkpoints' / 'last.ckpt'}"),
                             tmp_path / "d2"))
