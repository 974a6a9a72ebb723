"""Collaborative decoding (CoDe) against the large VAR alone: latency ratios, forward passes and peak memory.

    python benchmarks/collaborative.py --large <var run> --small <var run on the same tokenizer> [--n 2 3 4 5]
        [--drafter <fine-tuned large run>] [--memory]

Per row: forward passes of each model and the latency ratio large-ar time / method time (> 1 = faster) at each
batch size, tokens only (the tokenizer's decoder excluded) and with the decoder included (sampling + decode
of the same batch on both sides), median [min-max] of ``--rounds`` alternating rounds after a warm-up, same
labels and seed. Both stages sample with the run's own settings (temperature 1 on both, so the rows differ
only in which model runs which scales). ``--small`` is the refiner of the CoDe rows (and the "small alone"
row); ``--drafter`` (default ``--large``) is their drafter, e.g. a fine-tuned copy of the large VAR
(experiment=code_drafter); the reference is always ``--large`` alone.

``--memory``: each row again in a fresh process that loads only the models it needs, then samples and decodes
one batch of the largest size: the process's peak RSS during that call (Linux VmHWM, reset after loading) and
its growth over the RSS after loading (CPU; on a GPU sample.py reports CUDA max allocated). FID: sample.py with decoding=collaborative fid.num_samples=1000.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine  # noqa: E402


def rss_mb() -> float:
    """The current resident set size of this process (Linux /proc), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Bench:
    """The runs of one benchmark and a timed call of any row (sampling and the tokenizer's decode apart)."""

    def __init__(self, args, need: set[str]):
        from decoding.registry import get_decoder
        from generators.module import sampling_config
        from utils.runs import load_generator

        self.args, self.models = args, {}
        for role in sorted(need):  # "large", "drafter", "small": only what the rows need (--memory)
            path = getattr(args, role) or args.large
            self.models[role], self.tokenizer, self.config = load_generator(path)
        self.sampling = sampling_config(self.config["generator"]["sampling"])
        self.ar, self.code = get_decoder("ar"), get_decoder("collaborative")
        self.settings = {}

    def code_settings(self, n: int):
        """decoding=collaborative's prepared settings for N (the refiner loaded once per N)."""
        if n not in self.settings:
            self.settings[n] = self.code.prepare({"refiner_ckpt": self.args.small, "drafting_steps": n,
                                                  "drafter_temperature": None, "refiner_temperature": None},
                                                 self.config, "cpu")
        return self.settings[n]

    def run(self, row, labels, seed) -> tuple[float, float, dict]:
        """(sampling seconds, decode seconds, stats) of row = "large" | "small" | N (CoDe)."""
        from generators.module import decode_tokens

        g = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        if row in ("large", "small"):
            tokens, stats = self.ar.run(self.models[row], labels, self.sampling, g, self.tokenizer, None)
        else:
            tokens, stats = self.code.run(self.models["drafter"], labels, self.sampling, g, self.tokenizer,
                                          self.code_settings(row))
        t1 = time.perf_counter()
        decode_tokens(self.models.get("large") or self.models.get("drafter") or self.models["small"],
                      self.tokenizer, tokens, self.config["tokens"])
        return t1 - t0, time.perf_counter() - t1, stats


def row_name(row) -> str:
    return {"large": "large VAR alone", "small": "small VAR alone"}.get(row, f"CoDe N={row}")


def needs(row) -> set[str]:
    return {row} if row in ("large", "small") else {"drafter"}


