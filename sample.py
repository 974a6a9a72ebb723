"""Sample from a trained tokar run: python sample.py ckpt=<run folder | .ckpt | model.safetensors>

With a tokenizer run: reconstruct `num_images` images of the dataset's test split, write a grid
of originals above their reconstructions, print PSNR and SSIM, and write metrics.json.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from utils.checkpoint import CheckpointError, atomic_replace, resolve_checkpoint
from utils.hydra import register_resolvers

log = logging.getLogger("tokar")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA device is available; use device=cpu")
    return torch.device(name)


def load_weights(model: torch.nn.Module, state: dict, path) -> None:
    """Strict load, with an error that names what does not match."""
    result = model.load_state_dict(state, strict=False)
    shapes = [k for k, v in state.items() if k in model.state_dict() and model.state_dict()[k].shape != v.shape]
    if result.missing_keys or result.unexpected_keys or shapes:
        raise CheckpointError(f"weights in {path} do not match the config beside them: missing "
                              f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")


def load_tokenizer(ckpt: str, device: torch.device | str = "cpu"):
    """(Tokenizer in eval mode, run config) from a tokenizer run folder, .ckpt or model.safetensors."""
    from tokenizers.module import build_tokenizer
    from utils.checkpoint import expect_kind

    config, state, _ = resolve_checkpoint(ckpt)
    expect_kind(config, "tokenizer", ckpt)
    model = build_tokenizer(config["tokenizer"], config["data"]["channels"])
    try:
        load_weights(model, state, ckpt)
    except RuntimeError as e:
        raise CheckpointError(f"weights in {ckpt} do not fit the tokenizer config beside them: {e}") from e
    return model.to(device).eval(), config


@torch.no_grad()
def reconstruct(cfg: DictConfig, out: Path) -> dict:
    from data.registry import load_split
    from evaluation.reconstruction import PSNR, SSIM
    from tokenizers.module import save_reconstruction_grid

    device = pick_device(cfg.device)
    model, config = load_tokenizer(cfg.ckpt, device)
    data = config["data"]
    ds = load_split(data["name"], cfg.split, data["image_size"])
    n = min(int(cfg.num_images), len(ds))
    psnr, ssim = PSNR().to(device), SSIM().to(device)
    grid = None
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(n)), batch_size=cfg.batch_size)
    for images, _ in loader:
        images = images.to(device)
        recon = model.decode(model.encode(images)).clamp(-1, 1)  # (B, C, H, W) through the discrete codes
        psnr.update(recon, images)
        ssim.update(recon, images)
        if grid is None:
            grid = save_reconstruction_grid(images[: cfg.grid_images], recon[: cfg.grid_images],
                                            out / "reconstructions.png")
    result = {"kind": "tokenizer", "ckpt": str(cfg.ckpt), "psnr": float(psnr.compute()),
              "ssim": float(ssim.compute()), "num_images": n, "grid": str(grid),
              "protocol": f"per-image PSNR/SSIM on uint8, first {n} images of {data['name']}:{cfg.split}"}
    print(f"grid: {grid}\nPSNR {result['psnr']:.2f} dB, SSIM {result['ssim']:.4f} over {n} {data['name']}:{cfg.split} "
          "images", flush=True)
    return result


def run(cfg: DictConfig, out: Path) -> dict:
    config, _, _ = resolve_checkpoint(cfg.ckpt)
    kind = config.get("kind")
    if kind == "tokenizer":
        result = reconstruct(cfg, out)
    else:
        raise CheckpointError(f"{cfg.ckpt} is a {kind} checkpoint; sample.py handles: tokenizer")
    atomic_replace(lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2)), out / "metrics.json")
    return result


@hydra.main(version_base="1.3", config_path="configs", config_name="sample")
def main(cfg: DictConfig) -> None:
    register_resolvers()
    if OmegaConf.is_missing(cfg, "ckpt"):
        raise SystemExit("sample.py needs a checkpoint: python sample.py ckpt=<run folder (outputs/<task>/<time>), "
                         ".ckpt or model.safetensors>")
    torch.manual_seed(cfg.seed)
    run(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
