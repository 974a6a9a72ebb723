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


# -- issue 15: PIL modes, unreadable files in the FID CLI, held-out splits, class names, progress ----------------
def _png16(path: Path, rgb) -> None:
    """A 16-bit RGB PNG (PIL cannot write one), from a uint16 array (H, W, 3)."""
    import struct
    import zlib

    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _mode_images(folder: Path) -> dict[str, float]:
    """One 16x16 file per PIL mode the loaders accept, each a flat image of a known gray/red level in [0, 1]."""
    folder.mkdir(parents=True, exist_ok=True)
    flat = np.full((16, 16), 0.5)
    Image.fromarray((flat * 65535).astype(np.uint16)).save(folder / "i16.png")  # mode I;16
    Image.fromarray((flat * 0.25 * 65535).astype(np.int32)).save(folder / "i32.tif")  # mode I (16-bit counts)
    Image.fromarray((flat * 0.75).astype(np.float32)).save(folder / "f.tif")  # mode F in [0, 1]
    _png16(folder / "rgb16.png", np.full((16, 16, 3), 0.25 * 65535, dtype=np.uint16))
    Image.new("CMYK", (16, 16), (0, 0, 0, 0)).save(folder / "cmyk.jpg", quality=100)  # no ink: white
    Image.new("RGBA", (16, 16), (51, 51, 51, 128)).save(folder / "rgba.png")
    pal = Image.new("P", (16, 16), 1)
    pal.putpalette([0, 0, 0, 204, 204, 204] + [0] * 762)
    pal.save(folder / "p.png")
    Image.new("LA", (16, 16), (102, 255)).save(folder / "la.png")
    return {"i16.png": 0.5, "i32.tif": 0.125, "f.tif": 0.375, "rgb16.png": 0.25, "cmyk.jpg": 1.0, "rgba.png": 0.2,
            "p.png": 0.8, "la.png": 0.4}


def test_every_pil_mode_loads_with_its_true_range(tmp_path):
    """Issue 15.3: 16-bit gray (I;16, I), float (F), 16-bit RGB, CMYK, RGBA, palette and LA images keep their levels
    in training (ImageFolder) and in the FID CLI's reader; PIL's plain convert turns I;16 white."""
    from evaluation.fid import _read_images

    levels = _mode_images(tmp_path / "modes")
    assert Image.open(tmp_path / "modes" / "i16.png").mode == "I;16"
    assert np.asarray(Image.open(tmp_path / "modes" / "i16.png").convert("L")).min() == 255  # the bug, by PIL
    ds = ImageFolder(str(tmp_path / "modes"), image_size=16, channels=1, holdout=0)
    for (path, _), (image, _) in zip(ds.items, (ds[i] for i in range(len(ds)))):
        want = levels[path.name] * 2 - 1  # [-1, 1]
        assert abs(float(image.mean()) - want) < 0.02, (path.name, float(image.mean()), want)
    for path, image in zip(ds.items, _read_images([str(p) for p, _ in ds.items])):
        if path[0].name in ("i16.png", "i32.tif", "f.tif", "la.png", "p.png"):  # gray: every channel at the level
            assert abs(float(image.float().mean()) / 255 - levels[path[0].name]) < 0.02, path[0].name


def test_a_mode_that_cannot_be_converted_names_the_file(tmp_path):
    from data.transforms import UnsupportedImageError

    _write(tmp_path / "ok.png")
    Image.new("LAB", (8, 8)).save(tmp_path / "lab.tif")
    with pytest.raises(UnsupportedImageError, match="lab.tif"):
        ImageFolder(str(tmp_path), image_size=8, channels=1)


