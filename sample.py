"""Sample from a trained tokar run: python sample.py ckpt=<run folder | .ckpt | model.safetensors>

With a tokenizer run: reconstruct `num_images` images of the dataset's test split, write a grid
of originals above their reconstructions, print PSNR and SSIM, and write metrics.json.

With a generator run (the tokenizer it names is loaded and its hash checked):
    python sample.py ckpt=<generator run> decoding=ar [cfg_scale=.. top_k=.. top_p=.. temperature=..]
writes grid.png (one row per class, `samples_per_class` columns) and prints images/s and target
forward passes per image, with and without the tokenizer's decode, the step compression (tokens per
target forward) and a speculative method's mean accepted length; `compare_ar=true` also times
decoding=ar on the same batches from the same seed and prints the latency ratio. `fid.num_samples=N` also samples
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

from utils.checkpoint import CheckpointError, atomic_replace
from utils.hydra import check_command_line, check_ranges, register_resolvers
from utils.progress import progress
from utils.runs import load_generator, load_run, read_checkpoint  # noqa: F401 (load_generator: the Python API)
from utils.timing import Stopwatch

log = logging.getLogger("tokar")
# Lightning noise that says nothing about the run: the EMA copy is meant to stay in eval mode.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
warnings.filterwarnings("ignore", message=r".*LeafSpec.*")


# what a sample.py run writes into its folder (a folder holding any of them belongs to another run)
OUTPUTS = ("metrics.json", "grid.png", "reconstructions.png", "samples", "reconstructions")
NEEDS_CKPT = ("sample.py needs a checkpoint: python sample.py ckpt=<run folder (outputs/<task>/<time>), .ckpt or "
              "model.safetensors>  (python sample.py --help lists every setting)")
# (low, low inclusive, high, high inclusive) per key; null values mean "the run's own default"
SAMPLE_RANGES = {"batch_size": (1, True, None, False), "num_images": (1, True, None, False),
                 "grid_images": (0, True, None, False), "samples_per_class": (1, True, None, False),
                 "temperature": (0, False, None, False), "top_k": (0, True, None, False),
                 "top_p": (0, False, 1, True), "cfg_scale": (0, True, None, False), "num_steps": (1, True, None, False),
                 "guidance_until": (0, True, 1, True), "fid.num_samples": (0, True, None, False),
                 "fid.reference_images": (2, True, None, False)}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA device is available; use device=cpu")
    return torch.device(name)


@torch.no_grad()
def reconstruct(cfg: DictConfig, out: Path) -> dict:
    from data.image_folder import save_images
    from data.registry import load_split
    from evaluation.reconstruction import PSNR, SSIM
    from tokenizers.module import save_reconstruction_grid

    device = pick_device(cfg.device)
    run = load_run(cfg.ckpt, "tokenizer", device, role="ckpt")
    model, config = run.model, run.config
    data = config["data"]
    ds = load_split(data["name"], cfg.split, data["image_size"], **(data.get("settings") or {}))
    n = min(int(cfg.num_images), len(ds))
    psnr, ssim = PSNR().to(device), SSIM().to(device)
    grid, fakes, saved = None, [], 0
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(n)), batch_size=cfg.batch_size)
    for images, _ in progress(loader, "reconstructing"):
        images = images.to(device)
        recon = model.decode(model.encode(images)).clamp(-1, 1)  # (B, C, H, W) through the discrete codes
        psnr.update(recon, images)
        ssim.update(recon, images)
        if cfg.save_reconstructions:  # PNGs in split order, for python -m evaluation.fid
            saved += len(save_images(recon, out / "reconstructions", start=saved))
        if cfg.rfid:
            fakes.append(recon.cpu())
        if grid is None:
            grid = save_reconstruction_grid(images[: cfg.grid_images], recon[: cfg.grid_images],
                                            out / "reconstructions.png")
    result = {"kind": "tokenizer", "ckpt": str(cfg.ckpt), "psnr": float(psnr.compute()),
              "ssim": float(ssim.compute()), "num_images": n, "grid": str(grid),
              "protocol": f"per-image PSNR/SSIM on uint8, first {n} images of {data['name']}:{cfg.split}"}
    if cfg.save_reconstructions:
        result["reconstructions_dir"] = str(out / "reconstructions")
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
    from generators.module import (class_names, decode_tokens, describe_sampling, generator_fid, sampling_config,
                                   save_class_grid)

    rank, world = distributed()
    device = pick_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    out = shared_output_dir(out, world)
    if device.type == "cpu" and cfg.keep_freed_memory:
        from utils.heap import keep_freed_memory
        keep_freed_memory()  # big per-step tensors reuse freed heap pages instead of faulting in fresh ones
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
        # compare_ar: decoding=ar on the same batches from the same seed, timed in the same run (A/B alternating)
        ar = get_decoder("ar") if cfg.get("compare_ar") and decoder.name != "ar" else None
        g_ar = torch.Generator(device=device).manual_seed(int(cfg.seed))
        with autocast:
            if cfg.warmup:  # first calls pay for allocation and kernel selection (per shape: at the timed batch
                # size; on a GPU a first ar call at a new batch size took seconds): keep them out of the timing
                for d, s in ((decoder, settings), (ar, None)) if ar else ((decoder, settings),):
                    d.run(model, labels[: int(cfg.batch_size)], sampling, torch.Generator(device=device), tokenizer, s)
            images, t_gen, t_dec, t_ar, runs = [], 0.0, 0.0, 0.0, []
            for k, i in enumerate(progress(range(0, len(labels), int(cfg.batch_size)), "sampling the grid")):
                y = labels[i:i + int(cfg.batch_size)]
                if ar is not None and k % 2:
                    with Stopwatch(device) as sw_ar:
                        ar.run(model, y, sampling, g_ar, tokenizer)
                with Stopwatch(device) as sw_gen:
                    tokens, stats = decoder.run(model, y, sampling, g, tokenizer, settings)
                if ar is not None and not k % 2:
                    with Stopwatch(device) as sw_ar:
                        ar.run(model, y, sampling, g_ar, tokenizer)
                with Stopwatch(device) as sw_dec:
                    images.append(decode_tokens(model, tokenizer, tokens, info))
                t_gen, t_dec, t_ar = t_gen + sw_gen.seconds, t_dec + sw_dec.seconds, t_ar + (sw_ar.seconds if ar else 0)
                runs.append(stats)
        grid = save_class_grid(torch.cat(images), per_class, out / "grid.png", class_names(data, classes))
        n = len(labels)
        forwards = sum(r["forward_passes"] for r in runs) / len(runs)  # batch forwards: every image in it waits
        speed = {"images": n, "batch_size": min(n, int(cfg.batch_size)), "generate_seconds": round(t_gen, 4),
                 "decode_seconds": round(t_dec, 4), "images_per_s": n / t_gen, "images_per_s_with_decode":
                 n / (t_gen + t_dec), "forward_passes_per_image": forwards,
                 "step_compression": runs[0]["tokens"] / forwards, "timer": "CUDA events" if
                 device.type == "cuda" else "perf_counter", "warmup": bool(cfg.warmup)}
        # the method's own statistics (accepted lengths, per-row forwards, ...), averaged over the batches
        extra = {k: sum(r[k] for r in runs) / len(runs) for k, v in runs[0].items()
                 if isinstance(v, float) and k not in ("wall_time",)}
        if extra:
            speed["decoding_stats"] = extra
        if ar is not None:
            speed.update(ar_generate_seconds=round(t_ar, 4), latency_ratio_vs_ar=t_ar / t_gen)
        if hasattr(model, "head_evaluations"):  # FlowAR: trunk passes plus its flow head's Euler steps
            speed["flow_head_evaluations_per_image"] = model.head_evaluations(forwards, sampling)
        result.update(grid=str(grid), rows=classes, samples_per_class=per_class, speed=speed)
        print(f"grid: {grid} (rows = classes {classes}, {per_class} samples each)\n"
              f"{config['generator']['name']} decoding={decoder.name} ({describe_sampling(sampling, config)}) on {device}: "
              f"{speed['images_per_s']:.2f} images/s sampling tokens only, {speed['images_per_s_with_decode']:.2f} "
              f"images/s including the tokenizer decode; {forwards:g} target forward passes per image"
              + (f" (+ {speed['flow_head_evaluations_per_image']} flow-head evaluations)" if
                 "flow_head_evaluations_per_image" in speed else "") + f", batch {speed['batch_size']}", flush=True)
        if "mean_accepted_length" in extra:
            print(f"step compression {speed['step_compression']:.2f} (tokens / target forward passes), mean accepted "
                  f"length {extra['mean_accepted_length']:.2f}", flush=True)
        if ar is not None:
            print(f"compare_ar: ar {t_ar:.2f} s vs {decoder.name} {t_gen:.2f} s on the same batches and seed: "
                  f"latency ratio {speed['latency_ratio_vs_ar']:.2f}x", flush=True)

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


def check_fresh_output(out: Path) -> None:
    """No sample.py run overwrites another's outputs: a folder that holds them is refused (rank 0 checks)."""
    if int(os.environ.get("RANK", 0)):
        return
    clash = [name for name in OUTPUTS if (out / name).exists()]
    if clash:
        raise FileExistsError(f"{out} already holds the outputs of an earlier run ({', '.join(clash)}); sample.py "
                              "never overwrites them: pass another hydra.run.dir, or leave it unset for a new "
                              "outputs/sample/<time>/ folder")


