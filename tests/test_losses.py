"""Perceptual and adversarial tokenizer losses: the formulas, the PatchGAN, LPIPS (by hand; an error without weights),
and adversarial training inside the LightningModule (steps, logging, resume)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY, compose_config, run_entry
from tokenizers.discriminator import (PatchGAN, adaptive_weight, gan_losses, hinge_d_loss, hinge_g_loss,
                                      non_saturating_d_loss, non_saturating_g_loss)
from tokenizers.lpips import LPIPS, TAP_CHANNELS, VGG16_FILE, vgg16_features

GAN = ["tokenizer.loss.adversarial.weight=0.1", "tokenizer.loss.adversarial.ndf=8", "test_after_training=false"]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add overhead on a loaded machine
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------
# Formulas
# ----------------------------------------------------------------------------------------------


def test_adaptive_weight_matches_hand_computed_gradients():
    torch.manual_seed(0)
    x = torch.randn(4, 3)
    target = torch.randn(4, 2)
    c = torch.randn(4, 2)
    last = torch.nn.Parameter(torch.randn(3, 2))
    out = x @ last  # (4, 2)
    rec = (out - target).pow(2).sum()
    g = (out * c).sum()
    # By hand: d rec / d last = 2 x^T (x last - target); d g / d last = x^T c.
    rec_grad = 2 * x.T @ (x @ last.detach() - target)
    g_grad = x.T @ c
    expected = 0.8 * rec_grad.norm() / (g_grad.norm() + 1e-4)

    got = adaptive_weight(rec, g, last)
    assert torch.allclose(got, expected, rtol=1e-5)
    assert not got.requires_grad and last.grad is None  # detached; .grad untouched
    (rec + got * g).backward()  # the graph was kept for the real backward
    assert torch.allclose(last.grad, rec_grad + expected * g_grad, rtol=1e-4, atol=1e-5)

    out = x @ last  # a fresh graph: the backward above freed the old one
    got = adaptive_weight(out.sum(), (out * c).sum(), last, scale=2.0, eps=0.0)  # d sum / d last = x^T 1
    assert torch.allclose(got, 2.0 * (x.T @ torch.ones(4, 2)).norm() / g_grad.norm(), rtol=1e-5)
    out = x @ last
    tiny_g = 1e-12 * (out * c).sum()  # ||grad G|| ~ 0: the weight is clamped at max
    assert float(adaptive_weight((out - target).pow(2).sum(), tiny_g, last, eps=0.0, max=1e4)) == 1e4


def test_hinge_and_non_saturating_losses_on_hand_made_logits():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, 0.5, 2] -> 5/6; relu(1 + fake) = [0, 1, 2] -> 1
    assert math.isclose(float(hinge_d_loss(real, fake)), 0.5 * (5 / 6 + 1), rel_tol=1e-6)
    assert math.isclose(float(hinge_g_loss(fake)), 1 / 3, rel_tol=1e-6)  # -mean(fake)
    # A confident, correct discriminator has zero hinge loss.
    assert float(hinge_d_loss(torch.full((5,), 3.0), torch.full((5,), -3.0))) == 0.0
    # Non-saturating: -log sigmoid, written out.
    ns_d = 0.5 * (-torch.log(torch.sigmoid(real)).mean() - torch.log(1 - torch.sigmoid(fake)).mean())
    assert torch.allclose(non_saturating_d_loss(real, fake), ns_d, rtol=1e-5)
    assert torch.allclose(non_saturating_g_loss(fake), -torch.log(torch.sigmoid(fake)).mean(), rtol=1e-5)
    assert gan_losses("hinge") == (hinge_d_loss, hinge_g_loss)
    with pytest.raises(ValueError, match="hinge"):
        gan_losses("wasserstein")


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_patchgan_shape_and_init(norm):
    torch.manual_seed(0)
    d = PatchGAN(in_channels=1, ndf=64, layers=3, norm=norm)
    logits = d(torch.randn(2, 1, 32, 32))
    assert logits.shape == (2, 1, 2, 2)  # 32 -> 16 -> 8 -> 4 (stride 2), -> 3 -> 2 (stride 1)
    assert PatchGAN(3, ndf=8)(torch.randn(1, 3, 64, 64)).shape == (1, 1, 6, 6)
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 5 and convs[1].out_channels == 128 and convs[3].out_channels == 512
    weights = torch.cat([m.weight.detach().flatten() for m in convs])
    assert abs(float(weights.std()) - 0.02) < 1e-3 and abs(float(weights.mean())) < 1e-3
    with pytest.raises(ValueError, match="batch or group"):
        PatchGAN(norm="instance")


# ----------------------------------------------------------------------------------------------
# LPIPS
# ----------------------------------------------------------------------------------------------


def test_lpips_without_its_weights_is_an_error_that_says_how_to_get_them(tmp_path, monkeypatch):
    import tokenizers.lpips as lpips_mod
    from tokenizers.lpips import LPIPSWeightsError

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no_torch_home"))
    with pytest.raises(LPIPSWeightsError) as missing_trunk:
        LPIPS()
    msg = str(missing_trunk.value)
    assert str(tmp_path / "no_torch_home" / "hub" / "checkpoints" / VGG16_FILE) in msg
    assert "torchvision.models.vgg16(weights='IMAGENET1K_V1')" in msg and "tokenizer.loss.perceptual=0" in msg
    backbone, heads = _fake_lpips_files(tmp_path)
    monkeypatch.setattr(lpips_mod, "default_heads_path", lambda: None)  # the lpips package is not installed
    with pytest.raises(LPIPSWeightsError, match="pip install lpips"):
        LPIPS(backbone)
    with pytest.raises(LPIPSWeightsError, match="pip install lpips"):
        LPIPS(backbone, tmp_path / "nowhere.pth")
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(LPIPSWeightsError, match="could not be loaded"):
        LPIPS(broken, heads)
    # a run asking for the perceptual loss fails when it is built, not with a zero loss later
    from tokenizers.module import TokenizerModule

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # the fake trunk is found there; the heads are not
    with pytest.raises(LPIPSWeightsError, match="pip install lpips"):
        TokenizerModule(_module_config(tmp_path / "cfg", ["tokenizer.loss.perceptual=1.0"]))
    assert TokenizerModule(_module_config(tmp_path / "cfg0", [])).perceptual_net is None  # weight 0: never built


def _fake_lpips_files(folder: Path) -> tuple[Path, Path]:
    """A random VGG16 trunk (torchvision's key names) and random heads (lpips's), to test the loading code."""
    torch.manual_seed(0)
    trunk = {f"features.{k}": v for k, v in vgg16_features().state_dict().items()}
    backbone = folder / "hub" / "checkpoints" / VGG16_FILE
    backbone.parent.mkdir(parents=True)
    torch.save(trunk, backbone)
    heads = folder / "vgg.pth"
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(TAP_CHANNELS)}, heads)
    return backbone, heads


def _lpips_by_hand(trunk: dict, heads: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """LPIPS v0.1 written out on torchvision's own VGG16: sum over relu{1_2,2_2,3_3,4_3,5_3} of the spatial mean of
    w_l . (unit(f_l(x)) - unit(f_l(y)))^2, inputs (x - shift) / scale, gray repeated to RGB."""
    from torchvision.models.vgg import cfgs, make_layers

    features = make_layers(cfgs["D"])  # torchvision's vgg16().features, without building the 120M-weight classifier
    features.load_state_dict({k[len("features."):]: v for k, v in trunk.items()})
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    hx, hy = ((t.expand(-1, 3, -1, -1) - shift) / scale for t in (x, y))
    total = 0
    for i, (start, stop) in enumerate([(0, 4), (4, 9), (9, 16), (16, 23), (23, 30)]):
        hx, hy = features[start:stop](hx), features[start:stop](hy)
        ux = hx / (hx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        uy = hy / (hy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        w = heads[f"lin{i}.model.1.weight"].view(1, -1, 1, 1)
        total = total + (w * (ux - uy).pow(2)).sum(1).mean(dim=(1, 2))
    return total


def test_lpips_with_local_weights_is_a_frozen_distance_outside_the_state_dict(tmp_path, monkeypatch):
    backbone, heads = _fake_lpips_files(tmp_path)
    net = LPIPS(backbone, heads)
    assert not any(p.requires_grad for p in net.parameters())
    net.train()
    assert not net.training  # stays in eval mode
    x = torch.rand(2, 1, 16, 16) * 2 - 1  # small: VGG16 is slow on a loaded CPU
    y = torch.rand(2, 1, 16, 16) * 2 - 1
    assert torch.allclose(net(x, x), torch.zeros(2), atol=1e-6)
    assert torch.allclose(net(x, y), net(x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1)))  # gray = repeated RGB
    x.requires_grad_(True)
    d = net(x, y)
    d.sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    want = _lpips_by_hand(torch.load(backbone, weights_only=True), torch.load(heads, weights_only=True), x_ref, y)
    want.sum().backward()
    torch.testing.assert_close(d, want.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-8)

    # Inside the LightningModule: used, but not a submodule, not optimized, not saved.
    from tokenizers.module import TokenizerModule
    import tokenizers.lpips as lpips_mod

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(lpips_mod, "default_heads_path", lambda: heads)
    module = TokenizerModule(_module_config(tmp_path / "cfg", ["tokenizer.loss.perceptual=1.0"]))
    assert module.perceptual_net is not None
    assert not any("lins" in k or "features" in k for k in module.state_dict())
    optimized = {id(p) for g in module.configure_optimizers()[0][0].param_groups for p in g["params"]}
    assert not optimized & {id(p) for p in module.perceptual_net.parameters()}
    assert module.discriminator is None  # adversarial weight 0: no discriminator at all


def test_lpips_matches_the_lpips_package(tmp_path):
    """Same trunk weights (random: nothing downloads) and the package's own heads -> the package's numbers."""
    lpips = pytest.importorskip("lpips")
    from tokenizers.lpips import default_heads_path

    torch.manual_seed(0)
    ref = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval()
    trunk = {f"features.{k}": v for s in range(1, 6) for k, v in getattr(ref.net, f"slice{s}").state_dict().items()}
    torch.save(trunk, tmp_path / VGG16_FILE)
    ours = LPIPS(tmp_path / VGG16_FILE, default_heads_path())
    x, y = torch.rand(2, 1, 16, 16) * 2 - 1, torch.rand(2, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        want = ref(x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1)).flatten()
        assert torch.allclose(ours(x, y), want, rtol=1e-5, atol=1e-7)


def _module_config(folder: Path, overrides: list[str]) -> dict:
    from omegaconf import OmegaConf

    cfg = compose_config("train", TINY + overrides, folder)
    return {"kind": "tokenizer", "tokenizer": OmegaConf.to_container(cfg.tokenizer, resolve=True),
            "data": {"name": "synthetic", "image_size": 32, "channels": 1, "num_classes": 4}, "total_steps": 6}


# ----------------------------------------------------------------------------------------------
# Adversarial training in the LightningModule
# ----------------------------------------------------------------------------------------------


def _train(folder: Path, overrides: list[str]):
    from train import train

    cfg = compose_config("train", TINY + overrides, folder)
    return train(cfg)


@pytest.fixture(scope="module")
def gan_run(tmp_path_factory):
    """6 steps with the discriminator on from step 0 (no LPIPS: VGG16 would dominate the test's time)."""
    folder = tmp_path_factory.mktemp("gan")
    torch.set_num_threads(1)
    metrics, objects = _train(folder, GAN)
    return metrics, objects


def _initial_discriminator(folder: Path, overrides: list[str]) -> dict[str, torch.Tensor]:
    """The discriminator a run starts from: train() seeds, then builds the module the same way."""
    import lightning as L

    from tokenizers.module import TokenizerModule

    L.seed_everything(42, verbose=False)
    module = TokenizerModule(_module_config(folder, overrides))
    return {k: v.clone() for k, v in module.discriminator.state_dict().items()}


def test_adversarial_step_trains_the_discriminator_and_logs(gan_run, tmp_path):
    metrics, objects = gan_run
    module, trainer = objects["model"], objects["trainer"]
    for key in ("train/d_loss", "train/g_loss", "train/adaptive_weight", "train/l1"):
        assert key in metrics and math.isfinite(metrics[key]), key
    assert "train/lpips" not in metrics and module.perceptual_net is None
    # the last step's generator loss is L1 + w_q x quantizer loss + 0.1 x lambda x G loss, lambda in [0, 1e4]
    want = (metrics["train/l1"] + metrics["train/quant_weight"] * metrics["train/quant_loss"]
            + 0.1 * metrics["train/adaptive_weight"] * metrics["train/g_loss"])
    assert metrics["train/loss"] == pytest.approx(want, rel=1e-5)
    assert 0 <= metrics["train/adaptive_weight"] <= 1e4
    # The discriminator moved away from its init, and its Adam took one step per batch.
    init = _initial_discriminator(tmp_path, GAN)
    final = module.discriminator.state_dict()
    weights = [k for k in init if k.endswith("weight")]
    assert weights and all(not torch.equal(init[k], final[k]) for k in weights)
    state = torch.load(objects["output_dir"] / "checkpoints" / "last.ckpt", weights_only=True)
    d_keys = [k for k in state["state_dict"] if k.startswith("discriminator.")]
    assert d_keys and not any("lpips" in k or k.startswith("_perceptual") for k in state["state_dict"])
    assert len(state["optimizer_states"]) == 2
    d_opt_state = state["optimizer_states"][1]["state"]
    assert d_opt_state and all(int(s["step"]) == 6 for s in d_opt_state.values())
    from safetensors.torch import load_file

    exported = load_file(objects["output_dir"] / "model.safetensors")
    assert not any(k.startswith("discriminator") for k in exported)
    assert trainer.global_step == 6


def test_global_step_counts_batches_with_two_optimizers(gan_run):
    import json

    _, objects = gan_run
    assert objects["trainer"].global_step == 6 and objects["model"].batches_seen == 6
    assert json.loads((objects["output_dir"] / "metrics.json").read_text())["steps"] == 6


def test_before_start_step_the_discriminator_is_untouched(tmp_path):
    overrides = GAN + ["tokenizer.loss.adversarial.start_step=100", "trainer.max_steps=2"]
    metrics, objects = _train(tmp_path / "run", overrides)
    module = objects["model"]
    assert "train/d_loss" not in metrics and "train/g_loss" not in metrics and "train/l1" in metrics
    assert objects["trainer"].global_step == 2
    assert all(p.grad is None for p in module.discriminator.parameters())
    assert not module.trainer.optimizers[1].state  # its Adam never stepped
    init = _initial_discriminator(tmp_path / "init", overrides)
    final = module.discriminator.state_dict()  # weights and BatchNorm statistics alike
    assert init.keys() == final.keys() and all(torch.equal(init[k], final[k]) for k in init)


def test_no_discriminator_when_weight_is_zero(tmp_path):
    module_cfg = _module_config(tmp_path, [])
    from tokenizers.module import TokenizerModule

    module = TokenizerModule(module_cfg)
    assert module.discriminator is None and not any(k.startswith("discriminator") for k in module.state_dict())
    optimizers, schedulers = module.configure_optimizers()
    assert len(optimizers) == 1 and len(schedulers) == 1
    gan = TokenizerModule(_module_config(tmp_path, GAN))
    optimizers, schedulers = gan.configure_optimizers()
    assert len(optimizers) == 2 and len(schedulers) == 2
    # Resuming across the switch fails with a message instead of Lightning's key / optimizer-count errors.
    with pytest.raises(ValueError, match="without a discriminator"):
        gan.on_load_checkpoint({"state_dict": dict(module.state_dict())})
    with pytest.raises(ValueError, match="with a discriminator"):
        module.on_load_checkpoint({"state_dict": dict(gan.state_dict())})


def test_resume_restores_the_discriminator(tmp_path):
    run = TINY + GAN + ["tokenizer.loss.adversarial.start_step=2", "callbacks.last_checkpoint.every_n_train_steps=3",
                        "callbacks.model_checkpoint=null", "callbacks.lr_monitor=null", "callbacks.progress_bar=null",
                        "trainer.val_check_interval=6"]
    env = {"OMP_NUM_THREADS": "1"}  # the same single thread as this process: the same numbers
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    _train(ref_dir, run[len(TINY):])  # the uninterrupted reference, in-process (one interpreter start less)
    killed = run_entry("train.py", run + [f"hydra.run.dir={run_dir}", "+callbacks.kill._target_=tests.helpers.KillAtStep",
                                          "+callbacks.kill.step=4"], env=env)
    assert killed.returncode == 137, killed.stderr[-3000:]
    last = run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3
    resumed = run_entry("train.py", run + [f"ckpt_path={last}"], env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    want = torch.load(ref_dir / "checkpoints" / "last.ckpt", weights_only=True)
    got = torch.load(last, weights_only=True)
    assert want["global_step"] == got["global_step"] == 6
    d_want = {k: v for k, v in want["state_dict"].items() if k.startswith("discriminator.")}
    d_got = {k: v for k, v in got["state_dict"].items() if k.startswith("discriminator.")}
    assert d_want and d_want.keys() == d_got.keys()
    for k in d_want:
        assert torch.allclose(d_want[k].float(), d_got[k].float(), atol=1e-6), k
    # The discriminator's Adam state came back too (it took 4 steps: global steps 2..5).
    for a, b in zip(want["optimizer_states"][1]["state"].values(), got["optimizer_states"][1]["state"].values()):
        assert int(a["step"]) == int(b["step"]) == 4
        assert torch.allclose(a["exp_avg"], b["exp_avg"], atol=1e-6)


# ----------------------------------------------------------------------------------------------
# The quantizer-loss ramp (bsq-vit's codebook_rampup)
# ----------------------------------------------------------------------------------------------


def test_rampdown_matches_bsq_vit_formula():
    from utils.schedule import rampdown

    f = rampdown(3.0, 2000)
    for step in (0, 1, 500, 1999, 2000, 5000):
        r = min(step, 2000) / 2000
        assert f(step) == pytest.approx(1.0 * r + 3.0 * (1 - r))
    assert f(0) == 3.0 and f(1000) == 2.0 and f(2000) == f(10**6) == 1.0
    assert rampdown(3.0, 0)(0) == 1.0  # off


def test_bsq_trains_with_its_ramped_quantizer_weight(tmp_path):
    # BSQ's config ramps its loss x3 -> x1; with a 4-step ramp, the third step (global_step 2) weighs it x2, and
    # the total loss is exactly L1 + 2 x the quantizer's loss.
    overrides = ["tokenizer=bsq", "tokenizer.loss.quantizer_ramp.steps=4", "trainer.max_steps=3",
                 "test_after_training=false"]
    metrics, _ = _train(tmp_path / "run", overrides)
    assert metrics["train/quant_weight"] == pytest.approx(2.0)
    assert metrics["train/loss"] == pytest.approx(metrics["train/l1"] + 2.0 * metrics["train/quant_loss"], rel=1e-5)
