"""Token cache: a dataset split encoded once by a tokenizer run, so generator training reads codes, not pixels.

A cache file is ``<data_dir>/token_cache/<dataset>/<split>_<size>px_<data key>_<tokenizer hash>.safetensors``
holding ``codes`` and ``labels`` (N,) plus string metadata. The tokenizer hash is the sha256 of the run's
model.safetensors and config.yaml (``utils.runs.run_hash``), so a retrained or edited tokenizer gets a new file (old ones stay until
deleted). Layouts, by what the generator reads:

- ``raster`` (GPT, single-scale discrete tokenizers): codes (N, h*w) int32 in raster order.
- ``multiscale`` (VAR, tokenizer=msvq): the per-scale maps flattened and concatenated, (N, L) int32.
- ``latent`` (FlowAR, tokenizer=kl): latents (N, C, h, w) float32 times ``scale_factor``. The factor is the
  quantizer's own when it is not 1, else 1/std of the whole train split's latents; other splits reuse the
  train split's factor. It is stored in the metadata.

Building is batched and resumable: chunks of ``chunk_size`` images are written atomically into
``<file>.partial/`` and skipped on a restart; once all exist they are joined into the final file (atomic
rename) and the folder is removed. A file lock keeps concurrent ranks from building the same file twice.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset, Subset

from data.datamodule import ImageDataModule
from data.registry import data_key
from utils.io import atomic_replace
from utils.progress import progress
from utils.runs import Run

log = logging.getLogger("tokar")

LAYOUTS = ("raster", "multiscale", "latent")


#################################################################################
#                              Tokenizer runs                                   #
#################################################################################

def layout_of(quantizer) -> str:
    """The cache layout a tokenizer's quantizer produces."""
    if getattr(quantizer, "continuous", False):
        return "latent"
    return "multiscale" if getattr(quantizer, "multiscale", False) else "raster"


#################################################################################
#                                Encoding                                       #
#################################################################################

@torch.no_grad()
def encode_batch(tokenizer, images: torch.Tensor, layout: str) -> torch.Tensor:
    """images (B, C, H, W) -> raster (B, h*w) / multiscale (B, L) int32, or latent (B, Cq, h, w) float32."""
    out = tokenizer.encode(images)
    if layout == "latent":
        return out.float().cpu()
    if layout == "multiscale":
        return torch.cat([m.reshape(m.shape[0], -1) for m in out], dim=1).to(torch.int32).cpu()  # (B, L)
    return out.reshape(out.shape[0], -1).to(torch.int32).cpu()  # (B, h*w)


