"""Generators on token caches: cache reuse / rebuild / resume, train -> sample end to end, pairing and hash errors.

Tokenizer runs for most tests are exported untrained (build + export_run: the plumbing does not care about
quality); the VAR test trains its msvq tokenizer through train.py like a user. Everything runs at 16x16 with
f4 autoencoders (4x4 latents: msvq scales 1,2,4 = 21 tokens, GPT 16 tokens, FlowAR scales 1,2,4).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

import data.token_cache as token_cache
from data.datamodule import ImageDataModule
from data.synthetic import Synthetic
from tests.conftest import TINY, compose_config, run_entry
from utils.checkpoint import CheckpointError, export_run
from utils.runs import load_run, run_hash

SIZE = 16  # image side; f4 -> 4x4 latents
AUTOENCODER = {"ch": 8, "ch_mult": [1, 2, 2], "z_channels": 8, "quant_conv_kernel": 1}
QUANTIZERS = {
    "msvq": {"_target_": "tokenizers.msvq.MultiScaleVQ", "dim": 8, "codebook_size": 32, "scales": [1, 2, 4]},
    "fsq": {"_target_": "tokenizers.fsq.FSQ", "levels": [4, 4]},
    "kl": {"_target_": "tokenizers.kl.KLGaussian", "dim": 4},
}
# tiny generators: 2 layers, short sampling, small grids
GEN_TINY = ["task=generator", f"data.image_size={SIZE}", "+generator.model.depth=2", "generator.eval.grid_per_class=2"]
FLOWAR = ["generator.model.scales=[1,2,4]", "+generator.model.head_depth=1", "generator.sampling.num_steps=4"]
NO_CALLBACKS = ["callbacks.model_checkpoint=null", "callbacks.lr_monitor=null", "callbacks.progress_bar=null"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny models on a shared 2-core machine: one thread is far faster


pytestmark = pytest.mark.usefixtures("one_thread")


def make_tokenizer_run(path: Path, kind: str, seed: int = 0) -> Path:
    """An untrained tokenizer exported as a finished run (model.safetensors + config.yaml)."""
    from tokenizers.module import build_tokenizer

    config = {"kind": "tokenizer",
              "tokenizer": {"name": kind, "quantizer": QUANTIZERS[kind], "autoencoder": AUTOENCODER},
              "data": {"name": "synthetic", "image_size": SIZE, "channels": 1, "num_classes": 4}}
    torch.manual_seed(seed)
    export_run(build_tokenizer(config["tokenizer"], 1), config, path, kind="tokenizer")
    return path


@pytest.fixture(scope="module")
def tok_runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tokenizers")
    return {kind: make_tokenizer_run(root / kind, kind) for kind in QUANTIZERS}


def gen_overrides(gen: str, tokenizer: Path, data_dir: Path) -> list[str]:
    return TINY + GEN_TINY + [f"generator={gen}", f"tokenizer_ckpt={tokenizer}", f"paths.data_dir={data_dir}"] + (
        FLOWAR if gen == "flowar" else [])


def images(**kw) -> ImageDataModule:
    return ImageDataModule(name="synthetic", image_size=SIZE, size=kw.pop("size", 48), num_classes=4, **kw)


def perturb_weights(run: Path) -> None:
    """Change the tokenizer's weights file in place (as retraining would)."""
    state = load_file(str(run / "model.safetensors"))
    key = sorted(state)[0]
    state[key] = state[key] + 0.01
    save_file(state, str(run / "model.safetensors"))


# ----------------------------------------------------------------------------------------------
# The token cache
# ----------------------------------------------------------------------------------------------

