"""Endpoint error of distilled decoding's flow map (decoding/flow_map.py) against solver and step count.

    python benchmarks/flow_map_error.py [--draws 4000] [--reference-steps 512] [--device cpu|cuda]

Codebooks: V = 8, d = 4 with near-duplicate codes (gaps 1e-2 and 1e-3) and flat p; V = 1024, d = 8 on the
unit sphere (LlamaGen-like, 16x smaller) with a peaked random p. Each row compares x_1 of one solver and
step count with an RK4 solve of --reference-steps (512) steps on the same grid family: mean / max |x_1 - x_ref|, the
fraction of tokens that differ, and the TV between the two token histograms. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from decoding.flow_map import flow_map_error_table, flow_sigma_range  # noqa: E402


def codebooks(device):
    gen = torch.Generator().manual_seed(0)
    near = torch.randn(8, 4, generator=gen, dtype=torch.float64)
    near[1] = near[0] + 1e-2 * torch.randn(4, generator=gen, dtype=torch.float64)
    near[5] = near[4] + 1e-3 * torch.randn(4, generator=gen, dtype=torch.float64)
    sphere = torch.randn(1024, 8, generator=gen, dtype=torch.float64)
    sphere = sphere / sphere.norm(dim=-1, keepdim=True)
    peaked = torch.softmax(3 * torch.randn(1024, generator=gen, dtype=torch.float64), -1)
    return [("V=8 d=4 near-duplicates, flat p", torch.full((8,), 1 / 8, dtype=torch.float64), near),
            ("V=1024 d=8 sphere, peaked p", peaked, sphere)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--draws", type=int, default=4000)
    ap.add_argument("--reference-steps", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    for name, p, codes in codebooks(args.device):
        p, codes = p.to(args.device), codes.to(args.device)
        eps = torch.randn(args.draws, codes.shape[1], generator=torch.Generator().manual_seed(1),
                          dtype=torch.float64).to(args.device)
        sigmas = flow_sigma_range(codes)
        start = time.perf_counter()
        rows = flow_map_error_table(p, codes, eps, steps=(4, 8, 16, 32, 64),
                                    reference_steps=args.reference_steps, sigmas=sigmas)
        print(f"\n{name}: sigma range [{sigmas[0]:.2e}, {sigmas[1]:.1f}], {args.draws} draws, reference RK4 {args.reference_steps} steps, "
              f"{time.perf_counter() - start:.1f} s on {args.device}\n")
        print("| solver | steps | velocity evals | mean abs err | max abs err | token mismatch | token TV |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['solver']} | {r['steps']} | {r['nfe']} | {r['mean_error']:.2e} | {r['max_error']:.2e} | "
                  f"{r['token_mismatch']:.4f} | {r['token_tv']:.4f} |")


if __name__ == "__main__":
    main()
