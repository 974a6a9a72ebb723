"""tokar's quantizers against lucidrains' vector-quantize-pytorch: speed ratio and codebook usage.

    python benchmarks/quantizers.py [--rounds 15] [--steps 250] [--batch 64] [--only vq fsq ...] [--append]

For every quantizer of ours with a counterpart in vector-quantize-pytorch (a benchmark-only extra,
`pip install vector-quantize-pytorch`, never imported by tokar itself):

1. Speed: forward + backward in training mode at identical shapes and settings (default B=64 feature
   maps of 8x8, dim 64, codebook 1024, fp32, CPU, one thread for both), timed as a ratio in one
   process: both warmed up, then ours and theirs alternate (who goes first alternates too) for
   --rounds rounds of n calls each (n calibrated to ~--target-s per side); reported as the median
   of the per-round ratios theirs_time / ours_time with min-max (>= 1.0: ours is at least as fast).
2. Codebook usage: the same tiny conv autoencoder (32x32 -> 8x8 latents) trained with each quantizer
   on Fashion-MNIST for the same steps, batch, lr, data order and seed (the autoencoder weights are
   identical for ours and theirs); usage = distinct codes over the whole test split (10k images) /
   codebook size, in eval mode.

Prints a markdown table; --append adds it to benchmarks/RESULTS.md under
`## Quantizers vs vector-quantize-pytorch` with the command, date, machine, versions and seed.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, machine, report  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

SECTION = "## Quantizers vs vector-quantize-pytorch"


# ------------------------------------------------------------------------------------------------
# one interface for both libraries: z (B, C, H, W) -> (quantized (B, C, H, W), [index tensors], loss)
# ------------------------------------------------------------------------------------------------


class Side(nn.Module):
    """Wraps one quantizer so ours and theirs are called the same way.

    ``call(module, z)`` returns (quantized (B, C, H, W), list of integer index tensors, scalar loss);
    the layout changes a library needs (e.g. channel-last) happen inside it and are timed with it.
    """

    def __init__(self, module: nn.Module, call: Callable, codebook_size: int):
        super().__init__()
        self.q = module
        self.call = call
        self.codebook_size = codebook_size

    def forward(self, z: torch.Tensor):
        return self.call(self.q, z)


def ours_call(q, z):
    out = q(z)
    idx = out.indices if isinstance(out.indices, list) else [out.indices]
    return out.quantized, idx, out.loss


def theirs_vq_call(q, z):  # VectorQuantize(accept_image_fmap=True), SimVQ(channel_first=True), LFQ
    quantized, idx, loss = q(z)
    return quantized, [idx], loss


def theirs_fsq_call(q, z):  # FSQ has no loss
    quantized, idx = q(z)
    return quantized, [idx], quantized.new_zeros(())


def theirs_rvq_call(q, z):
    """ResidualVQ takes (B, N, C): its accept_image_fmap path fails on 4-d inputs in 1.32.0."""
    b, c, h, w = z.shape
    quantized, idx, losses = q(z.permute(0, 2, 3, 1).reshape(b, h * w, c))
    quantized = quantized.view(b, h, w, c).permute(0, 3, 1, 2)
    return quantized, [idx], losses.mean()  # mean over stages, like ours over scales


@dataclass
class Pair:
    key: str
    label: str
    settings: str
    channels: int  # what the quantizer takes in (dim)
    ours: Callable[[], Side]
    theirs: Callable[[], Side]


def make_pairs(dim: int, k: int, latent: int, msvq_dim: int = 32) -> list[Pair]:
    from vector_quantize_pytorch import FSQ as TFSQ
    from vector_quantize_pytorch import LFQ as TLFQ
    from vector_quantize_pytorch import ResidualVQ, VectorQuantize
    from vector_quantize_pytorch import SimVQ as TSimVQ

    from tokenizers.fsq import FSQ
    from tokenizers.lfq import LFQ
    from tokenizers.msvq import MultiScaleVQ
    from tokenizers.simvq import SimVQ
    from tokenizers.vq import VQ

    bits = (k - 1).bit_length()
    assert 2 ** bits == k, "LFQ needs a power-of-two codebook"
    scales = [s for s in (1, 2, 3, 4, 6, 8, 10, 13, 16) if s < latent] + [latent]
    vq_common = dict(accept_image_fmap=True, rotation_trick=False, kmeans_init=False, commitment_weight=0.25)
    levels = [8, 5, 5, 5]
    return [
        Pair("vq", "VQ (learned codebook)",
             f"d={dim}, K={k}; ours β=0.25 on commitment + codebook loss; theirs learnable_codebook, "
             f"ema_update off, commitment_weight 0.25 (its one loss trains both sides: the same gradients "
             f"up to a constant scale on the codebook, which Adam ignores); STE, no rotation trick, no k-means, "
             f"no dead-code restart",
             dim, lambda: Side(VQ(dim, k, beta=0.25), ours_call, k),
             lambda: Side(VectorQuantize(dim=dim, codebook_size=k, learnable_codebook=True, ema_update=False,
                                         **vq_common), theirs_vq_call, k)),
        Pair("vq_ema", "VQ + EMA",
             f"d={dim}, K={k}; EMA decay 0.99, eps 1e-5, dead-code threshold 1.0 (restart from batch), "
             f"commitment 0.25, STE, no rotation trick, no k-means",
             dim, lambda: Side(VQ(dim, k, beta=0.25, ema=True, decay=0.99, eps=1e-5, dead_code_threshold=1.0),
                               ours_call, k),
             lambda: Side(VectorQuantize(dim=dim, codebook_size=k, decay=0.99, eps=1e-5,
                                         threshold_ema_dead_code=1.0, **vq_common), theirs_vq_call, k)),
        Pair("vq_cos", "VQ cosine (l2-normalized)",
             f"d={dim} -> codebook_dim 8 via projections in/out (LlamaGen style), K={k}; cosine lookup; "
             f"EMA decay 0.99 for both (theirs has no learnable cosine codebook), no dead-code restart, "
             f"commitment 0.25, STE, no rotation trick",
             dim, lambda: Side(VQ(dim, k, beta=0.25, l2_norm=True, codebook_dim=8, ema=True, decay=0.99),
                               ours_call, k),
             lambda: Side(VectorQuantize(dim=dim, codebook_size=k, codebook_dim=8, use_cosine_sim=True,
                                         decay=0.99, threshold_ema_dead_code=0, **vq_common),
                          theirs_vq_call, k)),
        Pair("fsq", "FSQ",
             f"levels {levels} ({8 * 5 * 5 * 5} codes), d={dim} with 1x1 / Linear projections in and out",
             dim, lambda: Side(FSQ(levels, dim=dim), ours_call, 1000),
             lambda: Side(TFSQ(levels=levels, dim=dim), theirs_fsq_call, 1000)),
        Pair("lfq", "LFQ",
             f"d={bits} bits (K={k}, no projection), entropy weight 0.1 (sample − 1.0 × codebook), "
             f"inv_temperature 100, commitment 0.25, full per-sample entropy",
             bits, lambda: Side(LFQ(bits, entropy_weight=0.1, commitment_weight=0.25, inv_temperature=100.0),
                                ours_call, k),
             lambda: Side(TLFQ(dim=bits, codebook_size=k, entropy_loss_weight=0.1, commitment_loss_weight=0.25,
                               diversity_gamma=1.0, frac_per_sample_entropy=1.0), theirs_vq_call, k)),
        Pair("simvq", "SimVQ",
             f"d={dim}, K={k}; frozen C ~ N(0, d^-0.5), W = Linear(d, d) with bias (passed to theirs as "
             f"codebook_transform); loss mse(q, sg z) + 0.25 mse(z, sg q); STE, no rotation trick",
             dim, lambda: Side(SimVQ(dim, k, beta=0.25), ours_call, k),
             lambda: Side(TSimVQ(dim=dim, codebook_size=k, codebook_transform=nn.Linear(dim, dim),
                                 channel_first=True, rotation_trick=False,
                                 input_to_quantize_commit_loss_weight=0.25, commitment_weight=1.0),
                          theirs_vq_call, k)),
        Pair("msvq", "multi-scale residual VQ vs ResidualVQ",
             f"NOT the same algorithm: ours = VAR's multi-scale residual VQ (scales {scales}, area-down, "
             f"bicubic-up, phi convs 0.5, loss on the running sum), theirs = ResidualVQ at full resolution; "
             f"equal number of stages ({len(scales)}), one shared codebook K={k}, d={msvq_dim} (as in "
             f"configs/tokenizer/msvq.yaml), learned codebook "
             f"(theirs learnable_codebook, ema_update off, commitment 0.25, no rotation trick); "
             f"usage = union of codes over all stages",
             msvq_dim, lambda: Side(MultiScaleVQ(msvq_dim, k, scales=scales, beta=0.25), ours_call, k),
             lambda: Side(ResidualVQ(dim=msvq_dim, num_quantizers=len(scales), codebook_size=k, shared_codebook=True,
                                     learnable_codebook=True, ema_update=False, rotation_trick=False,
                                     kmeans_init=False, commitment_weight=0.25), theirs_rvq_call, k)),
    ]


# ------------------------------------------------------------------------------------------------
# speed: fwd + bwd ratio
# ------------------------------------------------------------------------------------------------


def fwd_bwd(side: Side, z: torch.Tensor, g: torch.Tensor) -> None:
    quantized, _, loss = side(z)
    ((quantized * g).sum() + loss).backward()


def timed(side: Side, z: torch.Tensor, g: torch.Tensor, n: int) -> float:
    """Seconds for n forward+backward calls (gradients cleared outside the timed region)."""
    total = 0.0
    for _ in range(n):
        side.zero_grad(set_to_none=True)
        z.grad = None
        t0 = time.perf_counter()
        fwd_bwd(side, z, g)
        total += time.perf_counter() - t0
    return total


def speed_ratio(pair: Pair, batch: int, latent: int, rounds: int, target_s: float, seed: int):
    """Median, min, max of theirs/ours per round, the calls per round, and ours' mean call time."""
    torch.manual_seed(seed)
    ours, theirs = pair.ours().train(), pair.theirs().train()
    z = torch.randn(batch, pair.channels, latent, latent, requires_grad=True)
    g = torch.randn(batch, pair.channels, latent, latent)
    for side in (ours, theirs):  # warm-up (and lets EMA / dead-code state settle)
        timed(side, z, g, 3)
    per_call = max(timed(ours, z, g, 3), timed(theirs, z, g, 3)) / 3
    n = max(1, round(target_s / max(per_call, 1e-6)))
    ratios, ours_times = [], []
    for r in range(rounds):
        order = (ours, theirs) if r % 2 == 0 else (theirs, ours)
        t = {id(side): timed(side, z, g, n) for side in order}
        ratios.append(t[id(theirs)] / t[id(ours)])
        ours_times.append(t[id(ours)] / n)
    return statistics.median(ratios), min(ratios), max(ratios), n, statistics.median(ours_times)


