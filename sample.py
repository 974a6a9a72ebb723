"""Sample from a trained tokar run: python sample.py ckpt=<run folder | .ckpt | model.safetensors>

With a tokenizer run: reconstruct `num_images` images of the dataset's test split, write a grid
of originals above their reconstructions, print PSNR and SSIM, and write metrics.json.

With a generator run (the tokenizer it names is loaded and its hash checked):
    python sample.py ckpt=<generator run> decoding=ar [cfg_scale=.. top_k=.. top_p=.. temperature=..]
writes grid.png (one row per class, `samples_per_class` columns) and prints images/s and target
forward passes per image, with and without the tokenizer's decode. `fid.num_samples=N` also samples
N images balanced over the classes and scores them against the cached reference statistics of the
dataset's test split (`fid.save_samples=true` keeps them as PNGs). Under torchrun (WORLD_SIZE > 1)
each rank samples its share, seeded seed * world + rank, and the FID states are summed over ranks.
"""
from __future__ import annotations

import contextlib
import json
import logging
import warnings
import os
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from utils.checkpoint import (CheckpointError, atomic_replace, expect_kind, load_generator, load_tokenizer,  # noqa: F401
                              load_weights, resolve_checkpoint)
from utils.hydra import register_resolvers
from utils.timing import Stopwatch

log = logging.getLogger("tokar")
# Lightning noise that says nothing about the run: the EMA copy is meant to stay in eval mode.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
warnings.filterwarnings("ignore", message=r".*LeafSpec.*")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA device is available; use device=cpu")
    return torch.device(name)


@torch.no_grad()
def reconstruct(cfg: DictConfig, out: Path) -> dict:
    from data.registry import load_split
    from evaluation.reconstruction import PSNR, SSIM
    from tokenizers.module import save_reconstruction_grid

    device = pick_device(cfg.device)
    model, config = load_tokenizer(cfg.ckpt, device)
    data = config["data"]
    ds = load_split(data["name"], cfg.split, data["image_size"], **(data.get("settings") or {}))
    n = min(int(cfg.num_images), len(ds))
    psnr, ssim = PSNR().to(device), SSIM().to(device)
    grid, fakes = None, []
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(n)), batch_size=cfg.batch_size)
    for images, _ in loader:
        images = images.to(device)
        recon = model.decode(model.encode(images)).clamp(-1, 1)  # (B, C, H, W) through the discrete codes
        psnr.update(recon, images)
        ssim.update(recon, images)
        if cfg.rfid:
            fakes.append(recon.cpu())
        if grid is None:
            grid = save_reconstruction_grid(images[: cfg.grid_images], recon[: cfg.grid_images],
                                            out / "reconstructions.png")
    result = {"kind": "tokenizer", "ckpt": str(cfg.ckpt), "psnr": float(psnr.compute()),
              "ssim": float(ssim.compute()), "num_images": n, "grid": str(grid),
              "protocol": f"per-image PSNR/SSIM on uint8, first {n} images of {data['name']}:{cfg.split}"}
    print(f"grid: {grid}\nPSNR {result['psnr']:.2f} dB, SSIM {result['ssim']:.4f} over {n} {data['name']}:{cfg.split} "
          "images", flush=True)
    if cfg.rfid:
        from evaluation.fid import protocol_label, reconstruction_fid

        result["rfid"] = reconstruction_fid(torch.cat(fakes), data["name"], cfg.split, data["image_size"],
                                            settings=data.get("settings"))
        result["rfid_protocol"] = "r" + protocol_label(n, f"{data['name']}:{cfg.split}", data["image_size"], num_real=n)
        print(f"rFID {result['rfid']:.2f}  [{result['rfid_protocol']}]", flush=True)
    return result


# -- generators ------------------------------------------------------------------------------------
def distributed() -> tuple[int, int]:
    """(rank, world size); joins the process group under torchrun (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return (torch.distributed.get_rank(), world) if world > 1 else (0, 1)


def shared_output_dir(out: Path, world: int) -> Path:
    """Rank 0's output folder on every rank (each torchrun process got its own time-stamped folder)."""
    if world == 1:
        return out
    box = [str(out)]
    torch.distributed.broadcast_object_list(box, src=0)
    return Path(box[0])


