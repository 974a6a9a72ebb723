"""An image folder: class subfolders give labels, a flat folder is unconditional (label 0).

Splits: root/train and root/test (etc.) subfolders are the splits. Without them a deterministic `holdout`
fraction of the images (a fixed-seed choice) is the test/val split and the rest the train split, so a model
is never scored on its training images unless holdout=0 asks for it; `description` says which images a split
holds. Images are converted with their true range (`data.transforms.to_8bit`: 16-bit, float, CMYK, palette
...), resized (short side) and center-cropped to `image_size`, as gray or RGB. Unreadable files are skipped
with a warning naming each one and a summary, or raise with strict=True; a mode that cannot be converted is
an error naming the file.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from data.transforms import pil_to_tensor, to_8bit

log = logging.getLogger(__name__)
EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


class CorruptImageError(RuntimeError):
    """An image file that PIL cannot read."""


HELD_OUT = ("test", "val", "validation")  # split names that get the held-out images of a flat folder


def _check(path: Path, channels: int = 3) -> str | None:
    """None if PIL can decode the file, else the reason; UnsupportedImageError if its mode cannot be converted."""
    try:
        with Image.open(path) as img:
            img.load()
            corner = img.crop((0, 0, 1, 1))  # same mode, one pixel
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    to_8bit(corner, channels, str(path))  # an unsupported mode fails here, naming the file
    return None


def readable_images(files: list, strict: bool = False, channels: int = 3, what: str = "", limit: int | None = None,
                    strict_hint: str = "set data.strict=false to skip unreadable images") -> tuple[list, list]:
    """(readable files, skipped files): unreadable ones are skipped with a warning naming each (and a count), or
    raise CorruptImageError with strict. Stops after `limit` readable files."""
    good, bad = [], []
    for p in files:
        if limit is not None and len(good) >= limit:
            break
        reason = _check(Path(p), channels)
        if reason is None:
            good.append(p)
        elif strict:
            raise CorruptImageError(f"cannot read image {p} ({reason}); remove it or {strict_hint}")
        else:
            warnings.warn(f"skipping unreadable image {p} ({reason})", stacklevel=2)
            bad.append(p)
    if bad:
        log.warning("%s: skipped %d unreadable images of %d", what or "images", len(bad), len(good) + len(bad))
    return good, bad


def list_images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())


class ImageFolder(Dataset):
    """(image (C, S, S) in [-1, 1], label) from a folder tree; see the module docstring."""

    def __init__(self, root: str, split: str | None = None, image_size: int = 32, channels: int = 3,
                 strict: bool = False, holdout: float = 0.1):
        base = Path(root).expanduser()
        own_split = bool(split) and (base / split).is_dir()
        if own_split:
            base = base / split
        if not base.is_dir():
            raise FileNotFoundError(f"image folder {base} does not exist; set data.root to a folder of images "
                                    "(class subfolders give labels)")
        subdirs = sorted(d for d in base.iterdir() if d.is_dir() and list_images(d))
        if subdirs:
            self.classes = [d.name for d in subdirs]
            items = [(p, k) for k, d in enumerate(subdirs) for p in list_images(d)]
        else:
            self.classes = []
            items = [(p, 0) for p in list_images(base)]
        if not items:
            raise FileNotFoundError(f"no images ({', '.join(sorted(EXTENSIONS))}) found under {base}")
        good, bad = readable_images([p for p, _ in items], strict, channels, f"image folder {base}")
        goodset = set(good)
        items = [(p, k) for p, k in items if p in goodset]
        if not items:
            raise FileNotFoundError(f"every image under {base} is unreadable")
        self.skipped = [str(p) for p in bad]
        self.items, self.description = self._split(items, base, split, own_split, float(holdout))
        self.image_size, self.channels = image_size, channels
        self.num_classes = max(1, len(self.classes))

    @staticmethod
    def _split(items: list, base: Path, split: str | None, own_split: bool, holdout: float) -> tuple[list, str]:
        """The items of `split` and a description of them (see the module docstring)."""
        n = len(items)
        if own_split:
            return items, f"{n} images of {base}"
        if not split or holdout <= 0:
            return items, f"all {n} images of {base} (no held-out split: every split is the whole folder)"
        if not 0 < holdout < 1:
            raise ValueError(f"data.holdout={holdout} must be in [0, 1): the fraction of a flat folder held out")
        n_test = max(1, round(n * holdout))
        if n_test >= n:
            raise ValueError(f"image folder {base} has {n} images, too few to hold out {holdout:g} of them; add "
                             "images, or set data.holdout=0 to train and score on the same images")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
        held = sorted(order[:n_test])
        if split in HELD_OUT:
            return [items[i] for i in held], f"the {n_test} held-out images ({holdout:g}) of the {n} in {base}"
        keep = sorted(set(range(n)) - set(held))
        return [items[i] for i in keep], f"{n - n_test} of the {n} images in {base} (the other {n_test} held out)"

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        with Image.open(path) as img:
            return pil_to_tensor(img, self.image_size, self.channels, str(path)), label


def save_images(images: torch.Tensor, folder: str | Path, start: int = 0, prefix: str = "") -> list[Path]:
    """Write (B, C, H, W) images in [-1, 1] as numbered PNGs; returns the paths."""
    from data.transforms import float_to_uint8

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(float_to_uint8(images.detach().cpu())):
        arr = img.permute(1, 2, 0).numpy()
        pil = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
        path = folder / f"{prefix}{start + i:06d}.png"
        pil.save(path)
        paths.append(path)
    return paths
