"""An image folder: class subfolders give labels, a flat folder is unconditional (label 0).

Images are resized (short side) and center-cropped to `image_size`, as gray or RGB. Unreadable
files are skipped with a warning naming each one and a summary, or raise with strict=True.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from data.transforms import pil_to_tensor

log = logging.getLogger(__name__)
EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


class CorruptImageError(RuntimeError):
    """An image file that PIL cannot read."""


def _check(path: Path) -> str | None:
    """None if PIL can decode the file, else the reason."""
    try:
        with Image.open(path) as img:
            img.load()
        return None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        return f"{type(e).__name__}: {e}"


def list_images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())


class ImageFolder(Dataset):
    """(image (C, S, S) in [-1, 1], label) from a folder tree; see the module docstring."""

    def __init__(self, root: str, split: str | None = None, image_size: int = 32, channels: int = 3,
                 strict: bool = False):
        base = Path(root).expanduser()
        if split and (base / split).is_dir():
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
        bad = []
        for p, _ in items:
            reason = _check(p)
            if reason is not None:
                if strict:
                    raise CorruptImageError(f"cannot read image {p} ({reason}); remove it or set data.strict=false "
                                            "to skip unreadable images")
                warnings.warn(f"skipping unreadable image {p} ({reason})", stacklevel=2)
                bad.append(p)
        if bad:
            log.warning("image folder %s: skipped %d of %d unreadable images", base, len(bad), len(items))
        badset = set(bad)
        self.items = [(p, k) for p, k in items if p not in badset]
        if not self.items:
            raise FileNotFoundError(f"every image under {base} is unreadable")
        self.skipped = [str(p) for p in bad]
        self.image_size, self.channels = image_size, channels
        self.num_classes = max(1, len(self.classes))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        with Image.open(path) as img:
            return pil_to_tensor(img, self.image_size, self.channels), label


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
