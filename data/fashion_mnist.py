"""Fashion-MNIST (Xiao et al. 2017) at 32x32: the 28x28 images padded by 2, with labels.

Read straight from the idx files: Debian's `dataset-fashion-mnist` package puts them in
/usr/share/datasets/fashion-mnist/, torchvision's download in <root>/FashionMNIST/raw/.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from data.transforms import uint8_to_float

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def _read_idx(path: Path, offset: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


def _find(name: str, roots: list[Path]) -> Path | None:
    for root in roots:
        for candidate in (root / name, root / f"{name}.gz"):
            if candidate.exists():
                return candidate
    return None


def locate(root: str | None, download: bool = False) -> list[Path]:
    """The folders to look in; with download=True fetch through torchvision into root if none has the files."""
    roots = [Path(DEBIAN_DIR)]
    if root:
        roots += [Path(root) / "FashionMNIST" / "raw", Path(root)]
    if all(_find(n, roots) for pair in FILES.values() for n in pair):
        return roots
    if download and root:
        from torchvision.datasets import FashionMNIST

        try:
            FashionMNIST(root, train=True, download=True)
            FashionMNIST(root, train=False, download=True)
            return roots
        except Exception as e:  # noqa: BLE001 - report the reason with the fix
            raise FileNotFoundError(f"Fashion-MNIST is not installed and torchvision could not download it ({e}). "
                                    "Install it with: apt-get install -y dataset-fashion-mnist") from e
    raise FileNotFoundError(
        f"Fashion-MNIST not found in {DEBIAN_DIR} or {root}. Install it with "
        "`apt-get install -y dataset-fashion-mnist` (or `make data`), or pass data.download=true "
        "on a machine with internet access.")


class FashionMNIST(Dataset):
    """Fashion-MNIST split as (image (1, 32, 32) in [-1, 1], label) pairs, held in memory as uint8."""

    classes = CLASSES

    def __init__(self, split: str = "train", root: str | None = None, image_size: int = 32, download: bool = False):
        if split not in FILES:
            raise ValueError(f"Fashion-MNIST has splits {sorted(FILES)}, not {split!r}")
        if image_size < 28:
            raise ValueError(f"Fashion-MNIST is 28x28; image_size must be >= 28 (got {image_size})")
        roots = locate(root or os.environ.get("TOKAR_DATA"), download)
        images = _read_idx(_find(FILES[split][0], roots), 16).reshape(-1, 1, 28, 28)
        labels = _read_idx(_find(FILES[split][1], roots), 8)
        pad = (image_size - 28) // 2
        x = torch.from_numpy(images.copy())
        x = F.pad(x, (pad, image_size - 28 - pad, pad, image_size - 28 - pad))  # (N, 1, S, S) zeros = black
        self.images = x
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.num_classes = 10

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return uint8_to_float(self.images[i]), int(self.labels[i])
