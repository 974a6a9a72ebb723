"""One row per tokenizer on Fashion-MNIST with the same autoencoder, budget and seed.

    python benchmarks/tokenizers.py [--steps 300] [--rfid-images 1000] [--only fsq vq ...]

Each tokenizer trains through the same `train()` as train.py (only `tokenizer=<name>` differs),
then its EMA weights are evaluated on the whole test split: PSNR / SSIM per image on uint8, usage
and perplexity over all 10k test images, rFID on the first N test images, bits per image, and the
mean training step time. Prints a markdown table; --append writes it to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ALL = ["fsq", "vq", "vq_ema", "vq_l2", "simvq", "lfq", "bsq", "bernoulli", "msvq", "kl"]


def compose(name: str, steps: int, out: Path, extra: list[str]):
    from utils.hydra import compose_with_hydra

    overrides = [f"tokenizer={name}", "data=fashion_mnist", f"trainer.max_steps={steps}",
                 f"trainer.val_check_interval={steps + 1}", "trainer.enable_progress_bar=false",
                 "trainer.enable_model_summary=false", "callbacks=none", "~logger", *extra]
    return compose_with_hydra("train", overrides, out)


def bits_per_image(cfg, image_size: int) -> str:
    """log2(codebook size) x tokens, from the built tokenizer."""
    from omegaconf import OmegaConf

    from tokenizers.module import build_tokenizer

    model = build_tokenizer(OmegaConf.to_container(cfg.tokenizer, resolve=True), cfg.data.channels)
    q = model.quantizer
    shape = model.token_shape(image_size)
    tokens = sum(h * w for h, w in shape) if q.multiscale else shape[0] * shape[1]
    if q.codebook_size is None:
        return "continuous"
    return f"{tokens * math.log2(q.codebook_size):.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rfid-images", type=int, default=1000)
    parser.add_argument("--only", nargs="*", default=ALL)
    parser.add_argument("--extra", nargs="*", default=["tokenizer.autoencoder.ch=32", "tokenizer.optimizer.lr=2e-3",
                                                        "tokenizer.optimizer.warmup_steps=50",
                                                        "tokenizer.ema_decay=0.995"])
    parser.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()

    from train import train

    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    rows, batch = [], None
    for name in args.only:
        out = ROOT / "outputs" / "bench_tokenizers" / stamp / name
        cfg = compose(name, args.steps, out, [f"tokenizer.eval.rfid_images={args.rfid_images}", *args.extra])
        metrics, objects = train(cfg)
        batch = cfg.data.batch_size
        summary = json.loads((out / "metrics.json").read_text())
        step_ms = 1000 * summary["train_seconds"] / max(1, summary["steps"])
        row = {"tokenizer": name, "psnr": metrics.get("test/psnr"), "ssim": metrics.get("test/ssim"),
               "usage": metrics.get("test/usage"), "perplexity": metrics.get("test/perplexity"),
               "rfid": metrics.get("test/rfid"), "bits": bits_per_image(cfg, cfg.data.image_size),
               "step_ms": step_ms}
        rows.append(row)
        print(json.dumps(row), flush=True)

    def fmt(v, spec):
        return "–" if v is None else format(v, spec)

    lines = ["| tokenizer | PSNR (dB) | SSIM | usage | perplexity | rFID | bits / image | train step (ms) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tokenizer']} | {fmt(r['psnr'], '.2f')} | {fmt(r['ssim'], '.3f')} | "
                     f"{fmt(r['usage'], '.1%')} | {fmt(r['perplexity'], '.0f')} | {fmt(r['rfid'], '.1f')} | "
                     f"{r['bits']} | {r['step_ms']:.0f} |")
    table = "\n".join(lines)
    cmd = "python benchmarks/tokenizers.py " + " ".join(sys.argv[1:])
    header = (f"\n## Tokenizers on Fashion-MNIST\n\n`{cmd}` — {datetime.date.today()}, {os.cpu_count()} CPU cores "
              f"({platform.processor() or platform.machine()}), seed 42. Budget: {args.steps} steps, batch {batch}, "
              f"same autoencoder ({' '.join(args.extra)}), 32x32, f4. PSNR/SSIM per image on uint8 and "
              f"usage/perplexity over all 10k test images (EMA weights); rFID = FID-{args.rfid_images} of "
              "reconstructions vs the same test images, standard Inception (TF 2015-12-05), torchmetrics. "
              "Step time is wall time per training step on a shared machine (indicative only).\n\n")
    print(header + table)
    if args.append:
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as f:
            f.write(header + table + "\n")


if __name__ == "__main__":
    main()
