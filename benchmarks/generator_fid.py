"""FID-1k of each generator on Fashion-MNIST at one fixed budget: the demo pipeline, once per generator.

    python benchmarks/generator_fid.py [--only var gpt flowar] [--append]
    python benchmarks/generator_fid.py --from outputs/pipeline/<a> outputs/pipeline/<b>   # table of finished runs

Each generator runs through scripts/pipeline.py with its own tokenizer (VAR: msvq, GPT: FSQ, FlowAR: KL),
all at the demo budget (`experiment=demo` for the tokenizer, `experiment=demo_generator` for the generator,
batch 32, seed 42), then `sample.py` draws 1000 samples balanced over the 10 classes with each generator's
default sampling settings and scores them against the first 1000 test images. Prints a markdown table;
--append adds it to benchmarks/RESULTS.md. CPU timings in the table are indicative only.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from benchmarks.common import machine, report  # noqa: E402
from pipeline import TOKENIZER_OF, pipeline  # noqa: E402


def parameters(run_dir: str) -> float:
    """Millions of parameters in a run's exported weights."""
    from safetensors import safe_open

    with safe_open(str(Path(run_dir) / "model.safetensors"), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys()) / 1e6


def row(s: dict) -> str:
    tok, gen, smp = s["tokenizer_run"], s["generator_run"], s["sample_run"]
    tm, gm = tok["metrics"], gen["metrics"]
    usage = f"{100 * tm['test/usage']:.1f}%" if "test/usage" in tm else "–"
    acc = f"{100 * gm['val/acc']:.1f}%" if "val/acc" in gm else "–"
    sp = smp["speed"]
    sampling = smp["fid"]["protocol"].split("decoding=", 1)[-1]
    return (f"| {s['generator']} ({parameters(gen['output_dir']):.2f}M) | {s['tokenizer']} ({tm['test/psnr']:.2f} dB, "
            f"{usage}) | {gen['steps']} | "
            f"{gm['val/loss']:.3f} | {acc} | **{smp['fid']['fid']:.2f}** | {sampling} | "
            f"{sp['forward_passes_per_image']} | {sp['images_per_s']:.1f} (batch {sp['batch_size']}) | "
            f"{gen['train_seconds']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=["var", "gpt", "flowar"], choices=sorted(TOKENIZER_OF))
    parser.add_argument("--from", dest="runs", nargs="*", type=Path, default=None,
                        help="finished pipeline folders (their pipeline.json) instead of new runs")
    parser.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()

    summaries = []
    if args.runs:
        summaries = [json.loads((r / "pipeline.json").read_text()) for r in args.runs]
    else:
        stamp = f"{datetime.datetime.now():%Y-%m-%d_%H-%M-%S}"
        for gen in args.only:
            root = ROOT / "outputs" / "pipeline" / f"fid-table_{stamp}" / gen
            root.mkdir(parents=True, exist_ok=True)
            summaries.append(pipeline(root, gen))  # seed 42: train.yaml's default
    protocol = summaries[0]["sample_run"]["fid"]["protocol"].split(", decoding=")[0]
    import torch

    lines = [
        "## Generators: FID-1k on Fashion-MNIST at the demo budget",
        "",
        f"`python benchmarks/generator_fid.py {' '.join(sys.argv[1:])}` "
        f"({datetime.date.today()}; {machine()}; torch {torch.__version__}). Each row is one "
        "`scripts/pipeline.py` run: the tokenizer at `experiment=demo` (700 steps, batch 64), the generator at "
        "`experiment=demo_generator` (400 steps, batch 32, EMA weights), seed 42, then 1000 samples balanced over "
        "the 10 classes with the generator's default sampling (configs/generator/<name>.yaml: VAR cfg ramp 1.5, "
        "GPT cfg 2.0, FlowAR cfg 2.0 with 25 Euler steps per scale; no top-k/top-p).",
        f"FID protocol: {protocol}. FID of 1000 samples against 1000 reference images is biased upwards; compare "
        "rows with each other, not with 50k-sample FIDs. Val loss is cross-entropy (nats) for VAR/GPT and the "
        "flow-matching MSE for FlowAR, so it is not comparable across rows. images/s (the class grid, tokens only) "
        "and train seconds: CPU, indicative.",
        "",
        "| generator (parameters) | tokenizer (test PSNR, usage) | steps | val loss | val token acc | FID-1k | sampling | forward "
        "passes / image | images/s | train s |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *[row(s) for s in summaries],
        "",
    ]
    report("\n".join(lines), args.append)


if __name__ == "__main__":
    main()