def test_cache_is_reused_for_the_same_tokenizer_and_rebuilt_when_it_changes(tmp_path, monkeypatch):
    run = make_tokenizer_run(tmp_path / "fsq", "fsq")
    calls = []
    encode = token_cache.encode_batch
    monkeypatch.setattr(token_cache, "encode_batch", lambda *a: calls.append(1) or encode(*a))
    root = tmp_path / "cache"

    first = token_cache.prepare_token_caches(load_run(run), images(), ["train", "test"], root)
    assert calls and set(first) == {"train", "test"}
    ds = token_cache.TokenDataset(first["train"])
    assert ds.codes.shape == (48, 16) and ds.codes.dtype == torch.int32 and ds.num_classes == 4
    assert ds.meta["tokenizer_hash"] == run_hash(run) and ds.meta["layout"] == "raster"
    mtimes = {s: p.stat().st_mtime_ns for s, p in first.items()}

    calls.clear()
    again = token_cache.prepare_token_caches(load_run(run), images(), ["train", "test"], root)
    assert again == first and not calls  # no re-encode
    assert {s: p.stat().st_mtime_ns for s, p in again.items()} == mtimes

    perturb_weights(run)  # a retrained tokenizer: new hash, new files
    rebuilt = token_cache.prepare_token_caches(load_run(run), images(), ["train", "test"], root)
    assert calls and all(rebuilt[s] != first[s] for s in first)
    assert token_cache.TokenDataset(rebuilt["train"]).meta["tokenizer_hash"] == run_hash(run)

    # other dataset settings are another cache too
    calls.clear()
    other = token_cache.prepare_token_caches(load_run(run), images(size=32), ["train"], root)
    assert calls and other["train"] != rebuilt["train"] and len(token_cache.TokenDataset(other["train"])) == 32


def test_cache_build_resumes_after_a_kill_and_skips_finished_chunks(tmp_path, monkeypatch):
    tok = load_run(make_tokenizer_run(tmp_path / "msvq", "msvq")).model
    dataset = Synthetic("train", size=64, image_size=SIZE, num_classes=4)
    path = tmp_path / "cache" / "train.safetensors"
    encode, calls = token_cache.encode_batch, []

    def dies_after_five(*a):
        if len(calls) == 5:
            raise KeyboardInterrupt  # killed in the middle of chunk 2
        calls.append(1)
        return encode(*a)

    monkeypatch.setattr(token_cache, "encode_batch", dies_after_five)
    with pytest.raises(KeyboardInterrupt):
        token_cache.build_cache(tok, dataset, path, "multiscale", batch_size=8, chunk_size=16)  # 4 chunks of 2 batches
    partial = path.with_name(path.name + ".partial")
    assert not path.exists() and sorted(p.name for p in partial.glob("chunk_*")) == [
        "chunk_00000.safetensors", "chunk_00001.safetensors"]

    calls.clear()
    monkeypatch.setattr(token_cache, "encode_batch", lambda *a: calls.append(1) or encode(*a))
    token_cache.build_cache(tok, dataset, path, "multiscale", batch_size=8, chunk_size=16)
    assert len(calls) == 4  # only chunks 2 and 3 were encoded
    assert path.is_file() and not partial.exists()

    fresh = tmp_path / "fresh.safetensors"
    token_cache.build_cache(tok, dataset, fresh, "multiscale", batch_size=8, chunk_size=16)
    got, want = load_file(str(path)), load_file(str(fresh))
    assert got["codes"].shape == (64, 1 + 4 + 16)
    assert torch.equal(got["codes"], want["codes"]) and torch.equal(got["labels"], want["labels"])