@torch.no_grad()
def sample_generator(cfg: DictConfig, out: Path) -> dict | None:
    """Grid + speed (rank 0) and, with fid.num_samples > 0, the FID over all ranks; the result on rank 0."""
    from decoding.registry import get_decoder
    from generators.module import decode_tokens, describe_sampling, generator_fid, sampling_config, save_class_grid

    rank, world = distributed()
    device = pick_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    out = shared_output_dir(out, world)
    decoder = get_decoder(cfg.decoding.name)
    settings = decoder.parse_settings(cfg.decoding)  # a misspelled decoding.* key fails here
    model, tokenizer, config = load_generator(cfg.ckpt, device, cfg.get("tokenizer_ckpt"))
    decoder.check_applies(model)
    settings = decoder.prepare(settings, config, device)  # e.g. loads and checks a refiner run
    overrides = {k: cfg.get(k) for k in ("cfg_scale", "temperature", "top_k", "top_p", "cfg_interval", "num_steps",
                                         "guidance_until")}
    sampling = sampling_config(config["generator"]["sampling"], overrides)
    info, data = config["tokens"], config["data"]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    result = {"kind": "generator", "ckpt": str(cfg.ckpt), "generator": config["generator"]["name"],
              "decoding": cfg.decoding.name, "decoding_settings": decoder.describe(settings),
              "sampling": dict(vars(sampling)), "device": str(device),
              "world_size": world, "output_dir": str(out)}

    if rank == 0:
        # 1. the grid: one row per class; timed batch by batch, sampling and the tokenizer's decode apart
        per_class = int(cfg.samples_per_class)
        classes = list(cfg.classes) if cfg.get("classes") is not None else list(range(data["num_classes"]))
        labels = torch.tensor(classes).repeat_interleave(per_class).to(device)
        g = torch.Generator(device=device).manual_seed(int(cfg.seed))
        with autocast:
            if cfg.warmup:  # first calls pay for allocation and kernel selection: keep them out of the timing
                decoder.run(model, labels[: min(len(labels), 2)], sampling, torch.Generator(device=device), tokenizer,
                            settings)
            images, t_gen, t_dec, forwards = [], 0.0, 0.0, None
            for i in range(0, len(labels), int(cfg.batch_size)):
                y = labels[i:i + int(cfg.batch_size)]
                with Stopwatch(device) as sw_gen:
                    tokens, stats = decoder.run(model, y, sampling, g, tokenizer, settings)
                with Stopwatch(device) as sw_dec:
                    images.append(decode_tokens(model, tokenizer, tokens, info))
                t_gen, t_dec, forwards = t_gen + sw_gen.seconds, t_dec + sw_dec.seconds, stats["forward_passes"]
        grid = save_class_grid(torch.cat(images), per_class, out / "grid.png")
        n = len(labels)
        speed = {"images": n, "batch_size": min(n, int(cfg.batch_size)), "generate_seconds": round(t_gen, 4),
                 "decode_seconds": round(t_dec, 4), "images_per_s": n / t_gen, "images_per_s_with_decode":
                 n / (t_gen + t_dec), "forward_passes_per_image": forwards, "timer": "CUDA events" if
                 device.type == "cuda" else "perf_counter", "warmup": bool(cfg.warmup)}
        if hasattr(model, "head_evaluations"):  # FlowAR: trunk passes plus its flow head's Euler steps
            speed["flow_head_evaluations_per_image"] = model.head_evaluations(forwards, sampling)
        result.update(grid=str(grid), rows=classes, samples_per_class=per_class, speed=speed)
        print(f"grid: {grid} (rows = classes {classes}, {per_class} samples each)\n"
              f"{config['generator']['name']} decoding={decoder.name} ({describe_sampling(sampling, config)}) on {device}: "
              f"{speed['images_per_s']:.2f} images/s sampling tokens only, {speed['images_per_s_with_decode']:.2f} "
              f"images/s including the tokenizer decode; {forwards} target forward passes per image"
              + (f" (+ {speed['flow_head_evaluations_per_image']} flow-head evaluations)" if
                 "flow_head_evaluations_per_image" in speed else "") + f", batch {speed['batch_size']}", flush=True)

    # 2. FID over all ranks
    n_fid = int(cfg.fid.num_samples or 0)
    if n_fid:
        with autocast:
            fid = generator_fid(model, tokenizer, config, n_fid, sampling, int(cfg.batch_size), int(cfg.seed), device,
                                cfg.fid.split, cfg.fid.reference_images, rank, world,
                                out / "samples" if cfg.fid.save_samples else None, decoder, settings)
        if cfg.fid.save_samples:
            fid["samples_dir"] = str(out / "samples")
        result["fid"] = fid
        if rank == 0:
            print(f"FID {fid['fid']:.3f}  [{fid['protocol']}]", flush=True)
    return result if rank == 0 else None


def run(cfg: DictConfig, out: Path) -> dict:
    config, _, _ = resolve_checkpoint(cfg.ckpt)
    kind = config.get("kind")
    if kind == "tokenizer":
        result = reconstruct(cfg, out)
    elif kind in ("generator", "distill"):
        result = sample_generator(cfg, out)
        if result is None:  # not rank 0
            return {}
        out = Path(result["output_dir"])  # rank 0's folder under torchrun
    else:
        raise CheckpointError(f"{cfg.ckpt} is a {kind} checkpoint; sample.py handles: tokenizer, generator, distill")
    atomic_replace(lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2)), out / "metrics.json")
    return result


@hydra.main(version_base="1.3", config_path="configs", config_name="sample")
def main(cfg: DictConfig) -> None:
    register_resolvers()
    if OmegaConf.is_missing(cfg, "ckpt"):
        raise SystemExit("sample.py needs a checkpoint: python sample.py ckpt=<run folder (outputs/<task>/<time>), "
                         ".ckpt or model.safetensors>")
    torch.manual_seed(cfg.seed)
    try:
        run(cfg, Path(HydraConfig.get().runtime.output_dir))
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
