"""Training steps/s and encode / decode images/s of the demo tokenizer on CPU (fp32): indicative numbers.

    python benchmarks/tokenizer_throughput.py [override ...] [--threads 1 2] [--rounds 7] [--append]

The tokenizer is built from the composed Hydra config (`train` + `experiment=demo` when
configs/experiment/demo.yaml exists, else the defaults; extra Hydra overrides may follow) with
`tokenizers.module.build_tokenizer(cfg.tokenizer, image_channels=cfg.data.channels)`.

- Training step at batch = data.batch_size: what `TokenizerModule.training_step` does with the demo's
  losses (forward, reconstruction + quantizer loss, backward, grad-norm clip, AdamW, LR schedule,
  weight EMA), without Lightning's loop, logging or data loading (batches are pre-made from
  Fashion-MNIST). LPIPS and the GAN are not included; the script says so if the config enables them.
- Encode / decode at --encode-batch (250, the config's eval batch) with `Tokenizer.encode` /
  `Tokenizer.decode` in eval mode.
- For context, in the same rounds: the time of an encode-only pass at the training batch divided by
  the time of a full training step at that batch.

Each measurement is repeated in --rounds rounds (their order rotating) after a warm-up, each run for
about --target-s seconds; reported as the median with min-max over rounds. These are absolute CPU
numbers on a shared, noisy machine: indicative only (../shared/BENCHMARKING.md quotes absolute times
only from a GPU); the encode/train ratio is the steadier figure.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, machine, report  # noqa: E402

import torch  # noqa: E402

SECTION = "## Tokenizer throughput"


def compose_config(overrides: list[str]):
    """The `train` config with experiment=demo (when it exists) plus overrides."""
    from utils.hydra import compose_with_hydra

    base = ["experiment=demo"] if (ROOT / "configs" / "experiment" / "demo.yaml").exists() else []
    return compose_with_hydra("train", base + list(overrides)), base + list(overrides)


class Bench:
    """The model, its optimizer / schedule / EMA as the tokenizer module sets them up, and fixed batches."""

    def __init__(self, cfg, seed: int, encode_batch: int):
        from omegaconf import OmegaConf

        from data.registry import load_split
        from tokenizers.losses import ReconstructionLoss
        from tokenizers.module import build_tokenizer
        from utils.ema import EMA
        from utils.schedule import warmup_cosine

        self.tok_cfg = OmegaConf.to_container(cfg.tokenizer, resolve=True)
        torch.manual_seed(seed)
        self.model = build_tokenizer(self.tok_cfg, image_channels=int(cfg.data.channels))
        opt_cfg = self.tok_cfg["optimizer"]
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=opt_cfg["lr"], betas=tuple(opt_cfg["betas"]),
                                     weight_decay=opt_cfg["weight_decay"])
        total = int(cfg.trainer.max_steps)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, warmup_cosine(opt_cfg["warmup_steps"], total, opt_cfg["min_lr_ratio"]))
        self.ema = EMA(self.model, self.tok_cfg["ema_decay"])
        self.rec_loss = ReconstructionLoss(**self.tok_cfg["loss"]["reconstruction"])
        self.q_weight = float(self.tok_cfg["loss"]["quantizer"])
        self.grad_clip = float(self.tok_cfg["grad_clip"])
        self.batch = int(cfg.data.batch_size)

        size = int(cfg.data.image_size)
        train = load_split(cfg.data.name, "train", image_size=size)
        test = load_split(cfg.data.name, "test", image_size=size)
        gen = torch.Generator().manual_seed(seed)
        picks = torch.randint(0, len(train), (8, self.batch), generator=gen)
        self.train_batches = [torch.stack([train[int(i)][0] for i in row]) for row in picks]  # 8 batches, cycled
        self.encode_images = torch.stack([test[i][0] for i in range(encode_batch)])
        self.encode_small = self.encode_images[:self.batch]
        self.model.eval()
        self.indices = self.model.encode(self.encode_images)
        self.step_i = 0

    def train_step(self) -> None:
        model = self.model
        model.train()
        images = self.train_batches[self.step_i % len(self.train_batches)]
        self.step_i += 1
        recon, q = model(images)
        rec, _ = self.rec_loss(recon, images)
        loss = rec + self.q_weight * q.loss
        if not torch.isfinite(loss):
            raise FloatingPointError("non-finite loss")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip)
        self.opt.step()
        self.sched.step()
        self.ema.update(model)

    def encode(self, images: torch.Tensor) -> None:
        self.model.eval()
        self.model.encode(images)

    def decode(self) -> None:
        self.model.eval()
        self.model.decode(self.indices)


def run_many(fn, n: int) -> float:
    """Seconds per call, over n calls."""
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def measure(bench: Bench, rounds: int, target_s: float, encode_batch: int) -> dict:
    tasks = {
        "train": bench.train_step,
        "encode": lambda: bench.encode(bench.encode_images),
        "decode": bench.decode,
        "encode_small": lambda: bench.encode(bench.encode_small),
    }
    counts = {}
    for name, fn in tasks.items():  # warm-up, then calibrate the calls per round
        run_many(fn, 2)
        counts[name] = max(1, round(target_s / max(run_many(fn, 2), 1e-6)))
    per_round = {k: [] for k in ("steps_s", "train_img_s", "encode_img_s", "decode_img_s", "enc_over_train",
                                 "img_s_ratio")}
    names = list(tasks)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
        t = {name: run_many(tasks[name], counts[name]) for name in order}
        per_round["steps_s"].append(1 / t["train"])
        per_round["train_img_s"].append(bench.batch / t["train"])
        per_round["encode_img_s"].append(encode_batch / t["encode"])
        per_round["decode_img_s"].append(encode_batch / t["decode"])
        per_round["enc_over_train"].append(t["encode_small"] / t["train"])
        per_round["img_s_ratio"].append((encode_batch / t["encode"]) / (bench.batch / t["train"]))
    return {k: (statistics.median(v), min(v), max(v)) for k, v in per_round.items()} | {"counts": counts}


def fmt(stat, digits: int = 1) -> str:
    med, lo, hi = stat
    return f"{med:.{digits}f} [{lo:.{digits}f}–{hi:.{digits}f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. tokenizer=vq")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts, one row each")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--target-s", type=float, default=1.0, help="seconds per measurement per round")
    parser.add_argument("--encode-batch", type=int, default=250)
    parser.add_argument("--seed", type=int, default=None, help="default: the config's seed")
    parser.add_argument("--append", action="store_true", help=f"append the table to {RESULTS.relative_to(ROOT)}")
    args = parser.parse_args()

    from omegaconf import OmegaConf

    cfg, used_overrides = compose_config(args.overrides)
    seed = int(cfg.seed) if args.seed is None else args.seed
    tok = OmegaConf.to_container(cfg.tokenizer, resolve=True)
    caveats = []
    if float(tok["loss"].get("perceptual", 0.0)) > 0:
        caveats.append("the config enables LPIPS, which this step does NOT include")
    if float((tok["loss"].get("adversarial") or {}).get("weight", 0.0)) > 0:
        caveats.append("the config enables the PatchGAN loss, which this step does NOT include")
    for c in caveats:
        print(f"warning: {c}", file=sys.stderr)

    started, load_start = time.time(), os.getloadavg()[0]
    rows, details = [], []
    for threads in args.threads:
        torch.set_num_threads(threads)
        bench = Bench(cfg, seed, args.encode_batch)
        r = measure(bench, args.rounds, args.target_s, args.encode_batch)
        rows.append(f"| {threads} | {fmt(r['steps_s'], 2)} | {fmt(r['train_img_s'], 0)} | {fmt(r['encode_img_s'], 0)} "
                    f"| {fmt(r['decode_img_s'], 0)} | {fmt(r['enc_over_train'], 3)} | {fmt(r['img_s_ratio'], 1)} |")
        details.append(f"{threads} thread(s): calls per round {r['counts']}")
        print(rows[-1], flush=True)

    model = bench.model
    params = sum(p.numel() for p in model.parameters())
    q = model.quantizer
    shape = model.token_shape(int(cfg.data.image_size))
    tokens = sum(h * w for h, w in shape) if q.multiscale else shape[0] * shape[1]
    batch = int(cfg.data.batch_size)
    header = (f"| threads | train steps/s (batch {batch}) | train images/s | encode images/s (batch "
              f"{args.encode_batch}) | decode images/s (batch {args.encode_batch}) | time of encode-only ÷ full "
              f"training step (same batch {batch}) | encode ÷ train images/s |")
    table = "\n".join([header, "|---|---|---|---|---|---|---|", *rows])
    command = "python benchmarks/tokenizer_throughput.py " + " ".join(sys.argv[1:])
    notes = (
        f"Indicative only: absolute CPU throughput on a shared, noisy machine (other jobs were running); "
        f"compare rows of one run, not across machines or runs. Values are median [min–max] over "
        f"{args.rounds} rounds (order rotating) after warm-up, ~{args.target_s:g} s per measurement per round.\n\n"
        f"- Command: `{command.strip()}` (from the repo root); date {datetime.date.today().isoformat()}; "
        f"machine: {machine()}; torch {torch.__version__}; fp32, CPU, torch.set_num_threads as in the "
        f"`threads` column; seed {seed}; wall time {time.time() - started:.0f} s; 1-min load average "
        f"{load_start:.1f} at start, {os.getloadavg()[0]:.1f} at the end.\n"
        f"- Model: `build_tokenizer(cfg.tokenizer)` from `train` + {used_overrides or 'defaults'}: "
        f"{tok['name']} quantizer {tok['quantizer']['_target_'].rsplit('.', 1)[-1]}, autoencoder "
        f"{tok['autoencoder']}, {params / 1e6:.2f}M parameters, {cfg.data.name} "
        f"{cfg.data.image_size}x{cfg.data.image_size}x{cfg.data.channels}, {tokens} tokens per image "
        f"(codebook {q.codebook_size}).\n"
        f"- Training step = TokenizerModule.training_step's work for this config (forward, L1 + "
        f"{tok['loss']['quantizer']} x quantizer loss, backward, grad-norm clip {tok['grad_clip']}, AdamW, "
        f"warmup-cosine LR, weight EMA {tok['ema_decay']}) without Lightning's loop, logging or data loading"
        f"{'; ' + '; '.join(caveats) if caveats else ''}. Encode = `Tokenizer.encode` (images -> indices), "
        f"decode = `Tokenizer.decode` (indices -> images), eval mode, no grad.\n"
        f"- {'; '.join(details)}.\n")
    text = f"{SECTION}\n\n{notes}\n{table}\n"
    report(text, args.append)


if __name__ == "__main__":
    main()