class _TinyFeatures(torch.nn.Module):
    """A stand-in for Inception: 2048 features from a 4x4 average pool (no weights to load)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(48, 2048, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(x.float() / 255, 4).flatten(1) @ self.w


def test_fid_cli_skips_unreadable_files_like_training(tmp_path, monkeypatch, capsys):
    """Issue 15.4: a truncated JPEG and a zero-byte PNG are skipped with a warning naming each and counted in
    the label; --strict fails naming the file. (Before: a traceback naming no file.)"""
    from evaluation import fid as fid_module

    monkeypatch.setattr(fid_module, "fid_inception", lambda *a, **k: _TinyFeatures())
    for i in range(4):
        _write(tmp_path / "real" / f"{i}.png", size=(16, 16), color=40 * i)
        _write(tmp_path / "fake" / f"{i}.png", size=(16, 16), color=30 * i + 5)
    _write(tmp_path / "fake" / "whole.jpg", size=(16, 16))
    (tmp_path / "fake" / "cut.jpg").write_bytes((tmp_path / "fake" / "whole.jpg").read_bytes()[:200])
    (tmp_path / "fake" / "whole.jpg").unlink()
    (tmp_path / "fake" / "empty.png").write_bytes(b"")
    with pytest.warns(UserWarning) as caught:
        code = fid_module.main([str(tmp_path / "real"), str(tmp_path / "fake"), "--json"])
    assert code == 0
    named = " ".join(str(w.message) for w in caught)
    assert "cut.jpg" in named and "empty.png" in named
    import json

    result = json.loads(capsys.readouterr().out)
    assert result["num_fake"] == 4 and "4 readable fake images (2 unreadable skipped)" in result["protocol"]
    assert result["protocol"].startswith("FID-4 vs")
    assert fid_module.main([str(tmp_path / "real"), str(tmp_path / "fake"), "--strict"]) == 2
    err = capsys.readouterr().err
    assert "cut.jpg" in err or "empty.png" in err


def test_a_flat_folder_holds_out_a_deterministic_test_split(tmp_path):
    """Issue 15.6: train and test of a flat folder are disjoint, together the whole folder, the same on every
    load; holdout=0 is the old behaviour and the description says so."""
    for i in range(20):
        _write(tmp_path / f"{i:02d}.png", size=(8, 8), color=i * 10)
    train, test = (ImageFolder(str(tmp_path), split, image_size=8) for split in ("train", "test"))
    names = lambda ds: {p.name for p, _ in ds.items}  # noqa: E731
    assert len(test) == 2 and not names(train) & names(test) and len(names(train) | names(test)) == 20
    assert names(ImageFolder(str(tmp_path), "test", image_size=8)) == names(test)
    assert "held-out" in test.description and "held out" in train.description
    same = ImageFolder(str(tmp_path), "test", image_size=8, holdout=0)
    assert len(same) == 20 and "no held-out split" in same.description
    (tmp_path / "sub" / "test").mkdir(parents=True)  # own split folders: no holdout
    _write(tmp_path / "sub" / "test" / "a.png")
    assert len(ImageFolder(str(tmp_path / "sub"), "test", image_size=8)) == 1


def test_generator_grid_rows_carry_class_names(tmp_path):
    """Issue 15.17: the dataset's class names go into the run config and beside the grid's rows."""
    from data.datamodule import ImageDataModule
    from generators.module import class_names, save_class_grid
    from utils.grids import row_labels

    for cls in ("boots", "coats"):
        for i in range(2):
            _write(tmp_path / "imgs" / cls / f"{i}.png", size=(8, 8))
    dm = ImageDataModule(name="image_folder", root=str(tmp_path / "imgs"), image_size=8, channels=3, holdout=0)
    data = {"class_names": dm.class_names}
    assert data["class_names"] == ["boots", "coats"]
    grid = save_class_grid(torch.zeros(4, 3, 8, 8), 2, tmp_path / "grid.png", class_names(data, [0, 1]))
    assert row_labels(grid) == ["0 boots", "1 coats"]
    with Image.open(grid) as img:
        margin = np.asarray(img.convert("L"))[:, : img.width - (2 * 9 + 1)]
    assert margin.size and (margin < 128).any()  # the names are drawn
    assert class_names({}, [3]) == ["3"]  # a run without names: the ids


def test_waits_show_progress_bars(tmp_path, capfd):
    """Issue 15.15: Inception features and token-cache encoding print a progress bar on stderr."""
    from data.synthetic import Synthetic
    from data.token_cache import build_cache
    from evaluation.fid import compute_statistics
    from tests.test_generator_training import make_tokenizer_run
    from utils.runs import load_run

    compute_statistics([torch.zeros(4, 3, 8, 8, dtype=torch.uint8)], 2, _TinyFeatures())
    assert "Inception features" in capfd.readouterr().err
    tok = load_run(make_tokenizer_run(tmp_path / "tok", "fsq"), "tokenizer")
    build_cache(tok.model, Synthetic("train", size=8, image_size=16, channels=1), tmp_path / "c.safetensors", "raster",
                batch_size=4)
    assert "encoding" in capfd.readouterr().err


def test_the_test_metrics_label_says_which_images_were_scored(tmp_path):
    """Issue 15.6: the protocol label of a flat folder's test metrics names the held-out images."""
    from omegaconf import OmegaConf

    from data.datamodule import ImageDataModule
    from train import scored_images

    for i in range(10):
        _write(tmp_path / f"{i}.png", size=(8, 8))
    dm = ImageDataModule(name="image_folder", root=str(tmp_path), image_size=8, channels=3)
    dm.setup("test")
    cfg = OmegaConf.create({"data": {"name": "image_folder", "test_split": "test"}})
    assert "the 1 held-out images (0.1) of the 10" in scored_images(cfg, dm)