def cache_path(root: str | Path, dataset: str, split: str, image_size: int, tok_hash: str,
               data_kwargs: dict | None = None) -> Path:
    """Where a split's codes live: keyed by dataset (+ its content settings, ``data.registry.data_key``), split,
    image size and tokenizer hash."""
    key = data_key(dataset, data_kwargs) or "default"
    return Path(root) / dataset / f"{split}_{image_size}px_{key}_{tok_hash[:16]}.safetensors"


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive flock on path (other ranks building the same cache wait here)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_cache(tokenizer, dataset: Dataset, path: str | Path, layout: str, metadata: dict | None = None,
                batch_size: int = 256, chunk_size: int = 4096, device: torch.device | str = "cpu",
                num_workers: int = 0, scale_factor: float | None = None) -> Path:
    """Encode ``dataset`` into the cache file ``path`` (see the module docstring); returns ``path``.

    An existing file is reused as is. ``scale_factor`` (latent layout): None fits it (or takes the quantizer's
    when that is not 1); a number is applied as given (val/test splits reuse the train split's).
    """
    path = Path(path)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown token layout {layout!r}; one of {LAYOUTS}")
    if path.is_file():
        return path
    with _file_lock(path.with_name(f".{path.name}.lock")):
        if path.is_file():  # another rank built it while we waited
            return path
        partial = path.with_name(path.name + ".partial")
        n = len(dataset)
        plan = {"n": n, "chunk_size": chunk_size, "layout": layout}
        plan_file = partial / "plan.json"
        if partial.is_dir() and (not plan_file.is_file() or json.loads(plan_file.read_text()) != plan):
            shutil.rmtree(partial)  # another plan (chunk size, dataset length): start over
        partial.mkdir(parents=True, exist_ok=True)
        atomic_replace(lambda tmp: Path(tmp).write_text(json.dumps(plan)), plan_file)
        num_chunks = max(1, -(-n // chunk_size))
        tokenizer = tokenizer.to(device).eval()
        for c in range(num_chunks):
            chunk_file = partial / f"chunk_{c:05d}.safetensors"
            if chunk_file.is_file():
                continue  # done before a restart
            lo, hi = c * chunk_size, min(n, (c + 1) * chunk_size)
            loader = DataLoader(Subset(dataset, range(lo, hi)), batch_size=batch_size, num_workers=num_workers,
                                generator=torch.Generator())  # no draw from the global RNG
            codes, labels = [], []
            for images, y in progress(loader, f"encoding {path.parent.name}:{path.name.split('_')[0]} "
                                               f"(chunk {c + 1}/{num_chunks})"):
                codes.append(encode_batch(tokenizer, images.to(device), layout))
                labels.append(torch.as_tensor(y, dtype=torch.int64))
            tensors = {"codes": torch.cat(codes).contiguous(), "labels": torch.cat(labels).contiguous()}
            atomic_replace(lambda tmp: save_file(tensors, tmp), chunk_file)
            log.info("token cache %s: chunk %d/%d (%d/%d images)", path.name, c + 1, num_chunks, hi, n)
        # join: all chunks exist
        parts = [load_file(str(partial / f"chunk_{c:05d}.safetensors")) for c in range(num_chunks)]
        codes = torch.cat([p["codes"] for p in parts])  # (N, ...)
        labels = torch.cat([p["labels"] for p in parts])  # (N,)
        meta = {k: str(v) for k, v in (metadata or {}).items()}
        meta.update(layout=layout, num_images=str(n), code_shape=json.dumps(list(codes.shape[1:])))
        if layout == "latent":
            if scale_factor is None:
                own = float(getattr(tokenizer.quantizer, "scale_factor", torch.tensor(1.0)))
                scale_factor = own if abs(own - 1.0) > 1e-12 else float(1.0 / codes.flatten().std())
            codes = codes * scale_factor
            meta["scale_factor"] = repr(float(scale_factor))
        atomic_replace(lambda tmp: save_file({"codes": codes.contiguous(), "labels": labels}, tmp, metadata=meta), path)
        shutil.rmtree(partial, ignore_errors=True)
        log.info("token cache written: %s (%s codes %s)", path, n, tuple(codes.shape[1:]))
    return path


def read_metadata(path: str | Path) -> dict:
    """The string metadata of a cache file (layout, scale_factor, tokenizer_hash, num_classes, ...)."""
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def prepare_token_caches(run: Run, images: ImageDataModule, splits, cache_root: str | Path,
                         batch_size: int = 256, chunk_size: int = 4096, device: torch.device | str = "cpu") -> dict:
    """Build (or find) the cache of each split -> {split: path}. The train split comes first (latent scale)."""
    layout = layout_of(run.model.quantizer)
    ordered = ["train"] + [s for s in dict.fromkeys(splits) if s != "train"]
    paths, scale_factor = {}, None
    for split in ordered:
        path = cache_path(cache_root, images.name, split, images.image_size, run.hash, images.kwargs)
        if not path.is_file():
            dataset = images.split(split)
            meta = {"dataset": images.name, "split": split, "image_size": images.image_size,
                    "tokenizer_run": run.run_dir, "tokenizer_hash": run.hash,
                    "num_classes": int(getattr(dataset, "num_classes", 1)),
                    "token_shape": json.dumps(run.model.token_shape(images.image_size))}
            log.info("encoding %s:%s with the tokenizer %s into %s", images.name, split, run.run_dir, path)
            build_cache(run.model, dataset, path, layout, meta, batch_size, chunk_size, device,
                        images.num_workers, scale_factor)
        if layout == "latent" and split == "train":
            scale_factor = float(read_metadata(path)["scale_factor"])
        paths[split] = path
    return paths


#################################################################################
#                           Dataset and DataModule                              #
#################################################################################

class TokenDataset(Dataset):
    """(codes, label) pairs of one cache file, held in memory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        tensors = load_file(str(self.path))
        self.codes, self.labels = tensors["codes"], tensors["labels"]  # (N, ...), (N,)
        self.meta = read_metadata(self.path)
        self.num_classes = int(self.meta.get("num_classes", 1))

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, i: int):
        return self.codes[i], self.labels[i]


class TokenDataModule(ImageDataModule):
    """ImageDataModule's resumable loaders over token caches ({split: cache file})."""

    def __init__(self, caches: dict, batch_size: int = 64, eval_batch_size: int | None = None, num_workers: int = 0,
                 val_split: str = "test", test_split: str = "test", seed: int = 0):
        super().__init__(name="token_cache", batch_size=batch_size, eval_batch_size=eval_batch_size,
                         num_workers=num_workers, val_split=val_split, test_split=test_split, seed=seed)
        self.caches = {k: str(v) for k, v in caches.items()}

    def train_dataloader(self) -> DataLoader:
        return self._own_generator(super().train_dataloader())

    def _eval_loader(self, ds: Dataset) -> DataLoader:
        return self._own_generator(super()._eval_loader(ds))

    def _own_generator(self, loader: DataLoader) -> DataLoader:
        """Each loader iterator draws its base seed from loader.generator, else from the global RNG, which label
        dropout and flow noise use: a private generator keeps a resumed run's global RNG stream exact."""
        loader.generator = torch.Generator().manual_seed(self.seed)
        return loader

    def split(self, split: str) -> Dataset:
        if split not in self.caches:
            raise ValueError(f"no token cache for split {split!r}; have {sorted(self.caches)}")
        return TokenDataset(self.caches[split])