def check_sample_config(cfg: DictConfig) -> None:
    """A ValueError naming a setting out of its range."""
    check_ranges(cfg, SAMPLE_RANGES)


def run(cfg: DictConfig, out: Path) -> dict:
    check_sample_config(cfg)
    check_fresh_output(out)
    config, _, _, _ = read_checkpoint(cfg.ckpt)
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
    folders = (("samples", (result.get("fid") or {}).get("samples_dir")),
               ("reconstructions", result.get("reconstructions_dir")))
    written = [("metrics", out / "metrics.json")] + [(name, path) for name, path in folders if path]
    print("\n".join(f"{name:<15}: {path}" for name, path in written), flush=True)
    return result


@hydra.main(version_base="1.3", config_path="configs", config_name="sample")
def main(cfg: DictConfig) -> None:
    register_resolvers()
    if OmegaConf.is_missing(cfg, "ckpt"):
        raise SystemExit(NEEDS_CKPT)
    torch.manual_seed(cfg.seed)
    try:
        run(cfg, Path(HydraConfig.get().runtime.output_dir))
    except BaseException:
        log.exception("sample.py failed")  # into the run's log file, not only the terminal
        raise
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def check_sample_command_line(argv: list[str]) -> None:
    """--help, and the command line composed and range-checked before Hydra makes an output folder."""
    import sys

    if not any(a.startswith("-") for a in argv) and not any(a.startswith("ckpt=") for a in argv):
        sys.exit(NEEDS_CKPT)
    keys = (Path(__file__).parent / "configs" / "sample.yaml").read_text().split("ckpt: ???", 1)[1]
    intro = (__doc__ or "").strip() + "\n\nKeys (configs/sample.yaml):\nckpt: ???" + keys.rstrip()
    check_command_line("sample", argv, intro, check_sample_config)


if __name__ == "__main__":
    import sys

    check_sample_command_line(sys.argv[1:])
    main()
