"""CIFAR-10 through torchvision (needs internet the first time; no registry ships it)."""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from data.transforms import uint8_to_float


class CIFAR10(Dataset):
    """CIFAR-10 split as (image (3, 32, 32) in [-1, 1], label)."""

    def __init__(self, split: str = "train", root: str = "data_cache", download: bool = True):
        from torchvision.datasets import CIFAR10 as TVCIFAR10

        try:
            ds = TVCIFAR10(root, train=(split == "train"), download=download)
        except Exception as e:  # noqa: BLE001
            raise FileNotFoundError(f"CIFAR-10 is not in {root} and could not be downloaded ({e}); it needs internet "
                                    "once, or copy cifar-10-batches-py into that folder") from e
        self.images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32) uint8
        self.labels = torch.tensor(ds.targets)
        self.classes, self.num_classes = ds.classes, 10

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return uint8_to_float(self.images[i]), int(self.labels[i])