def memory_of(args) -> None:
    """--memory-row: load what the row needs, sample and decode one batch, print this process's RSS figures (JSON)."""
    from decoding.collaborative import peak_memory_mb, reset_peak_memory

    row = args.memory_row if args.memory_row in ("large", "small") else int(args.memory_row)
    bench = Bench(args, needs(row))
    if row not in ("large", "small"):
        bench.code_settings(row)  # the refiner is part of what CoDe loads
    labels = torch.arange(max(args.batches)) % bench.config["data"]["num_classes"]
    cpu = torch.device("cpu")
    loaded = rss_mb()
    reset_peak_memory(cpu)  # the peak of the call below only, not of loading (Linux VmHWM)
    with torch.no_grad():
        bench.run(row, labels, 0)
    peak = peak_memory_mb(cpu)
    print(json.dumps({"row": str(row), "rss_loaded_mb": loaded, "peak_mb": peak, "growth_mb": peak - loaded}))


def memory_rows(args, rows) -> dict:
    """Each row in a fresh process: {row: its RSS figures}."""
    out = {}
    for row in rows:
        cmd = [sys.executable, __file__, "--large", args.large, "--small", args.small, "--threads", str(args.threads),
               "--batches", str(max(args.batches)), "--memory-row", str(row)]
        if args.drafter:
            cmd += ["--drafter", args.drafter]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[row] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", required=True, help="the large VAR run: the reference, and the default drafter")
    parser.add_argument("--small", required=True, help="the small VAR run: the refiner")
    parser.add_argument("--drafter", default=None, help="the drafter of the CoDe rows (default: --large)")
    parser.add_argument("--n", type=int, nargs="+", default=[2, 3, 4, 5])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory", action="store_true", help="peak RSS of each row, each in a fresh process")
    parser.add_argument("--memory-row", default=None, help=argparse.SUPPRESS)  # the child of --memory
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_row is not None:
        return memory_of(args)
    rows = ["small", *args.n]
    bench = Bench(args, {"large", "drafter", "small"})
    large, small = bench.models["large"], bench.models["small"]
    print(f"{machine()}; torch {torch.__version__}, fp32, CPU, {args.threads} threads; large "
          f"{sum(p.numel() for p in large.parameters()) / 1e6:.2f}M, small {sum(p.numel() for p in small.parameters()) / 1e6:.2f}M, "
          f"{len(large.scales)} scales {large.scales}; drafter {args.drafter or args.large}, refiner {args.small}")
    mem = memory_rows(args, ["large", *rows]) if args.memory else {}
    head = [f"latency ratio vs large, batch {b}, {w}" for b in args.batches for w in ("decoder excluded",
                                                                                       "decoder included")]
    if mem:
        b = max(args.batches)
        head += [f"peak RSS while sampling MiB, batch {b} (large alone: {mem['large']['peak_mb']:.0f})",
                 f"RSS growth while sampling MiB (large alone: {mem['large']['growth_mb']:.1f})"]
    print("| method | forward passes (large + small) | " + " | ".join(head) + " |")
    print("|---|---|" + "---|" * len(head))
    with torch.no_grad():
        for row in rows:
            cells, passes = [], None
            for b in args.batches:
                labels = torch.arange(b) % bench.config["data"]["num_classes"]
                bench.run("large", labels, 0)
                bench.run(row, labels, 0)  # warm-up both
                excl, incl = [], []
                for r in range(args.rounds):
                    if r % 2:
                        s_m, d_m, st = bench.run(row, labels, r)
                        s_a, d_a, _ = bench.run("large", labels, r)
                    else:
                        s_a, d_a, _ = bench.run("large", labels, r)
                        s_m, d_m, st = bench.run(row, labels, r)
                    excl.append(s_a / s_m)
                    incl.append((s_a + d_a) / (s_m + d_m))
                passes = (f"{st.get('drafter_forward_passes', 0)} + {st.get('refiner_forward_passes', 0)}"
                          if "drafter_forward_passes" in st else f"0 + {st['forward_passes']}")
                cells += [f"{statistics.median(x):.2f} [{min(x):.2f}-{max(x):.2f}]" for x in (excl, incl)]
            if mem:
                cells += [f"{mem[row]['peak_mb']:.0f}", f"{mem[row]['growth_mb']:.1f}"]
            print(f"| {row_name(row)} | {passes} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