def test_kl_latents_are_scaled_by_a_factor_fitted_on_the_train_split(tmp_path):
    run = load_run(make_tokenizer_run(tmp_path / "kl", "kl"))
    paths = token_cache.prepare_token_caches(run, images(), ["test"], tmp_path / "cache")
    train, test = token_cache.TokenDataset(paths["train"]), token_cache.TokenDataset(paths["test"])
    factor = float(train.meta["scale_factor"])
    assert factor != 1.0 and float(test.meta["scale_factor"]) == factor  # the test split reuses it
    assert train.codes.shape == (48, 4, 4, 4) and train.codes.std().item() == pytest.approx(1.0, rel=1e-4)
    raw = run.model.encode(images().split("train").images[:4])
    assert torch.allclose(train.codes[:4], raw * factor, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------

def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_var_tokenizer_train_sample_through_the_entry_points(tmp_path):
    data_dir = tmp_path / "data"
    tok_dir, gen_dir, sample_dir = tmp_path / "tok", tmp_path / "gen", tmp_path / "sample"
    _ok(run_entry("train.py", TINY + NO_CALLBACKS + [
        "tokenizer=msvq", f"data.image_size={SIZE}", "tokenizer.autoencoder.ch_mult=[1,2,2]",
        "tokenizer.quantizer.scales=[1,2,4]", "tokenizer.quantizer.dim=8", "tokenizer.quantizer.codebook_size=32",
        "trainer.max_steps=4", f"paths.data_dir={data_dir}", f"hydra.run.dir={tok_dir}"], env=ONE_THREAD))

    trained = _ok(run_entry("train.py", gen_overrides("var", tok_dir, data_dir) + [f"hydra.run.dir={gen_dir}"],
                            env=ONE_THREAD))
    assert "val/loss" in trained.stdout
    summary = json.loads((gen_dir / "metrics.json").read_text())
    assert summary["steps"] == 6 and 0 <= summary["metrics"]["val/acc"] <= 1
    # 6 steps at the warmup's lr (<= 6e-5) leave VAR's x0.02 head nearly uniform over the 32 codes
    assert abs(summary["metrics"]["val/loss"] - math.log(32)) < 0.1, summary["metrics"]
    assert Path(summary["grid"]).exists()
    config = yaml.safe_load((gen_dir / "config.yaml").read_text())
    assert config["kind"] == "generator" and config["tokenizer"]["path"] == str(tok_dir.resolve())
    assert config["tokenizer"]["hash"] == run_hash(tok_dir)
    assert config["model_args"]["scales"] == [1, 2, 4]
    # the frozen tokenizer is in no export and no checkpoint
    exported = load_file(str(gen_dir / "model.safetensors"))
    assert not any(k.startswith(("encoder.", "decoder.", "quantizer.")) for k in exported)
    ckpt = torch.load(gen_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(k.startswith(("model.", "ema.")) for k in ckpt["state_dict"])
    assert list((data_dir / "token_cache" / "synthetic").glob("train_16px_*.safetensors"))

    sampled = _ok(run_entry("sample.py", [f"ckpt={gen_dir}", "samples_per_class=3", f"hydra.run.dir={sample_dir}"],
                            env=ONE_THREAD))
    assert "images/s" in sampled.stdout and "forward passes per image" in sampled.stdout
    result = json.loads((sample_dir / "metrics.json").read_text())
    assert result["rows"] == [0, 1, 2, 3] and result["speed"]["forward_passes_per_image"] == 3
    assert result["speed"]["images_per_s"] > 0 and result["speed"]["images_per_s_with_decode"] > 0
    with Image.open(result["grid"]) as grid:  # 4 rows (classes) x 3 columns of 16px images, 1px padding
        assert grid.height == 4 * SIZE + 5 and grid.width > 3 * SIZE + 4  # + the margin naming the rows
    from utils.grids import row_labels

    assert row_labels(result["grid"]) == ["0", "1", "2", "3"]  # synthetic data has no class names: the ids

    perturb_weights(tok_dir)  # the tokenizer changed under the generator
    refused = run_entry("sample.py", [f"ckpt={gen_dir}", f"hydra.run.dir={tmp_path / 'refused'}"], env=ONE_THREAD)
    assert refused.returncode != 0 and "changed since the generator was trained" in refused.stderr


@pytest.mark.parametrize("gen,tok", [("gpt", "fsq"), ("flowar", "kl")])
def test_gpt_and_flowar_train_and_sample_in_process(gen, tok, tok_runs, tmp_path):
    from sample import load_generator, run
    from train import train

    cfg = compose_config("train", gen_overrides(gen, tok_runs[tok], tmp_path / "data"), tmp_path / "gen")
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 6
    assert ("val/acc" in metrics) == (gen == "gpt")
    # val/loss is the loss of the exported (EMA) weights on the one validation batch, recomputed here
    exported, _, _ = load_generator(tmp_path / "gen")
    codes, labels = next(iter(objects["datamodule"].val_dataloader()))
    with torch.no_grad(), torch.random.fork_rng():
        if gen == "gpt":
            logits = exported(codes.long(), labels)  # (B, 16, V)
            want = F.cross_entropy(logits.flatten(0, 1), codes.long().flatten())
            assert metrics["val/acc"] == pytest.approx((logits.argmax(-1) == codes).float().mean().item(), abs=1e-6)
            assert abs(metrics["val/loss"] - math.log(16)) < 0.1  # zero head at init, 6 steps at lr <= 6e-5
        else:
            torch.manual_seed(0)  # validation draws batch i's flow noise from seed i
            want = exported(codes.float(), labels)
    assert metrics["val/loss"] == pytest.approx(want.item(), rel=1e-5)
    assert cfg.monitor.metric == "val/loss" and cfg.monitor.mode == "min"
    model = objects["model"]
    assert not any(k.startswith(("encoder.", "quantizer.")) for k in model.state_dict())
    config = yaml.safe_load((tmp_path / "gen" / "config.yaml").read_text())
    if gen == "flowar":  # the cache's fitted scale factor travels with the generator
        meta = token_cache.read_metadata(config["tokens"]["cache"]["train"])
        assert config["tokens"]["scale_factor"] == float(meta["scale_factor"]) != 1.0
    else:
        assert config["model_args"]["block_size"] == 16 and config["model_args"]["vocab_size"] == 16

    scfg = compose_config("sample", [f"ckpt={tmp_path / 'gen'}", "samples_per_class=2", "classes=[1,3]"],
                          tmp_path / "sample")
    result = run(scfg, tmp_path / "sample")
    with Image.open(result["grid"]) as grid:
        assert grid.height == 2 * SIZE + 3 and grid.width > 2 * SIZE + 3  # + the margin naming the rows
    assert result["rows"] == [1, 3] and (tmp_path / "sample" / "metrics.json").exists()


def test_generator_fast_dev_run(tok_runs, tmp_path):
    from train import train

    metrics, objects = train(compose_config("train", gen_overrides("var", tok_runs["msvq"], tmp_path / "data") + [
        "debug=fdr"], tmp_path / "gen"))
    assert objects["trainer"].global_step == 1 and "val/loss" in metrics


@pytest.mark.parametrize("gen,tok,message", [
    ("gpt", "msvq", "generator=gpt needs a single-scale discrete tokenizer"),
    ("gpt", "kl", "generator=gpt needs a single-scale discrete tokenizer"),
    ("var", "fsq", "generator=var needs a multi-scale VQ tokenizer \\(tokenizer=msvq\\)"),
    ("flowar", "msvq", "generator=flowar needs a continuous tokenizer \\(tokenizer=kl\\)"),
])
def test_wrong_generator_tokenizer_pairs_are_refused(gen, tok, message, tok_runs, tmp_path):
    from train import train

    cfg = compose_config("train", gen_overrides(gen, tok_runs[tok], tmp_path / "data"), tmp_path / "gen")
    with pytest.raises(ValueError, match=message):
        train(cfg)


def test_missing_or_wrong_kind_tokenizer_ckpt(tok_runs, tmp_path):
    from train import train

    cfg = compose_config("train", TINY + GEN_TINY + [f"paths.data_dir={tmp_path}"], tmp_path / "a")
    with pytest.raises(ValueError, match="tokenizer_ckpt=<tokenizer run"):
        train(cfg)
    cfg = compose_config("train", gen_overrides("var", tmp_path / "nope", tmp_path), tmp_path / "b")
    with pytest.raises(CheckpointError, match="does not exist"):
        train(cfg)
    not_tok = tmp_path / "gen_run"
    export_run(torch.nn.Linear(1, 1), {"data": {}}, not_tok, kind="generator")
    cfg = compose_config("train", gen_overrides("var", not_tok, tmp_path), tmp_path / "c")
    with pytest.raises(CheckpointError, match="is a generator run, not a tokenizer run"):
        train(cfg)


def test_loading_a_generator_whose_tokenizer_is_missing_or_changed(tmp_path):
    from sample import load_generator
    from train import train

    tok = make_tokenizer_run(tmp_path / "fsq", "fsq")
    train(compose_config("train", gen_overrides("gpt", tok, tmp_path / "data") + ["trainer.max_steps=2"],
                         tmp_path / "gen"))
    model, tokenizer, config = load_generator(tmp_path / "gen")
    assert config["tokenizer"]["hash"] == run_hash(tok)
    from_ckpt, _, _ = load_generator(tmp_path / "gen" / "checkpoints" / "last.ckpt")  # EMA weights of the .ckpt
    for (k, a), b in zip(model.state_dict().items(), from_ckpt.state_dict().values()):
        assert torch.equal(a, b), k
    # README's Python API block runs as written on these two runs
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("## Python API", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    block = block.replace('"outputs/tokenizer/<time>"', repr(str(tok))).replace('"outputs/generator/<time>"',
                                                                               repr(str(tmp_path / "gen")))
    api: dict = {}
    exec(compile(block, "README.md", "exec"), api)  # noqa: S102 - our own README
    assert api["recon"].shape == api["images"].shape and api["samples"].shape == (4, 1, SIZE, SIZE)
    assert api["gen"].tokenizer.hash == run_hash(tok) and api["tok"].hash == run_hash(tok)

    perturb_weights(tok)
    with pytest.raises(CheckpointError, match="changed since the generator was trained"):
        load_generator(tmp_path / "gen")
    tok.rename(tmp_path / "moved")
    with pytest.raises(CheckpointError, match="is missing"):
        load_generator(tmp_path / "gen")
    with pytest.raises(CheckpointError, match="changed since"):  # found again, but still the changed one
        load_generator(tmp_path / "gen", tokenizer_path=str(tmp_path / "moved"))


class Killed(Exception):
    """Raised by RaiseAtStep."""


class RaiseAtStep(L.Callback):
    """Stops training with an exception after global step `step` (an in-process stand-in for a kill)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            raise Killed(f"killed at step {trainer.global_step}")


def test_generator_kill_resume_equals_uninterrupted(tok_runs, tmp_path):
    from train import train

    run = gen_overrides("var", tok_runs["msvq"], tmp_path / "data") + NO_CALLBACKS + [
        "trainer.max_steps=9", "callbacks.last_checkpoint.every_n_train_steps=5", "data.size=48"]
    train(compose_config("train", run, tmp_path / "ref"))
    kill = ["+callbacks.kill._target_=tests.test_generator_training.RaiseAtStep", "+callbacks.kill.step=7"]
    with pytest.raises(Killed):
        train(compose_config("train", run + kill, tmp_path / "run"))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 5
    _, objects = train(compose_config("train", run + [f"ckpt_path={last}"], tmp_path / "run"))
    assert objects["trainer"].global_step == 9  # 48 images / 8 = 6 batches per epoch: the resume crosses an epoch
    ref = load_file(str(tmp_path / "ref" / "model.safetensors"))
    got = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.allclose(ref[k], got[k], atol=1e-5), k


# ----------------------------------------------------------------------------------------------
# FID plumbing (a stand-in metric; the real Inception run is the slow test below)
# ----------------------------------------------------------------------------------------------

class CountingFID:
    """Stands in for evaluation.fid.FID: counts the generated images it is fed; 'FID' = that count."""

    num_real = 10

    def __init__(self):
        self.images = []

    def update(self, images, real):
        assert not real and images.min() >= -1 and images.max() <= 1
        self.images.append(images)

    def compute(self):
        return float(sum(x.shape[0] for x in self.images))


def test_fid_at_the_end_of_training_and_in_sample_py(tok_runs, tmp_path, monkeypatch, capsys):
    import generators.module as gm
    from sample import run
    from train import train

    made = []
    monkeypatch.setattr(gm, "make_fid", lambda data, split, n, device: (made.append(CountingFID()) or made[-1],
                                                                       f"{data['name']}:{split}"))
    cfg = compose_config("train", gen_overrides("var", tok_runs["msvq"], tmp_path / "data") + [
        "generator.eval.fid_samples=6", "trainer.max_steps=2"], tmp_path / "gen")
    metrics, _ = train(cfg)
    summary = json.loads((tmp_path / "gen" / "metrics.json").read_text())
    assert metrics["fid"] == 6 and summary["fid"]["fid"] == 6
    assert summary["fid"]["protocol"].startswith("FID-6 vs synthetic:test (10)") and "EMA" in summary["fid"]["protocol"]

    scfg = compose_config("sample", [f"ckpt={tmp_path / 'gen'}", "fid.num_samples=8", "fid.save_samples=true",
                                     "samples_per_class=1", "cfg_scale=0", "top_k=4"], tmp_path / "sample")
    result = run(scfg, tmp_path / "sample")
    assert result["fid"]["fid"] == 8 and result["sampling"]["cfg_scale"] == 0 and result["sampling"]["top_k"] == 4
    pngs = sorted((tmp_path / "sample" / "samples").glob("*.png"))
    assert len(pngs) == 8 and [p.name.split("class")[1] for p in pngs[:4]] == ["0.png", "1.png", "2.png", "3.png"]
    assert json.loads((tmp_path / "sample" / "metrics.json").read_text())["fid"]["num_samples"] == 8
    printed = capsys.readouterr().out  # issue 15.17: where the outputs are
    assert f"{tmp_path / 'sample' / 'metrics.json'}" in printed and f"{tmp_path / 'sample' / 'samples'}" in printed


@pytest.mark.slow
def test_real_fid_through_sample_py(tok_runs, tmp_path):
    """The Inception FID of a few samples against 32 reference images (about a minute on 2 CPU cores)."""
    from sample import run
    from train import train

    train(compose_config("train", gen_overrides("gpt", tok_runs["fsq"], tmp_path / "data") + ["trainer.max_steps=2"],
                         tmp_path / "gen"))
    scfg = compose_config("sample", [f"ckpt={tmp_path / 'gen'}", "fid.num_samples=8", "fid.reference_images=32",
                                     "fid.save_samples=true", "samples_per_class=1"], tmp_path / "sample")
    result = run(scfg, tmp_path / "sample")
    assert "FID-8 vs synthetic:test (32)" in result["fid"]["protocol"]
    # the reported FID is the Frechet distance between the 8 saved samples and the first 32 test images
    from evaluation.fid import compute_statistics, frechet_distance, reference_statistics

    data = yaml.safe_load((tmp_path / "gen" / "config.yaml").read_text())["data"]
    real = reference_statistics("synthetic", "test", SIZE, 32, settings=data.get("settings"))
    pngs = sorted((tmp_path / "sample" / "samples").glob("*.png"))
    assert len(pngs) == 8
    fake = compute_statistics(torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1)
                                           for p in pngs]))  # uint8 (8, 3, H, W)
    assert result["fid"]["fid"] == pytest.approx(frechet_distance(real.mu, real.sigma, fake.mu, fake.sigma), rel=1e-6)



@pytest.mark.slow
def test_fid_over_two_gloo_ranks_covers_every_sample_once(tok_runs, tmp_path):
    """torchrun with 2 CPU processes: each rank samples its share, one FID over all of them from rank 0."""
    from train import train

    train(compose_config("train", gen_overrides("var", tok_runs["msvq"], tmp_path / "data") + ["trainer.max_steps=2"],
                         tmp_path / "gen"))
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--nproc_per_node=2", "--master_port=29571", "sample.py",
                           f"ckpt={tmp_path / 'gen'}", "fid.num_samples=10", "fid.reference_images=32",
                           "fid.save_samples=true", "samples_per_class=1", f"hydra.run.dir={tmp_path / 'sample'}"],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    _ok(proc)
    result = json.loads((tmp_path / "sample" / "metrics.json").read_text())
    assert result["world_size"] == 2 and result["fid"]["num_samples"] == 10
    names = sorted(p.name for p in (tmp_path / "sample" / "samples").glob("*.png"))
    assert [n[:6] for n in names] == [f"{i:06d}" for i in range(10)]
