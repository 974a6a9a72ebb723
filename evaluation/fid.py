"""FID with the standard Inception network (TF 2015-12-05), offline, on stock torchmetrics.

Images are float in [-1, 1], (B, C, H, W) with C = 1 or 3. They are quantized to uint8 exactly as
torchvision's `save_image(..., normalize=True, value_range=(-1, 1))` writes a PNG, so the FID of
tensors and of the PNGs saved from them agree. Gray images are repeated to 3 channels.

The network resizes every image to 299x299 inside torchmetrics. `tf1_resize=True` (the default)
uses torch-fidelity's TF1-compatible bilinear resize, as the TF reference code and torch-fidelity
do; `tf1_resize=False` uses torchmetrics' own default (antialiased bilinear). The two differ by
about 1% in FID, so `protocol_label` names the one used; numbers are comparable only with equal
labels.

Reference statistics of a dataset split are computed once and cached as .safetensors beside the
converted weights (see `evaluation.inception.cache_dir`).

CLI:
    python -m evaluation.fid <real> <fake> [--num-images N] [--batch-size B] [--json] [--strict]
where <real> and <fake> are each an image folder (PNG/JPG, searched recursively) or a dataset
split `name:split`, e.g. `fashion_mnist:test`. Unreadable files (truncated, empty) are skipped with a
warning naming each, and the label says how many images were scored; --strict makes them an error.
"""

import argparse
import json
import os
import re
import sys
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from scipy.linalg.lapack import dpstrf
from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3

from evaluation.inception import WEIGHTS_FILE, cache_dir, inception_weights_path
from utils.io import atomic_replace
from utils.progress import progress

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
NUM_FEATURES = 2048


class FIDInputError(ValueError):
    """A bad real/fake argument: a missing folder, a folder without images, an unknown dataset."""


class Statistics(NamedTuple):
    """Mean (D,) and covariance (D, D) of Inception features, float64, over n images."""

    mu: torch.Tensor
    sigma: torch.Tensor
    n: int


# --------------------------------------------------------------------------------------------
# Images and the network
# --------------------------------------------------------------------------------------------


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 1|3, H, W) float in [-1, 1] (or uint8, passed through) -> uint8 (B, 3, H, W), as a saved PNG."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (B, 1|3, H, W), got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        x = (images.float().clamp(-1, 1) + 1) / 2  # [0, 1]
        images = (x * 255 + 0.5).clamp(0, 255).to(torch.uint8)  # save_image's rounding
    return images.repeat(1, 3, 1, 1) if images.shape[1] == 1 else images  # (B, 3, H, W)


def fid_inception(tf1_resize: bool = True, device: torch.device | str | None = None) -> torch.nn.Module:
    """torchmetrics' FID extractor: uint8 (B, 3, H, W) -> float32 (B, 2048), resized to 299 inside."""
    net = NoTrainInceptionV3(
        name="inception-v3-compat",
        features_list=[str(NUM_FEATURES)],
        feature_extractor_weights_path=inception_weights_path(),
        antialias=not tf1_resize,
    )
    # channels_last: oneDNN's convolutions run about 2x faster on CPU; features move by ~1e-6
    return net.to(device=device, memory_format=torch.channels_last)