# ------------------------------------------------------------------------------------------------
# usage: the same tiny autoencoder trained with each quantizer
# ------------------------------------------------------------------------------------------------


class TinyAE(nn.Module):
    """(B, 1, 32, 32) -> 8x8 latents with `channels` channels -> (B, 1, 32, 32); ~30k weights at width 16."""

    def __init__(self, channels: int, width: int = 16):
        super().__init__()
        w = width
        self.encoder = nn.Sequential(
            nn.Conv2d(1, w, 3, stride=2, padding=1), nn.SiLU(),  # 16x16
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.SiLU(),  # 8x8
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(2 * w, channels, 1),
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(channels, 2 * w, 1), nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.SiLU(),
            nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(2 * w, w, 3, padding=1), nn.SiLU(),  # 16x16
            nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(w, w // 2, 3, padding=1), nn.SiLU(),  # 32x32
            nn.Conv2d(w // 2, 1, 3, padding=1),
        )


def load_images(split: str) -> torch.Tensor:
    """The whole split (N, 1, 32, 32), via data.registry.load_split: uint8 when the dataset keeps its images in
    memory (converted per batch with the dataset's own uint8 -> [-1, 1] transform), else float in [-1, 1]."""
    from data.registry import load_split

    ds = load_split("fashion_mnist", split)
    if hasattr(ds, "images") and ds.images.dtype == torch.uint8:
        return ds.images
    return torch.stack([ds[i][0] for i in range(len(ds))])


def as_float(x: torch.Tensor) -> torch.Tensor:
    from data.transforms import uint8_to_float

    return uint8_to_float(x) if x.dtype == torch.uint8 else x


def train_usage(pair: Pair, make_side: Callable[[], Side], train_x: torch.Tensor, test_x: torch.Tensor,
                steps: int, batch: int, lr: float, seed: int, eval_batch: int = 100) -> tuple[float, float]:
    """Train TinyAE + quantizer; return (usage over the test split, final-50-step mean L1)."""
    torch.manual_seed(seed)
    ae = TinyAE(pair.channels)  # built first: identical weights for ours and theirs
    torch.manual_seed(seed + 1)
    side = make_side()
    params = list(ae.parameters()) + [p for p in side.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    gen = torch.Generator().manual_seed(seed)  # the same batches for every run
    ae.train(), side.train()
    l1s = []
    for _ in range(steps):
        x = as_float(train_x[torch.randint(0, len(train_x), (batch,), generator=gen)])
        quantized, _, qloss = side(ae.encoder(x))
        l1 = (ae.decoder(quantized) - x).abs().mean()
        opt.zero_grad(set_to_none=True)
        (l1 + qloss).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        l1s.append(float(l1.detach()))
    ae.eval(), side.eval()
    seen = torch.zeros(side.codebook_size, dtype=torch.bool)
    with torch.no_grad():
        for i in range(0, len(test_x), eval_batch):
            _, indices, _ = side(ae.encoder(as_float(test_x[i:i + eval_batch])))
            for idx in indices:
                seen[idx.reshape(-1).long()] = True
    return float(seen.float().mean()), statistics.mean(l1s[-50:])


_WORKER: dict = {}


def _init_worker(args: dict) -> None:
    """Per worker process: thread count, the data (loaded once), the pairs."""
    torch.set_num_threads(args["train_threads"])
    _WORKER.update(args=args, train_x=load_images("train"), test_x=load_images("test"),
                   pairs={p.key: p for p in make_pairs(args["dim"], args["codebook"], args["latent"],
                                                       args["msvq_dim"])})


def _usage_task(task: tuple[str, str]):
    key, side = task
    a, pair = _WORKER["args"], _WORKER["pairs"][key]
    res = train_usage(pair, pair.ours if side == "ours" else pair.theirs, _WORKER["train_x"], _WORKER["test_x"],
                      a["steps"], a["train_batch"], a["lr"], a["seed"])
    return key, side, res


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None, help="keys: vq vq_ema vq_cos fsq lfq simvq msvq")
    parser.add_argument("--batch", type=int, default=64, help="feature maps per call in the speed test")
    parser.add_argument("--latent", type=int, default=8, help="feature map side (8 -> 8x8)")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--codebook", type=int, default=1024)
    parser.add_argument("--msvq-dim", type=int, default=32, help="dim of the msvq / ResidualVQ pair (config: 32)")
    parser.add_argument("--rounds", type=int, default=15, help="alternating ours/theirs rounds per quantizer")
    parser.add_argument("--target-s", type=float, default=0.3, help="seconds per side per round")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the speed test (both sides)")
    parser.add_argument("--steps", type=int, default=250, help="training steps per usage run (0 = skip usage)")
    parser.add_argument("--train-batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--train-threads", type=int, default=1,
                        help="torch threads for the usage runs (2 threads on a shared 2-core box can be 5x slower)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes for the usage runs (1 = inline)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--append", action="store_true", help=f"append the table to {RESULTS.relative_to(ROOT)}")
    args = parser.parse_args()

    import vector_quantize_pytorch
    from importlib.metadata import version

    vqp_version = version("vector-quantize-pytorch")
    pairs = make_pairs(args.dim, args.codebook, args.latent, args.msvq_dim)
    if args.only:
        unknown = set(args.only) - {p.key for p in pairs}
        if unknown:
            parser.error(f"unknown keys {sorted(unknown)}; choose from {[p.key for p in pairs]}")
        pairs = [p for p in pairs if p.key in args.only]
    started, load_start = time.time(), os.getloadavg()[0]
    print(f"vector-quantize-pytorch {vqp_version} ({Path(vector_quantize_pytorch.__file__).parent}), "
          f"torch {torch.__version__}", flush=True)

    speed = {}
    torch.set_num_threads(args.threads)
    for pair in pairs:
        med, lo, hi, n, ours_s = speed_ratio(pair, args.batch, args.latent, args.rounds, args.target_s, args.seed)
        speed[pair.key] = (med, lo, hi)
        print(f"[speed] {pair.key:7s} theirs/ours {med:.2f} [{lo:.2f}-{hi:.2f}] ({args.rounds} rounds x {n} calls; "
              f"ours ~{ours_s * 1e3:.1f} ms/call, indicative)", flush=True)

    usage = {}
    if args.steps > 0:
        # 2 x len(pairs) independent runs (each fully seeded), spread over --jobs single-threaded worker processes;
        # the slowest runs go first so the workers finish together.
        order = ["msvq", "lfq", "vq_ema", "vq", "simvq", "vq_cos", "fsq"]
        tasks = sorted([(p.key, side) for p in pairs for side in ("theirs", "ours")],
                       key=lambda t: (order.index(t[0]) if t[0] in order else len(order), t[1] != "theirs"))
        results = {}
        if args.jobs > 1:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(args.jobs, initializer=_init_worker, initargs=(vars(args),)) as pool:
                for key, side, res in pool.imap_unordered(_usage_task, tasks):
                    results[key, side] = res
                    print(f"[usage] {key:7s} {side:6s} {res[0]:.1%} (L1 {res[1]:.3f})  "
                          f"[{time.time() - started:.0f}s]", flush=True)
        else:
            _init_worker(vars(args))
            for task in tasks:
                key, side, res = _usage_task(task)
                results[key, side] = res
                print(f"[usage] {key:7s} {side:6s} {res[0]:.1%} (L1 {res[1]:.3f})  [{time.time() - started:.0f}s]",
                      flush=True)
        for pair in pairs:
            (u_ours, l1_ours), (u_theirs, l1_theirs) = results[pair.key, "ours"], results[pair.key, "theirs"]
            usage[pair.key] = (u_ours, u_theirs, l1_ours, l1_theirs)

    def pct(x):
        return f"{x:.1%}"

    rows = ["| quantizer | settings | fwd+bwd theirs/ours, median [min–max] | our usage | their usage "
            "| train L1 ours / theirs |",
            "|---|---|---|---|---|---|"]
    for pair in pairs:
        med, lo, hi = speed[pair.key]
        u = usage.get(pair.key)
        rows.append(f"| {pair.label} | {pair.settings} | {med:.2f} [{lo:.2f}–{hi:.2f}] | "
                    f"{pct(u[0]) if u else '–'} | {pct(u[1]) if u else '–'} | "
                    f"{f'{u[2]:.3f} / {u[3]:.3f}' if u else '–'} |")
    table = "\n".join(rows)
    command = "python " + " ".join([str(Path(sys.argv[0]).resolve().relative_to(ROOT))] + sys.argv[1:]) \
        if Path(sys.argv[0]).resolve().is_relative_to(ROOT) else "python " + " ".join(sys.argv)
    notes = (
        f"- Command: `{command}` (from the repo root); date {datetime.date.today().isoformat()}; "
        f"machine: {machine()}; torch {torch.__version__}; vector-quantize-pytorch {vqp_version}; "
        f"seed {args.seed}; total wall time {time.time() - started:.0f} s; 1-min load average "
        f"{load_start:.1f} at start, {os.getloadavg()[0]:.1f} at the end (other jobs share the machine).\n"
        f"- Speed: forward + backward in training mode (EMA / dead-code / entropy work included), fp32, CPU, "
        f"torch.set_num_threads({args.threads}) for both; input B={args.batch} x C x {args.latent}x{args.latent} "
        f"(C = {args.dim}; {args.codebook.bit_length() - 1} bits for LFQ; {args.msvq_dim} for msvq); "
        f"{args.rounds} alternating rounds after warm-up (who goes first alternates); ratio = their time / our "
        f"time per round (>= 1.0: ours at least as fast). Each side takes and returns the (B, C, H, W) map; "
        f"layout changes a library needs are inside its timing.\n"
        f"- Usage: the same tiny conv autoencoder (`TinyAE`, width 16, 32x32 -> 8x8, identical initial weights "
        f"for ours and theirs), L1 + quantizer loss, AdamW lr {args.lr} (betas 0.9/0.95, 10% linear warmup), "
        f"grad clip 1, {args.steps} steps x batch {args.train_batch}, the same batches, "
        f"{args.train_threads} thread(s) per run, {args.jobs} runs at a time; usage = distinct codes over the "
        f"whole Fashion-MNIST test split (10k images, eval mode) / codebook size; 'train L1' = mean L1 of the "
        f"last 50 training steps. Each library keeps its own codebook init (VQ: ours U(±1/K), theirs "
        f"kaiming-uniform). A short run: this is early-training usage, and one seed.\n"
        f"- multi-scale residual VQ ≠ ResidualVQ: ours quantizes area-downsampled residuals at growing scales "
        f"and adds bicubic-upsampled, phi-refined code maps (VAR); theirs quantizes the full-resolution "
        f"residual at every stage. They are compared at an equal number of stages only.\n")
    text = f"{SECTION}\n\n{table}\n\n{notes}"
    report(text, args.append)


if __name__ == "__main__":
    main()
