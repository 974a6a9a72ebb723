"""Collaborative decoding (CoDe) against the large VAR alone: latency ratios and forward passes, side by side.

    python benchmarks/collaborative.py --large <var run> --small <var run on the same tokenizer> [--n 2 3 4 5]

Per row (tokens only, the tokenizer's decoder excluded, the same for every row): forward passes of each model
and the latency ratio large-ar time / method time (> 1 = faster) at each batch size, median [min-max] of
``--rounds`` alternating rounds after a warm-up, same labels and seed. Both stages sample with the run's own
settings (temperature 1 on both, so the rows differ only in which model runs which scales). FID: run
sample.py with decoding=collaborative fid.num_samples=1000 (printed commands).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine  # noqa: E402


def timed(decoder, model, labels, sampling, tokenizer, settings, seed) -> tuple[float, dict]:
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    _, stats = decoder.run(model, labels, sampling, g, tokenizer, settings)
    return time.perf_counter() - t0, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", required=True)
    parser.add_argument("--small", required=True)
    parser.add_argument("--n", type=int, nargs="+", default=[2, 3, 4, 5])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from decoding.registry import get_decoder
    from generators.module import sampling_config
    from utils.runs import load_generator

    torch.set_num_threads(args.threads)
    large, tokenizer, config = load_generator(args.large)
    small, _, sconfig = load_generator(args.small)
    sampling = sampling_config(config["generator"]["sampling"])
    ar, code = get_decoder("ar"), get_decoder("collaborative")
    rows = [("small VAR alone", lambda lab, s: timed(ar, small, lab, sampling, tokenizer, None, s))]
    for n in args.n:
        settings = code.prepare({"refiner_ckpt": args.small, "drafting_steps": n, "drafter_temperature": None,
                                 "refiner_temperature": None}, config, "cpu")
        rows.append((f"CoDe N={n}", lambda lab, s, st=settings: timed(code, large, lab, sampling, tokenizer, st, s)))
    print(f"{machine()}; torch {torch.__version__}, fp32, CPU, {args.threads} threads; large "
          f"{sum(p.numel() for p in large.parameters()) / 1e6:.2f}M, small {sum(p.numel() for p in small.parameters()) / 1e6:.2f}M, "
          f"{len(large.scales)} scales {large.scales}")
    print("| method | forward passes (large + small) | " + " | ".join(f"latency ratio vs large, batch {b}"
                                                                      for b in args.batches) + " |")
    print("|---|---|" + "---|" * len(args.batches))
    for name, run in rows:
        cells, passes = [], None
        for b in args.batches:
            labels = torch.arange(b) % config["data"]["num_classes"]
            timed(ar, large, labels, sampling, tokenizer, None, 0)
            run(labels, 0)  # warm-up both
            ratios = []
            for r in range(args.rounds):
                if r % 2:
                    t_m, st = run(labels, r)
                    t_a, _ = timed(ar, large, labels, sampling, tokenizer, None, r)
                else:
                    t_a, _ = timed(ar, large, labels, sampling, tokenizer, None, r)
                    t_m, st = run(labels, r)
                ratios.append(t_a / t_m)
            passes = (f"{st.get('drafter_forward_passes', 0)} + {st.get('refiner_forward_passes', 0)}"
                      if "drafter_forward_passes" in st else f"0 + {st['forward_passes']}")
            cells.append(f"{statistics.median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}]")
        print(f"| {name} | {passes} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