def _batches(images: Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Regroup single images (C, H, W) or batches (B, C, H, W) into uint8 (b, 3, H, W), b <= batch_size.

    A batch ends early where the image size changes, so folders of mixed sizes work.
    """
    pending: list[torch.Tensor] = []
    for item in images:
        item = to_uint8(item.unsqueeze(0) if item.dim() == 3 else item)  # (B, 3, H, W)
        for image in item:
            if pending and (len(pending) == batch_size or image.shape != pending[0].shape):
                yield torch.stack(pending)
                pending = []
            pending.append(image)
    if pending:
        yield torch.stack(pending)


@torch.no_grad()
def compute_statistics(
    images: Iterable[torch.Tensor], batch_size: int = 50, net: torch.nn.Module | None = None,
    desc: str = "Inception features",
) -> Statistics:
    """Inception feature mean and covariance (float64) of images in [-1, 1] or uint8.

    `images` yields single images (C, H, W) or batches (B, C, H, W); the sums follow torchmetrics'
    FrechetInceptionDistance, so its FID and ours agree.
    """
    net = net if net is not None else fid_inception()
    device = next(net.parameters()).device
    total = torch.zeros(NUM_FEATURES, dtype=torch.float64)
    outer = torch.zeros(NUM_FEATURES, NUM_FEATURES, dtype=torch.float64)
    n = 0
    for batch in progress(_batches(images, batch_size), desc):
        features = net(batch.to(device)).double().cpu()  # (b, 2048)
        total += features.sum(dim=0)
        outer += features.T @ features  # (2048, 2048)
        n += features.shape[0]
    return _moments(total, outer, n)


def _moments(total: torch.Tensor, outer: torch.Tensor, n: int) -> Statistics:
    """Mean and unbiased covariance from the feature sum (D,) and the sum of outer products (D, D)."""
    if n < 2:
        raise ValueError(f"FID needs at least 2 images on each side, got {n}")
    mu = total.double().cpu() / n
    sigma = (outer.double().cpu() - n * torch.outer(mu, mu)) / (n - 1)
    return Statistics(mu, sigma, n)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), in float64.

    Tr((sigma1 sigma2)^(1/2)) is the sum of the square roots of the eigenvalues of sigma1 sigma2
    (torchmetrics' formula). We get them from a symmetric matrix: a pivoted Cholesky factor
    P^T sigma1 P = L L^T of rank r gives L^T P^T sigma2 P L (r, r), with the same nonzero
    eigenvalues. This equals scipy's sqrtm and torchmetrics' eigvals to about 1e-7 relative, is
    exact for identical sets (eigvals of a rank-deficient product adds noise), and takes well under
    a second for r < 2048 (fewer images than features), against ~5-60 s for eigvals on 2 CPU cores.
    """
    mu1, sigma1, mu2, sigma2 = (
        torch.as_tensor(t, dtype=torch.float64).cpu().numpy() for t in (mu1, sigma1, mu2, sigma2)
    )
    factor, pivots, rank, info = dpstrf(sigma1, lower=1)
    if info < 0:
        raise ValueError(f"pivoted Cholesky failed (LAPACK dpstrf info={info})")
    factor = np.tril(factor[:, :rank])  # (D, r); entries past the rank are not part of L
    order = pivots - 1  # LAPACK pivots are 1-based
    inner = factor.T @ sigma2[np.ix_(order, order)] @ factor  # (r, r), symmetric PSD
    sqrt_trace = np.sqrt(np.clip(np.linalg.eigvalsh(inner), 0, None)).sum()
    return float(np.square(mu1 - mu2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * sqrt_trace)


def fid_between(
    real: torch.Tensor, fake: torch.Tensor, batch_size: int = 50, net: torch.nn.Module | None = None
) -> float:
    """FID between two image tensors (B, 1|3, H, W) in [-1, 1], e.g. test images and reconstructions (rFID)."""
    net = net if net is not None else fid_inception()
    real_stats = compute_statistics([real], batch_size, net)
    fake_stats = compute_statistics([fake], batch_size, net)
    return frechet_distance(real_stats.mu, real_stats.sigma, fake_stats.mu, fake_stats.sigma)


class FID:
    """Stock torchmetrics FrechetInceptionDistance on images in [-1, 1], with cached real statistics.

    Its states are torchmetrics states (summed across ranks), so update on each rank's samples and
    compute once; `set_real_statistics` puts the real statistics on rank 0 only. `compute` uses
    `frechet_distance` on those states: torchmetrics' own compute (a general 2048x2048 eigvals)
    gives the same value but takes from seconds to minutes on a busy CPU.
    """

    def __init__(self, tf1_resize: bool = True, device: torch.device | str | None = None):
        self.tf1_resize = tf1_resize
        self.metric = FrechetInceptionDistance(
            feature=NUM_FEATURES,
            normalize=False,  # we pass uint8, rounded like a saved PNG
            reset_real_features=False,
            feature_extractor_weights_path=inception_weights_path(),
            antialias=not tf1_resize,
        ).to(device)

    def update(self, images: torch.Tensor, real: bool) -> None:
        """Add images (B, 1|3, H, W) in [-1, 1] to the real or the generated set."""
        self.metric.update(to_uint8(images).to(self.metric.device), real=real)

    def set_real_statistics(self, mu: torch.Tensor, sigma: torch.Tensor, n: int) -> None:
        """Use cached real statistics (e.g. `reference_statistics`) instead of real images."""
        m = self.metric
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
            n = 0  # compute() sums the states over ranks: only rank 0 holds the real statistics
        mu = mu.to(m.device, torch.float64)
        m.real_features_sum.copy_(mu * n)
        m.real_features_cov_sum.copy_(sigma.to(m.device, torch.float64) * max(n - 1, 0) + n * torch.outer(mu, mu))
        m.real_features_num_samples.fill_(n)

    def compute(self) -> float:
        """The FID between the real and the generated images seen so far, over all ranks."""
        m = self.metric
        with m.sync_context():  # sums the states over ranks; a no-op in a single process
            real = _moments(m.real_features_sum, m.real_features_cov_sum, int(m.real_features_num_samples))
            fake = _moments(m.fake_features_sum, m.fake_features_cov_sum, int(m.fake_features_num_samples))
        return frechet_distance(real.mu, real.sigma, fake.mu, fake.sigma)

    def reset(self) -> None:
        """Forget the generated images; the real statistics stay."""
        self.metric.reset()


# --------------------------------------------------------------------------------------------
# Protocol labels
# --------------------------------------------------------------------------------------------


def _count(n: int) -> str:
    """1000 -> '1k', 1500 -> '1.5k', 24 -> '24'."""
    return f"{n / 1000:g}k" if n >= 1000 else str(n)


def protocol_label(
    num_fake: int,
    real: str,
    image_size: int | tuple[int, int] | None = None,
    tf1_resize: bool = True,
    num_real: int | None = None,
) -> str:
    """Label for an FID number, e.g.
    'FID-1k vs fashion_mnist:test (10k), standard Inception (TF 2015-12-05), torchmetrics, TF1 resize, 32x32'.
    """
    real = f"{real} ({_count(num_real)})" if num_real is not None else real
    resize = "TF1 resize" if tf1_resize else "antialiased resize"
    label = f"FID-{_count(num_fake)} vs {real}, standard Inception (TF 2015-12-05), torchmetrics, {resize}"
    if image_size is not None:
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        label += f", {h}x{w}"
    return label


# --------------------------------------------------------------------------------------------
# Image folders and dataset splits
# --------------------------------------------------------------------------------------------

_SPEC_HELP = "pass an image folder (PNG/JPG, searched recursively) or a dataset split like fashion_mnist:test"


def list_images(folder: str) -> list[str]:
    """Sorted PNG/JPG files under `folder`, recursively; FIDInputError when there are none."""
    if not os.path.isdir(folder):
        problem = "is a file, not a folder" if os.path.exists(folder) else "does not exist"
        raise FIDInputError(f"image folder '{folder}' {problem}; {_SPEC_HELP}")
    files = sorted(
        os.path.join(root, name)
        for root, _, names in os.walk(folder)
        for name in names
        if name.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not files:
        raise FIDInputError(f"no PNG/JPG images under '{folder}'; save samples there first, or {_SPEC_HELP}")
    return files


def _read_images(files: list[str]) -> Iterator[torch.Tensor]:
    """uint8 (3, H, W) per file, converted with its true range (16-bit, float, CMYK, palette: `to_8bit`)."""
    from data.transforms import to_8bit

    for path in files:
        with Image.open(path) as image:
            yield torch.from_numpy(np.array(to_8bit(image, 3, path))).permute(2, 0, 1)  # (3, H, W)


def readable_folder(folder: str, num_images: int | None = None, strict: bool = False) -> tuple[list[str], list[str]]:
    """(the first `num_images` readable images of a folder, the unreadable ones skipped on the way): each skipped
    file is named in a warning, as training does; strict: an FIDInputError naming the first unreadable file."""
    from data.image_folder import CorruptImageError, readable_images
    from data.transforms import UnsupportedImageError

    try:
        good, bad = readable_images(list_images(folder), strict, 3, f"FID images in '{folder}'", num_images,
                                    strict_hint="drop --strict to skip unreadable images")
    except (CorruptImageError, UnsupportedImageError) as e:
        raise FIDInputError(str(e)) from None
    if not good:
        raise FIDInputError(f"no readable images under '{folder}' ({len(bad)} unreadable); {_SPEC_HELP}")
    return good, bad


def load_split(name: str, split: str, image_size: int | None = None,
               settings: dict | None = None) -> torch.utils.data.Dataset:
    """`data.registry.load_split` (settings: its kwargs, e.g. an image folder's root), with an FIDInputError naming
    an unknown dataset or split."""
    try:
        from data.registry import load_split as registry_load_split
    except ModuleNotFoundError as e:
        if e.name not in ("data", "data.registry"):
            raise
        raise FIDInputError(f"'{name}:{split}' needs data/registry.py, which is missing; pass an image folder") from e
    try:
        return registry_load_split(name, split, image_size=image_size, **(settings or {}))
    except (KeyError, ValueError) as e:
        raise FIDInputError(
            f"unknown dataset or split '{name}:{split}' ({e}); use a name and split from data/registry.py, "
            f"e.g. fashion_mnist:test, or an image folder"
        ) from e


def reference_statistics_path(
    name: str, split: str, image_size: int | None, num_images: int | None, tf1_resize: bool = True,
    settings: dict | None = None,
) -> str:
    """Cache file of a split's statistics, keyed by dataset (+ its content settings: an image folder's root),
    split, size, count, resize and weights."""
    from data.registry import data_key

    content = data_key(name, settings)
    parts = [f"{name}-{content}" if content else name, split, f"{image_size}px" if image_size else "native",
             str(num_images or "all"), "tf1" if tf1_resize else "antialias", os.path.splitext(WEIGHTS_FILE)[0]]
    key = "_".join(re.sub(r"[^A-Za-z0-9.-]+", "-", str(p)) for p in parts)
    return os.path.join(cache_dir(), f"fid-stats_{key}.safetensors")


def _save_statistics(stats: Statistics, path: str, image_hw: tuple[int, int]) -> None:
    """Write mu, sigma, n to .safetensors atomically (temporary file, then rename)."""
    tensors = {"mu": stats.mu.contiguous(), "sigma": stats.sigma.contiguous(), "n": torch.tensor(stats.n)}
    meta = {"height": str(image_hw[0]), "width": str(image_hw[1])}
    atomic_replace(lambda tmp: save_file(tensors, tmp, metadata=meta), path)


def _load_statistics(path: str) -> tuple[Statistics, tuple[int, int]]:
    """Statistics and the (H, W) of the images they came from, read from .safetensors."""
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        stats = Statistics(f.get_tensor("mu"), f.get_tensor("sigma"), int(f.get_tensor("n")))
    return stats, (int(meta["height"]), int(meta["width"]))


def _split_statistics(
    name: str, split: str, image_size: int | None, num_images: int | None, batch_size: int,
    tf1_resize: bool, net: torch.nn.Module | None, settings: dict | None = None,
) -> tuple[Statistics, tuple[int, int]]:
    """Cached statistics of the first `num_images` images of a split, and their (H, W)."""
    path = reference_statistics_path(name, split, image_size, num_images, tf1_resize, settings)
    if os.path.isfile(path):
        return _load_statistics(path)
    dataset = load_split(name, split, image_size, settings)
    n = len(dataset) if num_images is None else min(num_images, len(dataset))
    stats = compute_statistics((dataset[i][0] for i in range(n)), batch_size, net or fid_inception(tf1_resize),
                               desc=f"reference statistics of {name}:{split} ({n} images)")
    image_hw = tuple(dataset[0][0].shape[-2:])
    _save_statistics(stats, path, image_hw)
    return stats, image_hw


def reference_statistics(
    name: str,
    split: str,
    image_size: int | None = None,
    num_images: int | None = None,
    batch_size: int = 50,
    tf1_resize: bool = True,
    net: torch.nn.Module | None = None,
    settings: dict | None = None,
) -> Statistics:
    """Statistics of the first `num_images` images (all when None) of a dataset split, cached on disk.

    settings: the dataset's content settings as a run config records them (``data.settings``, e.g. an image
    folder's root); they select the images and key the cache."""
    return _split_statistics(name, split, image_size, num_images, batch_size, tf1_resize, net, settings)[0]


def reconstruction_fid(fake: torch.Tensor, name: str, split: str, image_size: int | None,
                       real: torch.Tensor | None = None, net: torch.nn.Module | None = None,
                       settings: dict | None = None) -> float:
    """rFID: reconstructions (N, C, H, W) of the first N images of a split against those images.

    The real side's statistics come from the on-disk cache of that split (``reference_statistics``); pass
    ``real`` instead when the reconstructed images are not the split's first N (e.g. a DDP shard).
    """
    net = net or fid_inception(device=fake.device)
    if real is None:
        ref = reference_statistics(name, split, image_size, fake.shape[0], net=net, settings=settings)
    else:
        ref = compute_statistics([real], net=net)
    gen = compute_statistics([fake], net=net)
    return frechet_distance(ref.mu, ref.sigma, gen.mu, gen.sigma)


def _check_spec(spec: str, num_images: int | None, image_size: int | None, tf1_resize: bool,
                strict: bool = False) -> tuple:
    """('folder', path, readable files, skipped files) or ('split', name, split), after checking the images exist."""
    if os.path.exists(spec) or os.sep in spec or ":" not in spec:
        return ("folder", spec, *readable_folder(spec, num_images, strict))
    name, split = spec.rsplit(":", 1)
    if not os.path.isfile(reference_statistics_path(name, split, image_size, num_images, tf1_resize)):
        load_split(name, split, image_size)  # fails here, before any Inception work, if unknown
    return ("split", name, split)


def _statistics_of(
    checked: tuple, num_images: int | None, batch_size: int, image_size: int | None,
    tf1_resize: bool, net: torch.nn.Module,
) -> tuple[Statistics, tuple[int, int]]:
    """Statistics and image (H, W) of a checked folder or split."""
    if checked[0] == "split":
        return _split_statistics(checked[1], checked[2], image_size, num_images, batch_size, tf1_resize, net)
    files = checked[2]
    with Image.open(files[0]) as first:
        image_hw = (first.height, first.width)
    return compute_statistics(_read_images(files), batch_size, net, desc=f"Inception features of {checked[1]}"), \
        image_hw


def fid_from_folders_or_splits(
    real: str,
    fake: str,
    num_images: int | None = None,
    *,
    batch_size: int = 50,
    image_size: int | None = None,
    tf1_resize: bool = True,
    device: torch.device | str | None = None,
    strict: bool = False,
) -> dict:
    """FID between two image folders or dataset splits (`name:split`), with its protocol label.

    Each side uses its first `num_images` readable images (sorted file names, or split order); all when None.
    Unreadable files are skipped with a warning naming each, and counted in the label (strict: an error).
    `image_size` is passed to `data.registry.load_split` for dataset splits.
    """
    if num_images is not None and num_images < 2:
        raise FIDInputError(f"--num-images must be at least 2, got {num_images}")
    checked_real = _check_spec(real, num_images, image_size, tf1_resize, strict)
    checked_fake = _check_spec(fake, num_images, image_size, tf1_resize, strict)
    net = fid_inception(tf1_resize, device)
    real_stats, real_hw = _statistics_of(checked_real, num_images, batch_size, image_size, tf1_resize, net)
    fake_stats, fake_hw = _statistics_of(checked_fake, num_images, batch_size, image_size, tf1_resize, net)
    label = protocol_label(fake_stats.n, real, fake_hw, tf1_resize, real_stats.n)
    if real_hw != fake_hw:
        label += f" (real {real_hw[0]}x{real_hw[1]})"
    skipped = {side: len(c[3]) for side, c in (("real", checked_real), ("fake", checked_fake)) if c[0] == "folder"}
    if any(skipped.values()):
        label += ", scored " + " and ".join(f"{n} readable {side} images ({skipped[side]} unreadable skipped)"
                                            for side, n in (("real", real_stats.n), ("fake", fake_stats.n))
                                            if skipped.get(side))
    return {
        "fid": frechet_distance(real_stats.mu, real_stats.sigma, fake_stats.mu, fake_stats.sigma),
        "protocol": label,
        "num_real": real_stats.n,
        "num_fake": fake_stats.n,
        "skipped": {side: c[3] for side, c in (("real", checked_real), ("fake", checked_fake)) if c[0] == "folder"},
    }


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Print the FID between <real> and <fake>, and its protocol label; exit code 2 on bad input."""
    parser = argparse.ArgumentParser(prog="python -m evaluation.fid", description=__doc__.split("\n")[0])
    parser.add_argument("real", help="image folder (PNG/JPG, recursive) or dataset split, e.g. fashion_mnist:test")
    parser.add_argument("fake", help="image folder (PNG/JPG, recursive) or dataset split")
    parser.add_argument("--num-images", type=int, default=None, help="first N images of each side (default: all)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--image-size", type=int, default=None, help="image size for dataset splits")
    parser.add_argument("--antialias", action="store_true", help="torchmetrics' antialiased resize, not TF1's")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--strict", action="store_true",
                        help="fail on the first unreadable image instead of skipping it with a warning")
    args = parser.parse_args(argv)
    try:
        result = fid_from_folders_or_splits(
            args.real, args.fake, args.num_images, batch_size=args.batch_size, image_size=args.image_size,
            tf1_resize=not args.antialias, device=args.device, strict=args.strict,
        )
    except (FIDInputError, FileNotFoundError) as e:  # bad arguments, or a dataset whose files are missing
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else f"FID {result['fid']:.4f}  [{result['protocol']}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
