"""Where a VQ tokenizer's latents lie relative to its codebook: a diagnosis of low codebook usage.

    python benchmarks/codebook_geometry.py outputs/tokenizer/<run> [more runs] [--images 2000]

For each `vq` / `vq_l2` / `vq_ema` run (EMA weights), on the first N test images of its dataset:
- usage: distinct nearest codes / K;
- usage if the latents were isotropic: the same lookup for as many random vectors (uniform on the sphere for
  cosine lookup, else Gaussian with the latents' per-channel mean and std). High here but low above means
  the codebook is fine and the latents occupy only part of the space;
- the eigenvalues of the latents' covariance (after l2-normalisation for cosine lookup) and their
  participation ratio (sum ev)^2 / sum ev^2, the effective number of directions used;
- the best similarity to any latent of the used codes and of the dead ones (cosine, or -L2 distance).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@torch.no_grad()
def geometry(run: str, num_images: int = 2000, seed: int = 0) -> dict:
    from data.datamodule import ImageDataModule
    from tokenizers.vq import VQ
    from utils.runs import load_run

    loaded = load_run(run, "tokenizer")
    model, config = loaded.model, loaded.config
    q = model.quantizer
    if not isinstance(q, VQ):
        raise SystemExit(f"{run}: {type(q).__name__} is not a VQ codebook; this diagnosis is for tokenizer=vq*")
    data = config["data"]
    test = ImageDataModule(name=data["name"], image_size=data["image_size"], channels=data["channels"]).split("test")
    n = min(num_images, len(test))
    images = torch.stack([test[i][0] for i in range(n)])  # (N, C, H, W)
    z = torch.cat([q.project_in(model.quant_conv(model.encoder(images[i:i + 250]))) for i in range(0, n, 250)])
    flat = z.permute(0, 2, 3, 1).reshape(-1, q.codebook_dim)  # (N*h*w, d) as the lookup sees it
    if q.l2_norm:
        flat = F.normalize(flat, dim=-1)
    codes = q.codebook  # (K, d)

    def similarity(x):  # (M, d) -> (M, K), larger = nearer
        return x @ codes.t() if q.l2_norm else -torch.cdist(x, codes)

    sim = similarity(flat)
    used = torch.bincount(sim.argmax(1), minlength=q.codebook_size) > 0  # (K,)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(flat.shape, generator=g)
    iso = F.normalize(noise, dim=-1) if q.l2_norm else noise * flat.std(0) + flat.mean(0)
    iso_used = torch.bincount(similarity(iso).argmax(1), minlength=q.codebook_size) > 0
    ev = torch.linalg.eigvalsh(torch.cov(flat.t())).flip(0)  # descending
    best = sim.max(0).values  # (K,) each code's nearest latent
    return {"run": run, "lookup": "cosine" if q.l2_norm else "L2", "dim": q.codebook_dim, "K": q.codebook_size,
            "images": n, "usage": float(used.float().mean()), "usage_isotropic": float(iso_used.float().mean()),
            "participation_ratio": float(ev.sum() ** 2 / (ev ** 2).sum()), "eigenvalues": [float(e) for e in ev],
            "mean_norm": float(flat.mean(0).norm()), "best_used": float(best[used].mean()),
            "best_dead": float(best[~used].mean()) if (~used).any() else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--images", type=int, default=2000)
    args = parser.parse_args()
    print("| run | lookup | usage | usage if isotropic | participation ratio / d | covariance eigenvalues | "
          "|mean latent| | best sim: used / dead codes |")
    print("|---|---|---|---|---|---|---|---|")
    for run in args.runs:
        r = geometry(run, args.images)
        dead = "–" if r["best_dead"] is None else f"{r['best_dead']:.3f}"
        print(f"| {Path(run).name} | {r['lookup']} d={r['dim']} K={r['K']} | {100 * r['usage']:.1f}% | "
              f"{100 * r['usage_isotropic']:.1f}% | {r['participation_ratio']:.2f} / {r['dim']} | "
              f"{' '.join(f'{e:.3f}' for e in r['eigenvalues'][:8])} | {r['mean_norm']:.2f} | "
              f"{r['best_used']:.3f} / {dead} |")


if __name__ == "__main__":
    main()
