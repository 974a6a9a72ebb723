"""A tiny synthetic labelled image set for tests: each class is a bright square at its own place."""
from __future__ import annotations

import torch
from torch.utils.data import Dataset


class Synthetic(Dataset):
    """`size` images of (channels, S, S) in [-1, 1]; class k puts a square on a k-dependent cell, plus noise."""

    def __init__(self, split: str = "train", size: int = 256, image_size: int = 32, channels: int = 1,
                 num_classes: int = 4, seed: int = 0):
        g = torch.Generator().manual_seed(seed + (0 if split == "train" else 1))
        self.labels = torch.randint(num_classes, (size,), generator=g)
        cells = 4
        cell = image_size // cells
        x = torch.full((size, channels, image_size, image_size), -1.0)
        for i, k in enumerate(self.labels.tolist()):
            r, c = divmod((k * 5) % (cells * cells), cells)
            jitter = torch.randint(0, max(1, cell // 2), (2,), generator=g).tolist()
            top, left = r * cell + jitter[0], c * cell + jitter[1]
            x[i, :, top:top + cell, left:left + cell] = 1.0
        x += 0.1 * torch.randn(x.shape, generator=g)
        self.images = x.clamp(-1, 1)
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])
