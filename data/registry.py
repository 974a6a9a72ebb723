"""Dataset names -> dataset splits, so configs, FID references and CLIs name data the same way."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from torch.utils.data import Dataset

DATASETS = ("fashion_mnist", "cifar10", "image_folder", "synthetic")
# the settings that change which images a split holds (download / strict only change how they are found)
CONTENT_KEYS = {"fashion_mnist": (), "cifar10": (), "image_folder": ("root", "channels", "holdout"),
                "synthetic": ("size", "channels", "num_classes", "seed")}


def content_settings(name: str, kwargs: dict | None) -> dict:
    """The dataset settings that determine its images, JSON-ready (an image folder's root made absolute)."""
    out = {k: kwargs[k] for k in CONTENT_KEYS.get(name, ()) if kwargs and kwargs.get(k) is not None}
    if "root" in out:
        out["root"] = str(Path(str(out["root"])).expanduser().resolve())
    return out


def data_key(name: str, kwargs: dict | None) -> str:
    """8 hex digits naming a dataset's content settings; '' for datasets with a single content (Fashion-MNIST)."""
    settings = content_settings(name, kwargs)
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8] if settings else ""


def load_split(name: str, split: str, image_size: int | None = None, **kwargs) -> Dataset:
    """A split of a named dataset yielding (image (C, H, W) in [-1, 1], label).

    kwargs go to the dataset (root, channels, strict, download, size, num_classes, seed).
    """
    if name == "fashion_mnist":
        from data.fashion_mnist import FashionMNIST

        allowed = {k: kwargs[k] for k in ("root", "download") if k in kwargs}
        return FashionMNIST(split, image_size=image_size or 32, **allowed)
    if name == "cifar10":
        from data.cifar10 import CIFAR10

        if image_size not in (None, 32):
            raise ValueError(f"CIFAR-10 is 32x32; image_size={image_size} is not supported")
        return CIFAR10(split, **{k: kwargs[k] for k in ("root", "download") if k in kwargs})
    if name == "image_folder":
        from data.image_folder import ImageFolder

        if not kwargs.get("root"):
            raise ValueError("data=image_folder needs data.root=<folder of images>")
        allowed = {k: kwargs[k] for k in ("root", "channels", "strict", "holdout") if k in kwargs}
        return ImageFolder(split=split, image_size=image_size or 32, **allowed)
    if name == "synthetic":
        from data.synthetic import Synthetic

        allowed = {k: kwargs[k] for k in ("size", "channels", "num_classes", "seed") if k in kwargs}
        return Synthetic(split, image_size=image_size or 32, **allowed)
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
