"""The whole tokar pipeline in one command: tokenizer -> generator on its tokens -> class grid -> FID.

    python scripts/pipeline.py                         # make demo: msvq tokenizer, VAR, grid, FID-1k
    python scripts/pipeline.py --generator gpt         # FSQ tokenizer, raster GPT
    python scripts/pipeline.py --generator flowar      # KL VAE, FlowAR
    python scripts/pipeline.py --root outputs/pipeline/<time>   # finish a killed pipeline where it stopped

Every stage is the command a user would type (printed before it runs), each writing its own folder
under one root, ``outputs/pipeline/<time>/{tokenizer,generator,sample}``:

1. ``train.py experiment=demo tokenizer=<tok>``: the demo tokenizer, evaluated on the test split.
2. ``train.py experiment=demo_generator generator=<gen> tokenizer_ckpt=<1>``: the token cache, then the
   generator at the fixed demo budget.
3. ``sample.py ckpt=<2> fid.num_samples=N fid.reference_images=M``: the class grid (rows = classes),
   images/s, and the FID of N samples balanced over the classes against the first M test images.

A finished stage (its metrics.json exists) is skipped; a stage killed after a checkpoint resumes from
it; nothing is overwritten. Extra Hydra overrides go to one stage: ``--tokenizer-args a=1 b=2``,
``--generator-args ...``, ``--sample-args ...``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# each generator's tokenizer: VAR predicts msvq's scales, FlowAR models kl latents, GPT any single-scale code
TOKENIZER_OF = {"var": "msvq", "gpt": "fsq", "flowar": "kl"}


def run_stage(name: str, argv: list[str], folder: Path) -> dict:
    """Run one entry point (or skip / resume it) and return its metrics.json."""
    metrics = folder / "metrics.json"
    if metrics.exists():
        print(f"[{name}] done already: {folder}", flush=True)
        return json.loads(metrics.read_text())
    last = folder / "checkpoints" / "last.ckpt"
    if last.exists():  # killed mid-training: resume the same run
        argv = [*argv, f"ckpt_path={last}"]
    elif folder.exists() and any(folder.iterdir()) and argv[1] == "sample.py":
        folder = folder.with_name(f"{folder.name}-{datetime.datetime.now():%H-%M-%S}")  # never overwrite
    argv = [*argv, f"hydra.run.dir={folder}"]
    print(f"\n[{name}] {shlex.join(argv)}", flush=True)
    start = time.perf_counter()
    subprocess.run(argv, cwd=ROOT, check=True)
    print(f"[{name}] {time.perf_counter() - start:.0f} s", flush=True)
    return json.loads((folder / "metrics.json").read_text())


def pipeline(root: Path, generator: str = "var", tokenizer: str | None = None, fid_samples: int = 1000,
             reference_images: int = 1000, tokenizer_args=(), generator_args=(), sample_args=()) -> dict:
    """Run the three stages under root; return a summary with every path and number."""
    tokenizer = tokenizer or TOKENIZER_OF[generator]
    python = sys.executable
    start = time.perf_counter()
    tok = run_stage("tokenizer", [python, "train.py", "experiment=demo", f"tokenizer={tokenizer}", *tokenizer_args],
                    root / "tokenizer")
    gen = run_stage("generator", [python, "train.py", "experiment=demo_generator", f"generator={generator}",
                                  f"tokenizer_ckpt={root / 'tokenizer'}", *generator_args], root / "generator")
    smp = run_stage("sample", [python, "sample.py", f"ckpt={root / 'generator'}", f"fid.num_samples={fid_samples}",
                               f"fid.reference_images={reference_images}", *sample_args], root / "sample")
    summary = {"root": str(root), "tokenizer": tokenizer, "generator": generator,
               "seconds": round(time.perf_counter() - start, 1), "tokenizer_run": tok, "generator_run": gen,
               "sample_run": smp}
    (root / "pipeline.json").write_text(json.dumps(summary, indent=2))
    return summary


def report(s: dict) -> str:
    """The paths and numbers of a finished pipeline, one per line."""
    tm, gm, sp = s["tokenizer_run"]["metrics"], s["generator_run"]["metrics"], s["sample_run"]
    lines = [
        "",
        f"tokar pipeline: {s['tokenizer']} tokenizer -> {s['generator']} generator ({s['seconds'] / 60:.1f} min "
        f"this call)",
        f"  tokenizer  {s['tokenizer_run']['output_dir']}",
        f"             reconstructions {s['tokenizer_run'].get('grid')}",
        f"             test PSNR {tm['test/psnr']:.2f} dB, SSIM {tm['test/ssim']:.3f}"
        + (f", codebook usage {100 * tm['test/usage']:.1f}%, perplexity {tm['test/perplexity']:.0f}"
           if "test/usage" in tm else ""),
        f"  generator  {s['generator_run']['output_dir']}",
        f"             {s['generator_run']['steps']} steps in {s['generator_run']['train_seconds']:.0f} s; "
        f"val loss {gm['val/loss']:.3f}" + (f", token accuracy {100 * gm['val/acc']:.1f}%" if "val/acc" in gm else ""),
        f"  samples    {s['sample_run']['grid']} (rows = classes)",
        f"             {sp['speed']['images_per_s']:.1f} images/s ({sp['speed']['images_per_s_with_decode']:.1f} "
        f"with the decoder), {sp['speed']['forward_passes_per_image']} forward passes per image, "
        f"on {sp['device']}",
    ]
    if "fid" in sp:
        lines.append(f"  FID        {sp['fid']['fid']:.2f}  [{sp['fid']['protocol']}]")
    lines.append(f"  summary    {Path(s['root']) / 'pipeline.json'}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--generator", default="var", choices=sorted(TOKENIZER_OF))
    parser.add_argument("--tokenizer", default=None, help="default: the generator's own (var: msvq, gpt: fsq, "
                                                           "flowar: kl)")
    parser.add_argument("--root", type=Path, default=None, help="default: a new outputs/pipeline/<time>")
    parser.add_argument("--fid-samples", type=int, default=1000)
    parser.add_argument("--reference-images", type=int, default=1000, help="test images behind the reference "
                                                                           "statistics (cached after the first run)")
    parser.add_argument("--tokenizer-args", nargs="*", default=[])
    parser.add_argument("--generator-args", nargs="*", default=[])
    parser.add_argument("--sample-args", nargs="*", default=[])
    args = parser.parse_args()
    root = args.root or ROOT / "outputs" / "pipeline" / f"{datetime.datetime.now():%Y-%m-%d_%H-%M-%S-%f}"
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    print(f"pipeline folder: {root} (re-run with --root {root} to finish it if it is interrupted)", flush=True)
    try:
        summary = pipeline(root, args.generator, args.tokenizer, args.fid_samples, args.reference_images,
                           args.tokenizer_args, args.generator_args, args.sample_args)
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"pipeline stopped: {shlex.join(e.cmd)} exited with {e.returncode}; fix the cause and "
                         f"re-run with --root {root} to continue from the last finished stage")
    print(report(summary), flush=True)


if __name__ == "__main__":
    main()
