"""The LightningDataModule for every image dataset, with a resumable, seeded shuffle.

The training order is a seeded permutation per epoch, split across DDP ranks. After a resume the
sampler skips exactly the batches the run had already consumed (counted by the LightningModule's
`batches_seen`), so a killed run continues with the same data order it would have seen.
"""
from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from data.registry import load_split


class ResumableSampler(Sampler[int]):
    """Per-epoch seeded permutation, rank-strided, starting `start` samples into epoch `epoch`."""

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1, epoch: int = 0, start: int = 0):
        self.n, self.seed, self.rank, self.world_size = n, seed, rank, world_size
        self.epoch, self.start = epoch, start
        self.per_rank = n // world_size  # drop the remainder so ranks stay in step

    def __len__(self) -> int:
        # The full epoch, even when resuming mid-epoch: Lightning sizes every later epoch by this number.
        return self.per_rank

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.n, generator=g)[: self.per_rank * self.world_size]
        mine = perm[self.rank :: self.world_size][self.start :].tolist()
        self.epoch, self.start = self.epoch + 1, 0  # the next pass is a fresh epoch
        return iter(mine)


class ImageDataModule(L.LightningDataModule):
    """Train / val / test loaders of a named dataset (see data/registry.py)."""

    def __init__(self, name: str = "fashion_mnist", image_size: int = 32, channels: int = 1, batch_size: int = 64,
                 eval_batch_size: int | None = None, num_workers: int = 0, val_split: str = "test",
                 test_split: str = "test", seed: int = 0, root: str | None = None, download: bool = False,
                 strict: bool = False, num_classes: int | None = None, size: int | None = None,
                 holdout: float | None = None):
        super().__init__()
        self.name, self.image_size, self.channels = name, image_size, channels
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.seed = num_workers, seed
        self.val_split, self.test_split = val_split, test_split
        self.kwargs = {k: v for k, v in dict(root=root, download=download, strict=strict, channels=channels,
                                             num_classes=num_classes, size=size, holdout=holdout).items()
                       if v is not None}
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    # -- datasets -------------------------------------------------------------------------------
    def split(self, split: str) -> Dataset:
        ds = load_split(self.name, split, self.image_size, **self.kwargs)
        image = ds[0][0]
        if image.shape[0] != self.channels or image.shape[-1] != self.image_size:
            raise ValueError(f"data={self.name} gives images of shape {tuple(image.shape)}, but the config asks for "
                             f"{self.channels}x{self.image_size}x{self.image_size}; set data.channels / "
                             "data.image_size to match")
        return ds

    @property
    def num_classes(self) -> int:
        ds = self.train_set or self.split("train")
        return int(getattr(ds, "num_classes", 1))

    @property
    def class_names(self) -> list[str]:
        """The training split's class names (Fashion-MNIST's, CIFAR-10's, an image folder's subfolders), or []."""
        ds = self.train_set or self.split("train")
        return [str(c) for c in (getattr(ds, "classes", None) or [])]

    def setup(self, stage: str | None = None) -> None:
        world = self.trainer.world_size if self.trainer is not None else 1
        if self.batch_size % world:
            raise ValueError(f"data.batch_size={self.batch_size} is not divisible by the number of devices ({world})")
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self.split("train")
        if stage in (None, "fit", "validate") and self.val_set is None:
            self.val_set = self.split(self.val_split)
        if stage in (None, "test") and self.test_set is None:
            self.test_set = self.split(self.test_split)

    # -- loaders --------------------------------------------------------------------------------
    def _per_device(self, batch_size: int) -> int:
        return batch_size // (self.trainer.world_size if self.trainer is not None else 1)

    def train_dataloader(self) -> DataLoader:
        bs = self._per_device(self.batch_size)
        rank, world, seen = 0, 1, 0
        if self.trainer is not None:
            rank, world = self.trainer.global_rank, self.trainer.world_size
            seen = int(getattr(self.trainer.lightning_module, "batches_seen", 0))
        per_rank = len(self.train_set) // world
        batches_per_epoch = per_rank // bs
        if batches_per_epoch == 0:
            raise ValueError(f"the training split has {len(self.train_set)} images, fewer than one batch of {bs} per "
                             "device; lower data.batch_size")
        epoch, done = divmod(seen, batches_per_epoch)
        sampler = ResumableSampler(len(self.train_set), self.seed, rank, world, epoch, done * bs)
        return DataLoader(self.train_set, batch_size=bs, sampler=sampler, drop_last=True,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def _eval_loader(self, ds: Dataset) -> DataLoader:
        sampler = None
        if self.trainer is not None and self.trainer.world_size > 1:  # Lightning's own sampler swap is off
            from torch.utils.data.distributed import DistributedSampler

            sampler = DistributedSampler(ds, self.trainer.world_size, self.trainer.global_rank, shuffle=False)
        return DataLoader(ds, batch_size=self._per_device(self.eval_batch_size), shuffle=False, sampler=sampler,
                          num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set)
