"""Datasets: Fashion-MNIST layout, image folders (labels, corrupt files), resumable order, clear errors."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data.fashion_mnist as fm
from data.datamodule import ResumableSampler
from data.image_folder import CorruptImageError, ImageFolder
from data.registry import load_split


def _write(path: Path, size=(40, 30), color=128, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color=color if mode == "L" else (color, 0, 255 - color)).save(path)


@pytest.mark.skipif(not Path(fm.DEBIAN_DIR).exists(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_is_padded_to_32_with_labels():
    ds = load_split("fashion_mnist", "test")
    assert len(ds) == 10_000
    x, y = ds[0]
    assert x.shape == (1, 32, 32) and 0 <= y < 10
    assert torch.all(x[:, :2, :] == -1) and torch.all(x[:, :, -2:] == -1)  # the 2-pixel pad is black
    assert x.max() > 0.5  # and the garment is there
    assert torch.bincount(ds.labels).tolist() == [1000] * 10


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(fm, "DEBIAN_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        fm.FashionMNIST("train", root=str(tmp_path / "empty"))


def test_image_folder_labels_resize_and_crop(tmp_path):
    _write(tmp_path / "cats" / "a.png")
    _write(tmp_path / "cats" / "b.jpg", size=(64, 64))
    _write(tmp_path / "dogs" / "c.png", size=(30, 50))
    ds = ImageFolder(str(tmp_path), image_size=16, channels=3)
    assert ds.classes == ["cats", "dogs"] and len(ds) == 3
    labels = sorted(ds[i][1] for i in range(3))
    assert labels == [0, 0, 1]
    assert all(ds[i][0].shape == (3, 16, 16) for i in range(3))
    gray = ImageFolder(str(tmp_path), image_size=8, channels=1)
    assert gray[0][0].shape == (1, 8, 8)


def test_flat_folder_is_unconditional(tmp_path):
    for i in range(3):
        _write(tmp_path / f"{i}.png")
    ds = ImageFolder(str(tmp_path), image_size=8)
    assert ds.classes == [] and {ds[i][1] for i in range(3)} == {0}


def test_corrupt_image_is_skipped_with_warning_or_strict_error(tmp_path):
    _write(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = ImageFolder(str(tmp_path), image_size=8)
    assert len(ds) == 1 and ds.skipped == [str(tmp_path / "broken.png")]
    assert any("broken.png" in str(w.message) for w in caught)
    with pytest.raises(CorruptImageError, match="broken.png"):
        ImageFolder(str(tmp_path), image_size=8, strict=True)


def test_missing_or_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolder(str(tmp_path))


def test_unknown_dataset_names_the_choices():
    with pytest.raises(ValueError, match="fashion_mnist"):
        load_split("imagenet_please", "train")


def test_resumable_sampler_continues_the_same_order():
    full = ResumableSampler(100, seed=3)
    epoch0, epoch1 = list(full), list(full)
    assert sorted(epoch0) == list(range(100)) and epoch0 != epoch1  # a new permutation each epoch
    resumed = ResumableSampler(100, seed=3, epoch=0, start=40)
    assert list(resumed) == epoch0[40:]
    assert list(resumed) == epoch1  # then carries on into the next epoch as the original did


def test_sampler_splits_ranks_disjointly():
    r0 = list(ResumableSampler(101, seed=0, rank=0, world_size=2))
    r1 = list(ResumableSampler(101, seed=0, rank=1, world_size=2))
    assert len(r0) == len(r1) == 50 and not set(r0) & set(r1)


def test_synthetic_set_is_deterministic():
    a, b = load_split("synthetic", "train", size=16), load_split("synthetic", "train", size=16)
    assert torch.equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
